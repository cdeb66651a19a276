"""Figure 1: metric vs sparsity per criterion (mean over seeds with a band), dense baseline,
one panel per mode; against sparsity, the compression ratio 1/(1-s), or (sweeps with
`[compact] measure = true`) what was measured on the compacted model: its MACs, its CPU latency
(channel sweeps) or prefill latency (transformer sweeps) relative to dense, or the fraction of
the parameters removed."""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.lines import Line2D

from saliency.plotting import data as D
from saliency.plotting.style import (
    criterion_style,
    log_axis,
    new_figure,
    paper_style,
    save_figure,
)

log = logging.getLogger(__name__)
XAXES = ("sparsity", "compression", "macs", "latency", "params", "prefill")
# x-axes measured on the compacted model (records of sweeps with `[compact] measure = true`)
MEASURED = {
    "macs": "MACs after compaction (fraction of dense)",
    "latency": "CPU latency after compaction (fraction of dense)",
    "params": "Parameters removed (fraction of the dense model's)",
    "prefill": "CPU prefill latency after compaction (fraction of dense)",
}
TRANSFORMER_GRANULARITIES = ("head", "neuron", "width", "depth")


def prefill_threads(r: dict) -> int | None:
    """The fewest torch threads a record's prefill latency was measured with (the least noisy
    on shared cores), or None."""
    found = [int(m.group(1)) for k in r if (m := re.fullmatch(r"latency_prefill_ratio_t(\d+)", k))]
    return min(found) if found else None


def _fraction(r: dict, num: str, den: str) -> float | None:
    if D.finite(r.get(num)) and D.finite(r.get(den)) and r[den]:
        return r[num] / r[den]
    return None


def measured(r: dict, xaxis: str) -> float | None:
    """A record's MACs (per sample, or per token for a transformer), latency or prefill latency
    as a fraction of the dense model's, or the fraction of its parameters removed; None if not
    recorded."""
    if xaxis == "macs":
        f = _fraction(r, "macs", "macs_dense")
        return f if f is not None else _fraction(r, "macs_per_token", "macs_per_token_dense")
    if xaxis == "latency" and D.finite(r.get("latency_ratio")):
        return r["latency_ratio"]
    if xaxis == "params":
        f = _fraction(r, "params", "params_dense")
        return None if f is None else 1.0 - f
    if xaxis == "prefill" and (t := prefill_threads(r)) is not None:
        v = r[f"latency_prefill_ratio_t{t}"]
        return v if D.finite(v) else None
    return None


def check_one_setting(records: Sequence[dict]) -> None:
    """Refuse records of several settings (dataset, model, scope, granularity): one figure
    never mixes them (`accuracy_vs_sparsity` draws one per setting)."""
    keys = sorted({D.setting_key(r) for r in records}, key=str)
    if len(keys) > 1:
        raise ValueError(
            f"the records mix {len(keys)} settings (dataset, model, scope, granularity): "
            f"{keys}; draw one figure per setting (accuracy_vs_sparsity does)"
        )


def setting_text(records: Sequence[dict]) -> str:
    """'granularity width, scope layer' of the records' one setting ('' if unrecorded)."""
    r = next((r for r in records if r.get("criterion") != "dense"), {})
    parts = [f"{k} {r[k]}" for k in ("granularity", "scope") if r.get(k) is not None]
    return ", ".join(parts)


NEEDS = {
    "macs": "run the sweep at granularity 'channel' or a transformer granularity (head, neuron, "
    "width, depth) with [compact] measure = true",
    "latency": "run the sweep at granularity 'channel' with [compact] measure = true (transformer "
    "sweeps: --x prefill)",
    "params": "run the sweep at granularity 'channel' or a transformer granularity (head, neuron, "
    "width, depth) with [compact] measure = true",
    "prefill": "run the sweep of a causal LM at a transformer granularity (head, neuron, width, "
    "depth) with [compact] measure = true",
}


