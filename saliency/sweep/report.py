"""Summaries of result records: mean +- std over seeds per criterion, mode and sparsity.

`summarize` returns rows; `markdown` renders them as a Markdown table (`saliency report`), and
`summary_table` as a compact text table of the headline metric (the end of `saliency run`).
Records of different configurations (`records.config_groups`) get separate, labelled tables.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any

HEADLINE = {"classification": "accuracy", "regression": "mse", "lm": "perplexity"}
PHASES = ("final", "pruned", "dense")  # the most trained state a unit records is its result


def _label(r: dict[str, Any]) -> str:
    return r.get("label") or r.get("criterion", "?")


def summarize(records: list[dict[str, Any]], metrics: tuple[str, ...] | None = None) -> list[dict]:
    """Rows {sweep, mode, granularity, label, phase, metric, sparsity, mean, std, n} grouped
    over seeds.

    Per unit only its last phase counts (final over pruned); the dense baseline is one row per
    metric. Granularities stay apart (2:4 and element at 50% are different experiments). Sorted
    by mode, granularity, label, metric, sparsity.
    """
    last: dict[str, str] = {}
    for r in records:
        rid, ph = r.get("run_id"), r.get("phase")
        if ph in PHASES and (rid not in last or PHASES.index(ph) < PHASES.index(last[rid])):
            last[rid] = ph
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in records:
        if r.get("phase") != last.get(r.get("run_id")) or (metrics and r["metric"] not in metrics):
            continue
        key = (
            r.get("sweep", ""),
            r["mode"],
            r.get("granularity", "element"),
            _label(r),
            r["phase"],
            r["metric"],
            float(r["sparsity_target"]),
        )
        groups[key].append(float(r["value"]))
    rows = []
    for (sweep, mode, granularity, label, phase, metric, s), vals in groups.items():
        finite = [v for v in vals if math.isfinite(v)]
        rows.append(
            {
                "sweep": sweep,
                "mode": mode,
                "granularity": granularity,
                "label": label,
                "phase": phase,
                "metric": metric,
                "sparsity": s,
                "mean": statistics.fmean(finite) if finite else math.nan,
                "std": statistics.stdev(finite) if len(finite) > 1 else 0.0,
                "n": len(vals),
            }
        )
    order = {"dense": 0, "oneshot": 1, "finetune": 2, "gradual": 3, "iterative": 4, "init": 5}
    rows.sort(
        key=lambda r: (
            r["sweep"],
            order.get(r["mode"], 9),
            r["granularity"] != "element",
            r["granularity"],
            r["label"] != "dense",
            r["label"],
            r["metric"],
            r["sparsity"],
        )
    )
    return rows


def _fmt(metric: str, mean: float, std: float) -> str:
    if metric == "accuracy":
        return f"{100 * mean:.2f} ± {100 * std:.2f}"
    return f"{mean:.4g} ± {std:.2g}"


def markdown(records: list[dict[str, Any]]) -> str:
    """One Markdown table per (mode, granularity, metric): rows = criteria, columns = sparsities.
    Accuracy is in percent; every cell is mean ± std over seeds (n seeds in the header).
    Records of several configurations: one labelled section each, the newest first."""
    from saliency.sweep.records import config_groups

    groups = config_groups(records)
    if len(groups) == 1:
        return _tables(records)
    out = [
        f"The records hold {len(groups)} configurations (different settings under the same "
        "names); each has its own tables, the most recently run first.\n"
    ]
    for i, (label, members) in enumerate(groups, 1):
        out.append(f"## Configuration {i} of {len(groups)}: {label}\n")
        out.append(_tables(members))
    return "\n".join(out)


def _tables(records: list[dict[str, Any]]) -> str:
    """One table per (mode, granularity, metric) of one configuration."""
    rows = summarize(records)
    out = []
    by: dict[tuple[str, str, str, str], list[dict]] = defaultdict(list)
    for r in rows:
        by[(r["sweep"], r["mode"], r["granularity"], r["metric"])].append(r)
    several = len({k[0] for k in by}) > 1
    grains = len({k[2] for k in by if k[1] != "dense"}) > 1
    for (sweep, mode, granularity, metric), group in by.items():
        sps = sorted({r["sparsity"] for r in group})
        labels = list(dict.fromkeys(r["label"] for r in group))
        cells = {(r["label"], r["sparsity"]): r for r in group}
        n = max(r["n"] for r in group)
        unit = " (%)" if metric == "accuracy" else ""
        where = f"{sweep}, " if several else ""
        mode = f"{mode}, {granularity}" if grains and mode != "dense" else mode
        out.append(f"### {where}{mode}: {metric}{unit}, mean ± std over {n} seed(s)\n")
        out.append("| criterion | " + " | ".join(f"{s:g}" for s in sps) + " |")
        out.append("|---|" + "---:|" * len(sps))
        for lab in labels:
            vals = [cells.get((lab, s)) for s in sps]
            out.append(
                f"| {lab} | "
                + " | ".join(_fmt(metric, c["mean"], c["std"]) if c else "" for c in vals)
                + " |"
            )
        out.append("")
    return "\n".join(out) if out else "(no records)\n"


def summary_table(records: list[dict[str, Any]]) -> str:
    """The headline metric (accuracy or MSE) per criterion and sparsity, one block per mode."""
    tasks = {r.get("task") for r in records}
    metric = HEADLINE.get(next(iter(tasks)) if len(tasks) == 1 else "classification", "accuracy")
    return markdown([r for r in records if r.get("metric") == metric])
