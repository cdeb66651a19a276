"""One-shot pruning of the real SmolLM2-135M (offline): perplexity, time and peak memory.

Dense, magnitude, Wanda and SparseGPT at 50% unstructured and 2:4 on all seven projections of
every block (q/k/v/o, gate/up/down; the tied embedding / lm_head stays dense), calibrated on
the first ``--calib`` windows of 256 tokens of ``pydoc_smollm2``'s calibration split,
evaluated on its first ``--test`` test windows (SparseGPT/Wanda protocol: exp of the mean token
NLL over fixed-length windows). Each configuration runs in its own process so that its peak
resident memory is its own; records are appended to ``--out`` (JSONL) and a rerun skips the
configurations already there.

    python experiments/smollm2_oneshot.py --calib 32 --test 16 --out results/smollm2.jsonl
    python experiments/smollm2_oneshot.py --layer-sparsity --calib 8 --test 16  # OWL/OBS budget
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = [("dense", None, "uniform")] + [  # cheapest first
    (c, p, "uniform") for c in ("magnitude", "wanda", "sparsegpt") for p in ("0.5", "2:4")
]
# --layer-sparsity: uniform against OWL and the OBS budget (issue 19), Wanda and SparseGPT
LAYER_SPARSITY = [
    (c, p, a)
    for c in ("wanda", "sparsegpt")
    for p in ("0.7", "0.6", "0.5")
    for a in ("uniform", "owl", "obs")
]


def run_one(criterion: str, pattern: str | None, allocation: str, calib: int, test: int) -> dict:
    import torch

    import saliency
    from saliency.sweep.metrics import perplexity
    from saliency.zoo import get_dataset, get_model

    torch.manual_seed(0)
    ds = get_dataset("pydoc_smollm2")
    model = get_model("smollm2-135m", input_shape=(256,), num_classes=None).eval()
    ids = ds.train.tensors[0][:calib]
    data = [{"input_ids": ids[i : i + 8], "labels": ids[i : i + 8]} for i in range(0, calib, 8)]
    start = time.perf_counter()
    if criterion != "dense":  # every criterion per layer (uniform sparsity), as the papers
        kw = {"scope": "layer", "keep": False}
        sparsity = float(pattern) if pattern != "2:4" else None
        if pattern == "2:4":
            kw["granularity"] = "2:4"
        if criterion in ("wanda", "sparsegpt"):
            kw["n_samples"] = calib
        if allocation != "uniform":
            kw["allocation"] = allocation
        saliency.prune(model, criterion, sparsity, data=data, **kw)
    seconds = time.perf_counter() - start
    ppl = perplexity(model, ds.test.tensors[0][:test], batch_size=4)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB (ru_maxrss in KiB)
    return {"criterion": criterion, "pattern": pattern, "allocation": allocation,
            "calib_windows": calib,
            "test_windows": test, "perplexity": ppl, "prune_seconds": round(seconds, 1),
            "peak_rss_gib": round(peak, 2), "torch_threads": torch.get_num_threads()}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--test", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path("results/smollm2_oneshot.jsonl"))
    ap.add_argument(
        "--layer-sparsity",
        action="store_true",
        help="uniform against OWL and OBS-budget layer sparsities at 50/60/70%%",
    )
    ap.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        pattern = None if args.one[1] == "-" else args.one[1]
        print(json.dumps(run_one(args.one[0], pattern, args.one[2], args.calib, args.test)))
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if args.out.exists():
        for line in args.out.read_text().splitlines():
            r = json.loads(line)
            alloc = r.get("allocation", "uniform")
            done.add((r["criterion"], r["pattern"], alloc, r["calib_windows"], r["test_windows"]))
    for crit, pattern, alloc in LAYER_SPARSITY if args.layer_sparsity else CONFIGS:
        if (crit, pattern, alloc, args.calib, args.test) in done:
            continue
        cmd = [sys.executable, __file__, "--calib", str(args.calib), "--test", str(args.test),
               "--one", crit, pattern or "-", alloc]  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        record = out.strip().splitlines()[-1]
        with args.out.open("a") as f:
            f.write(record + "\n")
        print(record, flush=True)


if __name__ == "__main__":
    main()