def _x(s: np.ndarray, xaxis: str, records: Sequence[dict] = ()) -> np.ndarray:
    """x of each sparsity target: itself, 1/(1-s), or the mean measured fraction over seeds."""
    if xaxis in MEASURED:
        at = {}
        for r in records:
            if D.finite(r.get("sparsity_target")) and measured(r, xaxis) is not None:
                at.setdefault(round(float(r["sparsity_target"]), 6), []).append(measured(r, xaxis))
        return np.array([np.mean(at.get(round(float(t), 6), [np.nan])) for t in s])
    return 1.0 / (1.0 - s) if xaxis == "compression" else s


def _ratio(v: float) -> str:
    """Compression ratio label: '3.3x', '10x', '100x' (two significant digits below 10)."""
    return (f"{v:.2g}" if v < 10 else f"{v:.0f}") + "\u00d7"


def _format_x(ax, xaxis: str, xs) -> None:
    if xaxis in MEASURED:
        ax.set_xlabel(MEASURED[xaxis])
    elif xaxis == "compression":
        log_axis(ax, "x", ticks=sorted(set(np.round(xs, 6))), fmt=_ratio)
        ax.set_xlabel("Compression ratio 1/(1\u2212s)")
    else:
        ax.set_xlabel("Sparsity s")


def plot_accuracy_vs_sparsity(
    records: Sequence[dict],
    *,
    metric: str | None = None,
    band: str = "std",
    xaxis: str = "sparsity",
    width: str | float | None = None,
    height: float | None = None,
    dense: Sequence[dict] | None = None,
):
    """Metric vs sparsity for one setting: one panel per mode, one line per criterion (mean over
    seeds, shaded band = sample std or Student-t 95% CI), dense baseline as a black dashed line.
    `dense` defaults to the records with criterion 'dense'. Returns a Figure, or None (logged)."""
    if xaxis not in XAXES:
        raise ValueError(f"xaxis must be one of {XAXES}; got {xaxis!r}")
    if band not in D.BANDS:
        raise ValueError(f"band must be one of {D.BANDS}; got {band!r}")
    metric = metric or D.default_metric(records)
    if dense is None:
        dense = [r for r in records if r.get("criterion") == "dense"]
    recs = [r for r in records if r.get("criterion") != "dense" and r.get("metric") == metric]
    check_one_setting(recs)
    modes = D.modes(recs)
    if not modes:
        log.info("accuracy_vs_sparsity: no pruned %r records; skipped", metric)
        return None
    if xaxis in MEASURED and not any(measured(r, xaxis) is not None for r in recs):
        raise ValueError(
            f"xaxis {xaxis!r} needs records that carry the compacted model's measurements: "
            + NEEDS[xaxis]
        )
    ncols = 2 if len(modes) == 4 else min(len(modes), 3)
    nrows = math.ceil(len(modes) / ncols)
    width = width or ("single" if ncols == 1 else "double")
    fig, axes = new_figure(width, height or 0.6 + 1.9 * nrows, nrows, ncols, sharey=True)
    # one factor for the whole figure: accuracy fractions shown in percent
    k = D.scale(
        metric,
        [
            r["value"]
            for r in [*recs, *dense]
            if r.get("metric") == metric and D.finite(r.get("value"))
        ],
    )[1]
    handles: dict[str, Line2D] = {}
    drawn = []  # (ax, x, mean, style) of every line, for the cut of the y-axis
    for i, ax in enumerate(axes.flat):
        if i >= len(modes):
            ax.set_visible(False)
            continue
        mode = modes[i]
        phase = D.phase_for(recs, mode)
        sel = [r for r in recs if r.get("mode") == mode and r.get("phase") == phase]
        xs = {
            round(float(r["sparsity_target"]), 6) for r in sel if D.finite(r.get("sparsity_target"))
        }
        for label, rs, st in D.series(sel).values():
            s, m, hw, _n = D.curve(rs, band)
            x = _x(s, xaxis, rs)
            (line,) = ax.plot(x, m * k, label=label, **st)
            drawn.append((ax, x, m * k, st))
            ax.fill_between(x, (m - hw) * k, (m + hw) * k, color=st["color"], alpha=0.18, lw=0)
            handles.setdefault(label, line)
        dense_mean, dense_hw, dense_n = D.summarize(
            D.by_seed_mean(r for r in D.dense_for(dense, mode) if r.get("metric") == metric), band
        )
        if dense_n:
            drawn.append((ax, np.array([]), np.array([dense_mean * k]), None))
            if dense_hw > 0:
                ax.axhspan(
                    (dense_mean - dense_hw) * k,
                    (dense_mean + dense_hw) * k,
                    color="0.5",
                    alpha=0.15,
                    lw=0,
                    zorder=0,
                )
            line = ax.axhline(
                dense_mean * k,
                label="dense",
                lw=0.9,
                zorder=1,
                **{k: v for k, v in criterion_style("dense").items() if k != "marker"},
            )
            handles.setdefault("dense", line)
        ax.set_title(D.MODE_TITLES.get(mode, str(mode)))
        _format_x(ax, xaxis, _x(np.array(sorted(xs)), xaxis, sel))
        if i % ncols == 0:
            ax.set_ylabel(D.METRIC_LABELS.get(metric, metric))
    if D.HIGHER_IS_BETTER.get(metric, True):
        _cut_axis(drawn)
    fig.legend(
        list(handles.values()),
        list(handles),
        loc="outside lower center",
        ncol=min(len(handles), 5 if width != "single" else 3),
        title=setting_text(recs) or None,  # what "sparsity" counts differs between them
    )
    return fig


