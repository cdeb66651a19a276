"""Structured pruning of an LM: perplexity against block parameters removed, and against the
measured prefill speed-up, from the records of ``experiments/smollm2_structured.py`` and
``benchmarks/structured_latency.py`` (numbers only from those files).

    python -m paper_figs.structured_lm results/smollm2_structured.jsonl \\
        --latency results/structured_latency.jsonl --out figs/
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from saliency.plotting.style import criterion_style, new_figure, order_key, paper_style, save_figure


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _one_protocol(recs: list[dict]) -> tuple[int, int]:
    """Refuse records of several protocols (calibration / test windows) in one figure."""
    keys = {(r["calib_windows"], r["test_windows"]) for r in recs}
    if len(keys) != 1:
        raise ValueError(f"records mix protocols (calibration, test windows) {sorted(keys)}: "
                         "give one file per protocol")  # fmt: skip
    return keys.pop()


def plot(records: Path, latency: Path | None, out: Path, threads: int = 2) -> list[Path]:
    recs = _read(records)
    calib, test = _one_protocol(recs)
    dense = next(r["ppl_oneshot"] for r in recs if r["criterion"] == "dense")
    by = defaultdict(list)
    for r in recs:
        if r["criterion"] != "dense":
            by[r["criterion"]].append(r)
    speed = {}
    if latency is not None:
        for r in _read(latency):
            speed[(r["criterion"], r["ratio"])] = r[f"prefill_speedup_t{threads}"]
    ncols = 2 if speed else 1
    paths = []
    with paper_style():
        fig, axes = new_figure("double" if speed else "single", 2.4, ncols=ncols)
        axes = list(axes[0])
        for name in sorted(by, key=order_key):
            rs = sorted(by[name], key=lambda r: r["block_params_removed"])
            st = criterion_style(name)
            x = [100 * r["block_params_removed"] for r in rs]
            axes[0].plot(x, [r["ppl_oneshot"] for r in rs], label=name, **st)
            rec = [r for r in rs if "ppl_recovered" in r]
            if rec:
                axes[0].scatter([100 * r["block_params_removed"] for r in rec],
                                [r["ppl_recovered"] for r in rec], marker=st.get("marker", "o"),
                                facecolors="none", edgecolors=st.get("color"), s=30, zorder=3)  # fmt: skip
            pts = [(speed[(name, r["ratio"])], r["ppl_oneshot"]) for r in rs
                   if (name, r["ratio"]) in speed]  # fmt: skip
            if pts and ncols > 1:
                axes[1].plot(*zip(*sorted(pts), strict=True), label=name, **st)
        for ax in axes:
            ax.set_yscale("log")
            ax.axhline(dense, color="0.5", lw=0.8, ls=":")
            ax.set_ylabel(f"perplexity ({test} test windows)")
        axes[0].set_xlabel("block parameters removed (%)  [open: after recovery]")
        if ncols > 1:
            axes[1].set_xlabel(f"prefill speed-up over dense, 256 tokens, {threads} threads")
        axes[0].legend(fontsize=6, loc="upper left")
        axes[0].set_title(f"SmolLM2-135M, calibration {calib} windows", fontsize=7)
        paths += save_figure(fig, out, "structured_lm", caption=(
            f"SmolLM2-135M: heads and MLP neurons (width, the same fraction in every block) or "
            f"whole blocks (block_influence) removed and compacted; perplexity on {test} test "
            f"windows of 256 tokens, calibration {calib} windows; filled: one-shot, open: after "
            f"the recovery fine-tune; dotted: dense."))  # fmt: skip
    return paths


def table(records: Path, latency: Path | None) -> str:
    """The markdown table of the records (the README's numbers come from here)."""
    recs = _read(records)
    _one_protocol(recs)
    lat = {(r["criterion"], r["ratio"]): r for r in _read(latency)} if latency else {}
    head = ("| criterion | target | removed (blocks) | ppl one-shot | ppl recovered | params M "
            "| MACs/token M | prefill x (1 / 2 thr) | decode x (1 / 2 thr) |")  # fmt: skip
    rows = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(recs, key=lambda r: (r["ratio"], order_key(r["criterion"]))):
        t = lat.get((r["criterion"], r["ratio"]))
        speed = (f"{t['prefill_speedup_t1']:.2f} / {t['prefill_speedup_t2']:.2f}",
                 f"{t['decode_speedup_t1']:.2f} / {t['decode_speedup_t2']:.2f}") if t else ("", "")  # fmt: skip
        rec = f"{r['ppl_recovered']:.2f}" if "ppl_recovered" in r else ""
        rows.append(f"| {r['criterion']} | {r['ratio']:.0%} | {r['block_params_removed']:.1%} | "
                    f"{r['ppl_oneshot']:.2f} | {rec} | {r['params'] / 1e6:.1f} | "
                    f"{r['macs_per_token'] / 1e6:.1f} | {speed[0]} | {speed[1]} |")  # fmt: skip
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m paper_figs.structured_lm")
    p.add_argument("records", type=Path)
    p.add_argument("--latency", type=Path, default=None)
    p.add_argument("--threads", type=int, default=2, choices=(1, 2))
    p.add_argument("--out", type=Path, default=Path("figs"))
    p.add_argument("--table", action="store_true", help="print the markdown table instead")
    args = p.parse_args(argv)
    if args.table:
        print(table(args.records, args.latency))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for path in plot(args.records, args.latency, args.out, args.threads):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
