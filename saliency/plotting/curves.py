"""Figure 1: metric vs sparsity per criterion (mean over seeds with a band), dense baseline,
one panel per mode; against sparsity or the compression ratio 1/(1-s)."""

from __future__ import annotations

import logging
import math
import os
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
XAXES = ("sparsity", "compression")


def _x(s: np.ndarray, xaxis: str) -> np.ndarray:
    return 1.0 / (1.0 - s) if xaxis == "compression" else s


def _ratio(v: float) -> str:
    """Compression ratio label: '3.3x', '10x', '100x' (two significant digits below 10)."""
    return (f"{v:.2g}" if v < 10 else f"{v:.0f}") + "\u00d7"


def _format_x(ax, xaxis: str, xs) -> None:
    if xaxis == "compression":
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
    modes = D.modes(recs)
    if not modes:
        log.info("accuracy_vs_sparsity: no pruned %r records; skipped", metric)
        return None
    ncols = 2 if len(modes) == 4 else min(len(modes), 3)
    nrows = math.ceil(len(modes) / ncols)
    width = width or ("single" if ncols == 1 else "double")
    fig, axes = new_figure(width, height or 0.6 + 1.9 * nrows, nrows, ncols, sharey=True)
    dense_mean, dense_hw, dense_n = D.summarize(
        D.by_seed_mean(r for r in dense if r.get("metric") == metric), band
    )
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
            (line,) = ax.plot(_x(s, xaxis), m * k, label=label, **st)
            ax.fill_between(
                _x(s, xaxis), (m - hw) * k, (m + hw) * k, color=st["color"], alpha=0.18, linewidth=0
            )
            handles.setdefault(label, line)
        if dense_n:
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
        _format_x(ax, xaxis, _x(np.array(sorted(xs)), xaxis))
        if i % ncols == 0:
            ax.set_ylabel(D.METRIC_LABELS.get(metric, metric))
    fig.legend(
        list(handles.values()),
        list(handles),
        loc="outside lower center",
        ncol=min(len(handles), 5 if width != "single" else 3),
    )
    return fig


def caption(records: Sequence[dict], band: str, metric: str, xaxis: str = "sparsity") -> str:
    seeds = sorted({r.get("seed") for r in records if r.get("criterion") != "dense"}, key=str)
    what = (
        "\u00b11 sample standard deviation"
        if band == "std"
        else "95% Student-t confidence interval"
    )
    return (
        (
            f"Test {metric} vs compression ratio 1/(1 - s) on a log axis (s: fraction of "
            "prunable weights set to zero). "
            if xaxis == "compression"
            else f"Test {metric} vs sparsity (fraction of prunable weights set to zero). "
        )
        + f"Lines: mean over "
        f"{len(seeds)} seed(s); shaded: {what}; dashed black: dense baseline (grey: its "
        f"{what} over seeds). One-shot is "
        f"evaluated right after pruning; other modes after training."
    )


def accuracy_vs_sparsity(
    records: Sequence[dict],
    out_dir: str | os.PathLike,
    *,
    stem: str = "accuracy_vs_sparsity",
    metric: str | None = None,
    band: str = "std",
    xaxis: str = "sparsity",
    width: str | float | None = None,
    usetex: bool = False,
) -> list[Path]:
    """Write figure 1 (PNG 200 dpi + PDF + caption .txt) per setting; return the paths written."""
    paths: list[Path] = []
    with paper_style(usetex=usetex):
        for suffix, recs, dense in D.split_settings(records):
            m = metric or D.default_metric(recs)
            fig = plot_accuracy_vs_sparsity(
                recs, metric=m, band=band, xaxis=xaxis, width=width, dense=dense
            )
            if fig is None:
                continue
            paths += save_figure(fig, out_dir, stem + suffix)
            txt = Path(out_dir) / f"{stem}{suffix}.txt"
            txt.write_text(caption(recs, band, m, xaxis) + "\n")
            paths.append(txt)
    return paths