def axis_floor(panels: list[list[np.ndarray]]) -> float | None:
    """Where to cut a higher-is-better y-axis shared by `panels` (each a list of series means),
    or None. A series is far below the others when its median lies under the lower Tukey fence
    (Q1 - 1.5 IQR) of its panel's series medians (a random baseline, a criterion that fails);
    the axis then starts just under the lowest mean of the other series, so their differences
    stay readable, provided that cuts something off."""
    kept, lowest = [], np.inf
    for series in panels:
        series = [m[np.isfinite(m)] for m in series]
        series = [m for m in series if m.size]
        if len(series) < 4:
            return None
        med = np.array([np.median(m) for m in series])
        q1, q3 = np.percentile(med, [25, 75])
        fence = q1 - 1.5 * (q3 - q1)
        kept += [m for m, md in zip(series, med, strict=True) if md >= fence]
        lowest = min(lowest, min(float(m.min()) for m in series))
    lo, hi = min(float(m.min()) for m in kept), max(float(m.max()) for m in kept)
    floor = lo - 0.04 * (hi - lo)
    return floor if lowest < floor else None


def _cut_axis(drawn) -> None:
    """Cut the shared y-axis at `axis_floor`: the floor is dotted, its tick reads "<floor", and a
    triangle on it, in the series' colour, marks every mean below it."""
    panels: dict[int, list] = {}
    for ax, _, m, st in drawn:
        if st is not None:
            panels.setdefault(id(ax), []).append(m)
    floor = axis_floor(list(panels.values())) if panels else None
    if floor is None:
        return
    for ax in {id(ax): ax for ax, *_ in drawn}.values():
        ax.set_ylim(bottom=floor)
        ax.axhline(floor, color="0.3", lw=0.8, ls=(0, (1, 1.5)), zorder=3, clip_on=False)
        lo, hi = ax.get_ylim()
        ticks = [t for t in ax.get_yticks() if floor + 0.06 * (hi - lo) < t <= hi]
        ax.set_yticks([floor, *ticks], [f"<{floor:.0f}", *(f"{t:g}" for t in ticks)])
        ax.set_ylim(lo, hi)
    for ax, x, m, st in drawn:
        below = np.isfinite(m) & (m < floor)
        if st is not None and below.any():
            ax.plot(
                x[below], np.full(below.sum(), floor), ls="none", marker="v", ms=3.5,
                color=st["color"], clip_on=False, zorder=4, label="_below",
            )  # fmt: skip


