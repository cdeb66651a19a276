"""Figure 4: for criteria whose scores are predicted loss increases (OBD, OBS), the prediction
(the sum of the pruned weights' scores, as the sweep records it) against the measured increase
(loss right after pruning minus the dense loss of the same seed, on the samples the criterion
scored with: the prediction's own data; on the test set for records from before `scoring_loss`)."""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

from saliency.plotting import data as D
from saliency.plotting.style import log_axis, new_figure, paper_style, save_figure

log = logging.getLogger(__name__)


def measured_metric(records: Sequence[dict]) -> str:
    metrics = {r.get("metric") for r in records}
    return next((m for m in ("scoring_loss", "loss") if m in metrics), "mse")


def _measured_increase(records: Sequence[dict], dense: Sequence[dict]):
    """[(record, predicted, joint or NaN, measured, best + first-order term or NaN)] from 'pruned'
    records. `predicted` is the one-weight sum (OBS's `predicted_single`, else the sum of the
    pruned scores), `joint` OBS's joint quadratic, `best` the joint one where recorded. The loss
    is the one the prediction is about: 'scoring_loss' (training loss on the scoring samples) where recorded, else the test
    'loss', or 'mse' for a regression sweep (its loss is the MSE)."""
    metric = measured_metric(records)
    dense_loss = defaultdict(list)
    for r in D.dense_for(dense, "dense"):  # the model that was pruned
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
            single = r.get("predicted_single")
            single = float(single if D.finite(single) else r["predicted_loss_increase"])
            joint = float(r["predicted_joint"]) if D.finite(r.get("predicted_joint")) else math.nan
            first = r.get("predicted_first_order")
            best = joint if math.isfinite(joint) else single
            full = best + float(first) if D.finite(first) else math.nan
            out.append((r, single, joint, float(r["value"]) - base, full))
    return out


def _log_or_symlog(ax, axis: str, values: np.ndarray) -> None:
    """Log scale; symlog (linear around 0) when a measured increase is <= 0."""
    v = values[np.isfinite(values)]
    if v.size and (v <= 0).any():
        pos = np.abs(v[v != 0])
        # linear within 6 decades of the largest value: a handful of ~1e-20 predictions (dead
        # inputs) would otherwise stretch the axis over 20 empty decades
        low = max(pos.min(), 1e-6 * pos.max()) if pos.size else 1e-3
        lin = 10 ** math.floor(math.log10(low))
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
        (m for m in D.MODE_ORDER if any(t[0].get("mode") == m for t in rows)),
        rows[0][0].get("mode"),
    )
    rows = [t for t in rows if t[0].get("mode") == mode]
    fig, axes = new_figure(width, height, 1, 2)
    left, right = axes[0]
    allv = []
    groups = D.series([t[0] for t in rows])
    with_first = any(math.isfinite(t[4]) for t in rows)
    with_joint = any(math.isfinite(t[2]) for t in rows)
    for label, rs, st in groups.values():
        ids = {id(r) for r in rs}
        pts = defaultdict(lambda: ([], [], [], []))
        for r, p, j, m, f in rows:
            if id(r) in ids:
                at = pts[round(float(r["sparsity_target"]), 6)]
                for k, v in enumerate((p, m, f, j)):
                    at[k].append(v)
        s = np.array(sorted(pts))
        pm, mm, fm, jm = (np.array([np.mean(pts[x][k]) for x in s]) for k in range(4))
        allv += [pm, mm]
        if np.isfinite(jm).any():
            allv.append(jm)
            left.plot(s, jm, label=f"{label} predicted jointly", color=st["color"],
                      marker=st["marker"], linestyle="-.", fillstyle="top")  # fmt: skip
            right.plot(jm, mm, color=st["color"], marker=st["marker"], linestyle="none",
                       fillstyle="top")  # fmt: skip
        if with_first and np.isfinite(fm).any():
            allv.append(fm)
            left.plot(s, fm, label=f"{label} predicted + first order", color=st["color"],
                      marker=st["marker"], linestyle=":", markerfacecolor="none")  # fmt: skip
            right.plot(fm, mm, color=st["color"], marker=st["marker"], linestyle="none",
                       markerfacecolor="none")  # fmt: skip
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
    on = "scoring samples" if measured_metric(records) == "scoring_loss" else "test set"
    left.set_ylabel(f"Loss increase ({on})")
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
        Line2D([], [], color="k", ls="--", label="predicted, one weight at a time"),
    ]
    dotted = [  # (shown, line style, marker fill, label): the hollow-marker series
        (with_joint, "-.", {"fillstyle": "top"}, "predicted jointly (OBS)"),
        (with_first, ":", {"markerfacecolor": "none"}, "+ first-order term g·Δw"),
    ]
    proxies += [
        Line2D([], [], color="k", ls=ls, marker="o", label=label, **fill)
        for shown, ls, fill, label in dotted
        if shown
    ]
    fig.legend(handles=proxies, loc="outside lower center", ncol=math.ceil(len(proxies) / 2))
    return fig


LOSS_CAPTION = (
    "Predicted vs measured loss increase after one-shot pruning, for criteria whose scores are "
    "predicted loss increases (OBD, OBS). Predicted, dashed: the quadratic model one weight at a "
    "time, sum_q w_q^2 / (2 [H^-1]_qq) for OBS (for OBD the sum of the pruned scores). Dash-dot, "
    "half-filled (OBS): the joint prediction 1/2 w_Q^T ([H^-1]_QQ)^-1 w_Q of removing the pruned "
    "set Q together with its weight update, per block (for multi-round pruning, both are summed "
    "over rounds). Measured: loss right "
    "after pruning minus the dense loss of the same seed, on the training samples the criterion "
    "scored with (the data of the prediction; the y label says test set for older records). "
    "Dotted, hollow: the joint prediction (else the one-weight one) plus the first-order term "
    "g . (w_pruned - w_dense), the "
    "gradient of that loss at the dense model, which OBD and OBS assume to be zero. "
    "Mean over seeds; log scale "
    "(symmetric log when a measured increase is not positive). Points above y = x: the "
    "quadratic model underestimates the damage."
)


def loss_prediction(
    records: Sequence[dict], out_dir, *, stem: str = "loss_prediction", usetex: bool = False
) -> list[Path]:
    """Write figure 4 per setting; return the paths written ([] when no records qualify)."""
    paths: list[Path] = []
    with paper_style(usetex=usetex):
        for suffix, recs, dense, config in D.split_settings(records):
            fig = plot_loss_prediction(recs, dense)
            if fig is not None:
                D.config_title(fig, config)
                cap = LOSS_CAPTION + D.config_note(config)
                paths += save_figure(fig, out_dir, stem + suffix, caption=cap)
    return paths
