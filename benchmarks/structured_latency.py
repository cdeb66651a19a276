"""CPU latency of structurally pruned SmolLM2-135M shapes against dense, in one process.

Latency depends on the shapes, not on the weights: for each record of
``experiments/smollm2_structured.py`` (its ``shapes``: query heads, KV heads and MLP width of
each kept block), a LLaMA of those shapes is built from SmolLM2's config with random weights
(``saliency.compact_transformer``'s ``reshape_to_widths``, as ``load_compacted`` does) and timed
beside the dense shapes, interleaved round by round (dense, pruned, dense, ...), median over
rounds: prefill of ``--prefill`` tokens (batch 1, one forward) and greedy decode of
``--decode`` tokens with the KV cache (tokens per second), with 1 and 2 threads. Run it on a
quiet machine: other jobs on the cores change the numbers, not only their noise.

    python benchmarks/structured_latency.py results/smollm2_structured.jsonl --ratio 0.3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import transformers

from saliency.compact_transformer import reshape_to_widths

CONFIG = Path("results/smollm2-dense")  # written by experiments/smollm2_structured.py


def build(shapes: dict | None) -> torch.nn.Module:
    cfg = transformers.AutoConfig.from_pretrained(CONFIG)
    if shapes is not None:
        cfg.num_hidden_layers = len(shapes["mlp"])
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    if shapes is not None:
        reshape_to_widths(model, [{"num_key_value_heads": k, "intermediate_size": m}
                                  for k, m in zip(shapes["kv_heads"], shapes["mlp"], strict=True)])  # fmt: skip
    return model


def once(model, threads: int, prefill: int, decode: int) -> tuple[float, float]:
    """(prefill seconds, decode tokens per second) with ``threads`` torch threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    x = torch.randint(
        0, model.config.vocab_size, (1, prefill), generator=torch.Generator().manual_seed(0)
    )
    try:
        with torch.no_grad():
            t = time.perf_counter()
            model(x)
            pre = time.perf_counter() - t
            t = time.perf_counter()
            model.generate(x[:, :16], max_new_tokens=decode, min_new_tokens=decode,
                           do_sample=False, use_cache=True, pad_token_id=0)  # fmt: skip
            dec = decode / (time.perf_counter() - t)
    finally:
        torch.set_num_threads(old)
    return pre, dec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("records", type=Path)
    ap.add_argument("--ratio", type=float, nargs="*", default=None, help="only these ratios")
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("results/structured_latency.jsonl"))
    args = ap.parse_args()
    recs = [json.loads(line) for line in args.records.read_text().splitlines()]
    recs = [r for r in recs if "shapes" in r and r["criterion"] != "dense"
            and (args.ratio is None or r["ratio"] in args.ratio)]  # fmt: skip
    dense = build(None)
    for t in (1, 2):
        once(dense, t, args.prefill, args.decode)  # warm-up
    timed: dict[str, dict] = {}  # the same shapes (every width criterion at one ratio) once
    with args.out.open("a") as f:
        for r in recs:
            key = json.dumps(r["shapes"], sort_keys=True)
            if key in timed:
                row = {
                    **timed[key],
                    "criterion": r["criterion"],
                    "same_shapes_as": timed[key]["criterion"],
                }
                f.write(json.dumps(row) + "\n")
                continue
            model = build(r["shapes"])
            row = {"criterion": r["criterion"], "ratio": r["ratio"],
                   "block_params_removed": r["block_params_removed"], "prefill": args.prefill,
                   "decode": args.decode, "rounds": args.rounds}  # fmt: skip
            for t in (1, 2):
                once(model, t, args.prefill, args.decode)  # warm-up
                got = {"dense": [], "pruned": []}
                for _ in range(args.rounds):
                    got["dense"].append(once(dense, t, args.prefill, args.decode))
                    got["pruned"].append(once(model, t, args.prefill, args.decode))
                for k, v in got.items():
                    row[f"{k}_prefill_ms_t{t}"] = 1000 * statistics.median(p for p, _ in v)
                    row[f"{k}_decode_tok_s_t{t}"] = statistics.median(q for _, q in v)
                row[f"prefill_speedup_t{t}"] = (
                    row[f"dense_prefill_ms_t{t}"] / row[f"pruned_prefill_ms_t{t}"]
                )
                row[f"decode_speedup_t{t}"] = (
                    row[f"pruned_decode_tok_s_t{t}"] / row[f"dense_decode_tok_s_t{t}"]
                )
            timed[key] = row
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}),
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