def caption(
    records: Sequence[dict], band: str, metric: str, xaxis: str = "sparsity", config: str = ""
) -> str:
    seeds = sorted({r.get("seed") for r in records if r.get("criterion") != "dense"}, key=str)
    what = (
        "\u00b11 sample standard deviation"
        if band == "std"
        else "95% Student-t confidence interval"
    )
    units = any(r.get("granularity") in TRANSFORMER_GRANULARITIES for r in records)
    zeroed = (
        "fraction of the pruned units' parameters removed: heads, MLP neurons, or of the blocks "
        "at depth"
        if units
        else "fraction of prunable weights set to zero"
    )
    x = (
        f"Test {metric} vs compression ratio 1/(1 - s) on a log axis (s: {zeroed}). "
        if xaxis == "compression"
        else f"Test {metric} vs sparsity ({zeroed}). "
    )
    if xaxis in MEASURED:
        r0 = next((r for r in records if D.finite(r.get("latency_batch"))), {})
        how = (
            "the removed heads, neurons and blocks are cut out (saliency.compact_transformer)"
            if units
            else "the pruned channels are removed (saliency.compact)"
        )
        if xaxis == "latency":
            how += (
                f"; latency: median of repeated forwards of {r0.get('latency_batch')} samples on "
                f"{r0.get('latency_threads')} CPU thread(s), dense timed in the same run"
            )
        elif xaxis == "prefill":
            t = next((t for r in records if (t := prefill_threads(r)) is not None), None)
            how += (
                f"; prefill: time from the call of generate to the first token after a "
                f"{r0.get('prefill_tokens')}-token prompt (one sequence, KV cache), median over "
                f"{r0.get('latency_repeats')} rounds on {t} CPU thread(s), dense timed in the "
                "same run, in turn"
            )
        elif xaxis == "params":
            how += "; parameters: all of the model's, embeddings and LM head included"
        elif xaxis == "macs" and units:
            how += (
                f"; MACs per token at {r0.get('macs_seq_len')} tokens: Linear layers plus "
                "attention's score and value products"
            )
        x = f"Test {metric} vs {MEASURED[xaxis]}, mean over seeds at each target sparsity; {how}. "
    setting = setting_text(records)
    if setting:
        x += f"Setting: {setting}. "
    if len(seeds) > 1:
        lines = (
            f"Lines: mean over {len(seeds)} seeds; shaded: {what}; dashed black: dense "
            f"baseline (grey: its {what} over seeds). "
        )
    else:
        lines = "Lines: one seed (no spread to show); dashed black: dense baseline. "
    return (
        x
        + lines
        + "One-shot is evaluated right after pruning; other modes after training, and their "
        "dense baseline is the dense model given the same extra training (epochs, optimizer), "
        "where recorded. Where curves far below the others would stretch the y-axis, it is cut: "
        "the floor is dotted, its tick reads '<floor', and a triangle on it marks a mean below "
        "it." + D.config_note(config)
    )


def accuracy_vs_sparsity(
    records: Sequence[dict],
    out_dir: str | os.PathLike,
    *,
    stem: str | None = None,
    metric: str | None = None,
    band: str = "std",
    xaxis: str = "sparsity",
    width: str | float | None = None,
    usetex: bool = False,
) -> list[Path]:
    """Write figure 1 (PNG 200 dpi + PDF + caption .txt) per setting; return the paths written.
    Files are named after the metric drawn (`perplexity_vs_sparsity*` for a language model)
    unless `stem` is given."""
    paths: list[Path] = []
    with paper_style(usetex=usetex):
        for suffix, recs, dense, config in D.split_settings(records):
            m = metric or D.default_metric(recs)
            fig = plot_accuracy_vs_sparsity(
                recs, metric=m, band=band, xaxis=xaxis, width=width, dense=dense
            )
            if fig is None:
                continue
            D.config_title(fig, config)
            name = (stem or f"{m}_vs_{xaxis}") + suffix
            paths += save_figure(fig, out_dir, name, caption=caption(recs, band, m, xaxis, config))
    return paths
