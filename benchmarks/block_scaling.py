"""Layer-wise pruning cost against depth: block forwards and peak memory for 2..30 blocks.

SmolLM2-135M's shapes (hidden 576, 9 heads / 3 KV heads, MLP 1536; random weights: the counts
and bytes do not depend on them) cut to B blocks, and the zoo's ``char_gpt`` at the same depths;
Wanda at 50% per layer on ``--calib`` windows of ``--seq`` tokens, block by block and (up to
``--prefix-max`` blocks) on the prefix path. Printed per B: block forwards (the library's own
calls times the windows each ran on, counted by hooks here), the bytes of one copy of the propagated block inputs (the hidden
states of every calibration window: what the block stage holds twice), and the peak resident
memory of the process (each run in its own process). Block by block the forwards grow as
``(groups + 1) B`` per window, linear in B; the prefix path as about ``2 B^2``.

    python benchmarks/block_scaling.py --calib 8 --seq 256
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def run_one(model_name: str, blocks: int, path: str, calib: int, seq: int) -> dict:
    import torch
    import transformers

    import saliency
    from saliency.zoo import get_model

    torch.manual_seed(0)
    if model_name == "smollm2":
        cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                       num_hidden_layers=blocks, num_attention_heads=9,
                                       num_key_value_heads=3, max_position_embeddings=2048,
                                       tie_word_embeddings=True)  # fmt: skip
        model, vocab, hidden = transformers.LlamaForCausalLM(cfg).eval(), 49152, 576
    else:
        model = get_model("char_gpt", input_shape=(seq,), num_classes=96, layers=blocks).eval()
        vocab, hidden = 96, 64
    ids = torch.randint(0, vocab, (calib, seq), generator=torch.Generator().manual_seed(0))
    data = [(ids, ids)] if model_name != "smollm2" else [{"input_ids": ids, "labels": ids}]
    layers = next(
        m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == blocks
    )
    seen = [0]  # block calls times the windows each ran on (hooks here, not the library's count)

    def count(_m, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        seen[0] += x.shape[0]

    for layer in layers:
        layer.register_forward_pre_hook(count, with_kwargs=True)
    cost = saliency.Cost()
    start = time.perf_counter()
    saliency.prune(model, "wanda", 0.5, data=data, scope="layer", keep=False, cost=cost,
                   blocks=None if path == "blocks" else False, n_samples=calib)  # fmt: skip
    return {"model": model_name, "blocks": blocks, "path": path, "calib": calib, "seq": seq,
            "block_forwards": seen[0], "library_block_count": cost.forwards["block"],
            "inputs_bytes": calib * seq * hidden * 4, "seconds": round(time.perf_counter() - start, 1),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--depths", type=int, nargs="*", default=[2, 4, 8, 16, 30])
    ap.add_argument("--prefix-max", type=int, default=8)
    ap.add_argument("--models", nargs="*", default=["char_gpt", "smollm2"])
    ap.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        m, b, p = args.one
        print(json.dumps(run_one(m, int(b), p, args.calib, args.seq)))
        return
    print(
        "| model | blocks | path | block forwards | per window | input bytes | peak RSS MiB | s |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for m in args.models:
        for b in args.depths:
            for p in ("blocks", "prefix"):
                if p == "prefix" and b > args.prefix_max:
                    continue
                cmd = [sys.executable, __file__, "--calib", str(args.calib), "--seq",
                       str(args.seq), "--one", m, str(b), p]  # fmt: skip
                r = json.loads(subprocess.run(cmd, check=True, capture_output=True,
                                              text=True).stdout.strip().splitlines()[-1])  # fmt: skip
                print(f"| {m} | {b} | {p} | {r['block_forwards']} | "
                      f"{r['block_forwards'] / args.calib:.0f} | {r['inputs_bytes']:,} | "
                      f"{r['peak_rss_mib']} | {r['seconds']} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
