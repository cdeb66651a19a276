"""Figure 1 (metric vs sparsity per criterion, one panel per mode) and figure 4 (OBD/OBS
predicted vs measured loss increase)."""

from __future__ import annotations

import logging
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

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


def caption(records: Sequence[dict], band: str, metric: str) -> str:
    seeds = sorted({r.get("seed") for r in records if r.get("criterion") != "dense"}, key=str)
    what = (
        "\u00b11 sample standard deviation"
        if band == "std"
        else "95% Student-t confidence interval"
    )
    return (
        f"Test {metric} vs sparsity (fraction of prunable weights set to zero). Lines: mean over "
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
            txt.write_text(caption(recs, band, m) + "\n")
            paths.append(txt)
    return paths


def _measured_increase(records: Sequence[dict], dense: Sequence[dict]):
    """[(record, predicted, measured)] from 'pruned' records of the training loss: metric
    'loss', or 'mse' for a regression sweep that records no 'loss' (its loss is the MSE)."""
    metrics = {r.get("metric") for r in records}
    metric = "loss" if "loss" in metrics else "mse"
    dense_loss = defaultdict(list)
    for r in dense:
        if r.get("metric") == metric and D.finite(r.get("value")):
            dense_loss[r.get("seed")].append(float(r["value"]))
    out = []
    for r in records:
        if (
            r.get("phase") == "pruned"
            and r.get("metric") == metric
            and D.finite(r.get("value"))
            and D.finite(r.get("predicted_loss_increase"))
            and dense_loss.get(r.get("seed"))
        ):
            base = float(np.mean(dense_loss[r["seed"]]))
            out.append((r, float(r["predicted_loss_increase"]), float(r["value"]) - base))
    return out


def _log_or_symlog(ax, axis: str, values: np.ndarray) -> None:
    """Log scale; symlog (linear around 0) when a measured increase is <= 0."""
    v = values[np.isfinite(values)]
    if v.size and (v <= 0).any():
        pos = np.abs(v[v != 0])
        lin = 10 ** math.floor(math.log10(pos.min())) if pos.size else 1e-3
        (ax.set_yscale if axis == "y" else ax.set_xscale)("symlog", linthresh=lin)
        fmt = FuncFormatter(lambda x, _: f"{x:g}")
        (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(fmt)
    else:
        log_axis(ax, axis)


def plot_loss_prediction(
    records: Sequence[dict], dense: Sequence[dict], *, width="double", height: float = 2.5
):
    """Left: measured (solid) and predicted (dashed) loss increase vs sparsity per loss-unit
    criterion; right: predicted vs measured with the identity line. Mean over seeds."""
    rows = _measured_increase(records, dense)
    if not rows:
        log.info(
            "loss_prediction: no 'pruned' loss records with predicted_loss_increase and a "
            "dense loss of the same seed; skipped"
        )
        return None
    mode = next(
        (m for m in D.MODE_ORDER if any(r.get("mode") == m for r, _, _ in rows)),
        rows[0][0].get("mode"),
    )
    rows = [t for t in rows if t[0].get("mode") == mode]
    fig, axes = new_figure(width, height, 1, 2)
    left, right = axes[0]
    allv = []
    groups = D.series([r for r, _, _ in rows])
    for label, rs, st in groups.values():
        ids = {id(r) for r in rs}
        pts = defaultdict(lambda: ([], []))
        for r, p, m in rows:
            if id(r) in ids:
                pts[round(float(r["sparsity_target"]), 6)][0].append(p)
                pts[round(float(r["sparsity_target"]), 6)][1].append(m)
        s = np.array(sorted(pts))
        pm = np.array([np.mean(pts[x][0]) for x in s])
        mm = np.array([np.mean(pts[x][1]) for x in s])
        allv += [pm, mm]
        left.plot(s, mm, label=f"{label} measured", color=st["color"], marker=st["marker"], ls="-")
        left.plot(
            s,
            pm,
            label=f"{label} predicted",
            color=st["color"],
            marker=st["marker"],
            linestyle="--",
            markerfacecolor="white",
        )
        right.plot(pm, mm, label=label, color=st["color"], marker=st["marker"], linestyle="none")
    v = np.concatenate(allv)
    lo, hi = np.nanmin(v), np.nanmax(v)
    right.plot([lo, hi], [lo, hi], color="0.5", lw=0.8, ls=":", label="y = x", zorder=1)
    _log_or_symlog(left, "y", v)
    _log_or_symlog(right, "x", v)
    _log_or_symlog(right, "y", v)
    left.set_xlabel("Sparsity s")
    left.set_ylabel("Loss increase")
    left.set_title("Quadratic prediction vs measurement")
    right.set_xlabel("Predicted loss increase")
    right.set_ylabel("Measured loss increase")
    right.set_title("Calibration (mean over seeds)")
    proxies = [
        Line2D([], [], color=st["color"], marker=st["marker"], ls="-", label=lab)
        for lab, _, st in groups.values()
    ]
    proxies += [
        Line2D([], [], color="k", ls="-", label="measured"),
        Line2D([], [], color="k", ls="--", label="predicted (sum of pruned scores)"),
    ]
    fig.legend(handles=proxies, loc="outside lower center", ncol=len(proxies))
    return fig


LOSS_CAPTION = (
    "Predicted vs measured loss increase after one-shot pruning, for criteria whose scores are "
    "predicted loss increases (OBD, OBS). Predicted: the sum of the scores of the pruned weights "
    "(quadratic model; for multi-round pruning, summed over rounds). Measured: test loss right "
    "after pruning minus the dense test loss of the same seed. Mean over seeds; log scale "
    "(symmetric log when a measured increase is not positive). Points above y = x: the "
    "quadratic model underestimates the damage."
)


def loss_prediction(
    records: Sequence[dict], out_dir, *, stem: str = "loss_prediction", usetex: bool = False
) -> list[Path]:
    """Write figure 4 per setting; return the paths written ([] when no records qualify)."""
    paths: list[Path] = []
    with paper_style(usetex=usetex):
        for suffix, recs, dense in D.split_settings(records):
            fig = plot_loss_prediction(recs, dense)
            if fig is not None:
                paths += save_figure(fig, out_dir, stem + suffix, caption=LOSS_CAPTION)
    return paths
