"""Structured pruning of the real SmolLM2-135M (offline): heads, MLP neurons and blocks removed.

For each criterion and fraction of the block parameters removed: prune (``granularity="width"``,
the same fraction in every block, so that the result loads in plain transformers; Block
Influence: ``"depth"``, whole blocks), compact (``saliency.compact_transformer``), and measure in
the same process against the dense model: perplexity on the first ``--test`` test windows of 256
tokens of ``pydoc_smollm2`` (calibration: the first ``--calib`` training windows), parameters,
MACs per token and each block's widths (``benchmarks/structured_latency.py`` times those shapes
against dense, on a quiet machine), then perplexity after a short recovery fine-tune at the
ratios ``--recover-at`` (``--steps`` AdamW steps of 2 training windows, all weights).
Torch-Pruning's LLM pruner is not run beside: its dependency graph does not finish on a
grouped-query model (``MetaPruner`` with ``num_heads`` as its ``examples/LLMs``: still building
the groups after 5 minutes on a 2-block GQA LLaMA of hidden size 96; Torch-Pruning issue #527,
open: "infinite loop while it creates the dependency graph" on GQA models). Each configuration
runs in its own process; records go to ``--out`` (JSONL) and a rerun skips those done.

    python experiments/smollm2_structured.py --out results/smollm2_structured.jsonl
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RATIOS = ("0.3", "0.5", "0.2", "0.1")  # the goals are at 30%: first
CRITERIA = ("magnitude", "taylor_weight", "flap", "structured_obs")
CONFIGS = [(c, "0.3") for c in CRITERIA] + [("block_influence", r) for r in ("0.1", "0.2", "0.3")]
CONFIGS += [(c, r) for r in RATIOS[1:] for c in CRITERIA]
CACHE = Path("results/smollm2-dense")  # the dequantized model, saved once (loads in seconds)


def load():
    import torch
    import transformers

    from saliency.zoo import get_model

    if not (CACHE / "config.json").exists():
        dense = get_model("smollm2-135m", input_shape=(256,), num_classes=None)
        dense.hf_quantizer = None  # dequantized to float32 on load: a plain float model
        if hasattr(dense.config, "quantization_config"):
            del dense.config.quantization_config
        dense.save_pretrained(CACHE)
    return transformers.AutoModelForCausalLM.from_pretrained(CACHE, dtype=torch.float32).eval()


def block_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if ".layers." in n)


def macs_per_token(model, seq: int = 256) -> int:
    """Linear layers' ``in * out`` per token, plus attention's ``q k^T`` and ``a v`` products,
    ``2 * heads * head_dim * seq / 2`` per token per layer (causal: on average half the window)."""
    import torch

    lin = sum(m.in_features * m.out_features for m in model.modules()
              if isinstance(m, torch.nn.Linear))  # fmt: skip
    att = sum(2 * m.q_proj.out_features * seq // 2 for m in model.modules() if hasattr(m, "q_proj"))
    return lin + att


def finetune(model, windows, steps: int, lr: float = 5e-5, batch: int = 2) -> float:
    """``steps`` AdamW steps of causal-LM loss on consecutive batches of ``windows``."""
    import torch

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    start = time.perf_counter()
    for s in range(steps):
        i = (s * batch) % (len(windows) - batch + 1)
        x = windows[i : i + batch]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return time.perf_counter() - start


def shapes(model) -> dict:
    """What latency depends on: each block's query heads, KV heads and MLP width."""
    layers = model.model.layers
    return {"hidden_size": model.config.hidden_size, "head_dim": layers[0].self_attn.head_dim,
            "heads": [b.self_attn.q_proj.out_features // b.self_attn.head_dim for b in layers],
            "kv_heads": [b.self_attn.k_proj.out_features // b.self_attn.head_dim for b in layers],
            "mlp": [b.mlp.up_proj.out_features for b in layers]}  # fmt: skip


def run_one(crit: str, ratio: str, calib: int, test: int, steps: int, recover_at) -> dict:
    import torch

    import saliency
    from saliency.sweep.metrics import perplexity
    from saliency.zoo import get_dataset

    torch.manual_seed(0)
    ds = get_dataset("pydoc_smollm2")
    train, tests = ds.train.tensors[0], ds.test.tensors[0][:test]
    model = load()
    dense = {"block_params": block_params(model), "params": sum(p.numel() for p in model.parameters()),
             "macs_per_token": macs_per_token(model)}  # fmt: skip
    rec = {"criterion": crit, "ratio": float(ratio), "calib_windows": calib, "test_windows": test}
    start = time.perf_counter()
    ids = train[:calib]
    data = [{"input_ids": ids[i : i + 4], "labels": ids[i : i + 4]} for i in range(0, calib, 4)]
    if crit == "dense":
        small = model
    else:
        gran = "depth" if crit == "block_influence" else "width"
        scope = "global" if gran == "depth" else "layer"
        kw = {"n_samples": calib} if crit != "magnitude" else {}
        saliency.prune(model, crit, float(ratio), data=data, granularity=gran, scope=scope, **kw)
        small = saliency.compact_transformer(model, ids[:2])
    rec["prune_seconds"] = round(time.perf_counter() - start, 1)
    rec["ppl_oneshot"] = perplexity(small, tests, batch_size=4)
    rec |= {"block_params": block_params(small), "params": sum(p.numel() for p in small.parameters()),
            "macs_per_token": macs_per_token(small)}  # fmt: skip
    rec["block_params_removed"] = 1 - rec["block_params"] / dense["block_params"]
    rec["dense"] = dense
    rec["shapes"] = shapes(small)
    if steps and crit != "dense" and ratio in recover_at:
        rec["finetune_seconds"] = round(finetune(small, train[calib:], steps), 1)
        rec["finetune_steps"] = steps
        rec["ppl_recovered"] = perplexity(small, tests, batch_size=4)
    rec["torch_threads"] = torch.get_num_threads()
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--test", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20, help="recovery fine-tune steps (0: none)")
    ap.add_argument("--recover-at", nargs="*", default=["0.3"], help="ratios that get recovery")
    ap.add_argument("--out", type=Path, default=Path("results/smollm2_structured.jsonl"))
    ap.add_argument("--only", nargs="*", default=None, help="criteria to run (default: all)")
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(*args.one, args.calib, args.test, args.steps, args.recover_at)))
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if args.out.exists():
        for line in args.out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["criterion"], str(r["ratio"]), r["calib_windows"], r["test_windows"]))
    for crit, ratio in [("dense", "0.0"), *CONFIGS]:
        if args.only and crit not in args.only or (crit, ratio, args.calib, args.test) in done:
            continue
        cmd = [sys.executable, __file__, "--calib", str(args.calib), "--test", str(args.test),
               "--steps", str(args.steps), "--recover-at", *args.recover_at,
               "--one", crit, ratio]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            print(f"{crit} {ratio} failed:\n{res.stderr[-3000:]}", flush=True)
            continue
        record = res.stdout.strip().splitlines()[-1]
        with args.out.open("a") as f:
            f.write(record + "\n")
        print(record, flush=True)


if __name__ == "__main__":
    main()
