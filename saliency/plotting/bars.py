"""Figure 2 (per-layer sparsity chosen by each criterion at one global sparsity) and figure 5
(cost of one scoring pass: seconds and samples)."""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from saliency.plotting import data as D
from saliency.plotting.style import (
    log_axis,
    new_figure,
    paper_style,
    save_figure,
)

log = logging.getLogger(__name__)


def natural_key(name: str):
    """'features.10.weight' after 'features.2.weight' (model order, not string order)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def short_layer(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def _count(n: int) -> str:
    return f"{n / 1e6:.3g}M" if n >= 1e6 else (f"{n / 1e3:.3g}k" if n >= 1e3 else str(n))


def _one_mode(records: Sequence[dict]) -> tuple[str | None, list[dict]]:
    ms = D.modes(records)
    if not ms:
        return None, []
    return ms[0], [r for r in records if r.get("mode") == ms[0]]


def plot_layer_sparsity(
    records: Sequence[dict],
    *,
    sparsity: float | None = None,
    width: str | float | None = None,
    height: float = 2.3,
    layer_sizes: dict[str, int] | None = None,
):
    """Grouped bars: the fraction of each layer pruned by each criterion at global `sparsity`
    (default: the recorded target closest to 0.9), mean over seeds; dashed line = global target.
    layer_sizes: {name: numel} in model order (see `agreement.layer_sizes`): orders the layers and
    shows their sizes; without it layers are in natural name order."""
    recs = [
        r
        for r in records
        if r.get("criterion") != "dense"
        and isinstance(r.get("layer_sparsity"), dict)
        and r["layer_sparsity"]
    ]
    mode, recs = _one_mode(recs)
    if not recs:
        log.info("layer_sparsity: no pruned records with layer_sparsity; skipped")
        return None
    s = (
        sparsity
        if sparsity is not None
        else D.pick_sparsity(r.get("sparsity_target") for r in recs)
    )
    recs = [
        r
        for r in recs
        if D.finite(r.get("sparsity_target")) and abs(r["sparsity_target"] - s) < 1e-6
    ]
    if not recs:
        log.info("layer_sparsity: no records at sparsity %s; skipped", s)
        return None
    names = {n for r in recs for n in r["layer_sparsity"]}
    sizes = dict(layer_sizes or {})
    layers = [n for n in sizes if n in names]
    layers += sorted(names - set(layers), key=natural_key)
    groups = D.series(recs)
    width = width or ("single" if len(layers) * len(groups) <= 16 else "double")
    fig, axes = new_figure(width, height)
    ax = axes[0, 0]
    x = np.arange(len(layers))
    bw = 0.8 / len(groups)
    for i, (label, rs, st) in enumerate(groups.values()):
        per_seed = defaultdict(lambda: defaultdict(list))
        for r in rs:
            for n, v in r["layer_sparsity"].items():
                if D.finite(v):
                    per_seed[n][r.get("seed")].append(v)
        ys = [
            np.mean([np.mean(v) for v in per_seed[n].values()]) if per_seed[n] else np.nan
            for n in layers
        ]
        ax.bar(
            x - 0.4 + bw * (i + 0.5),
            ys,
            bw,
            label=label,
            color=st["color"],
            edgecolor="white",
            linewidth=0.3,
            hatch="////" if "markerfacecolor" in st else None,  # a second variant of a criterion
        )
    ax.axhline(s, color="k", ls="--", lw=0.8, label=f"global s = {s:g}")
    rotate = len(layers) > 4 or max(len(short_layer(n)) for n in layers) > 8
    sep = " " if rotate else "\n"
    ax.set_xticks(
        x, [short_layer(n) + (f"{sep}({_count(sizes[n])})" if n in sizes else "") for n in layers]
    )
    if rotate:
        ax.tick_params(axis="x", labelrotation=40)
        for t in ax.get_xticklabels():
            t.set_horizontalalignment("right")
            t.set_rotation_mode("anchor")
    ax.set_ylim(0, 1.0)
    ax.set_ylabel("Layer sparsity")
    ax.grid(axis="x", visible=False)
    ax.set_title(f"{D.MODE_TITLES.get(mode, mode)}, global sparsity {s:g}")
    fig.legend(loc="outside lower center", ncol=min(len(groups) + 1, 5 if width != "single" else 3))
    return fig


def _costs(records: Sequence[dict], sparsity: float | None):
    """(mode, s, {series: (label, style, seconds per seed, samples per seed)}) at sparsity s."""
    recs = [
        r for r in records if r.get("criterion") != "dense" and D.finite(r.get("score_seconds"))
    ]
    mode, recs = _one_mode(recs)
    s = (
        sparsity
        if sparsity is not None
        else D.pick_sparsity(r.get("sparsity_target") for r in recs)
    )
    recs = [
        r
        for r in recs
        if D.finite(r.get("sparsity_target")) and abs(r["sparsity_target"] - s) < 1e-6
    ]
    out = {}
    for key, (label, rs, st) in D.series(recs).items():
        # one record per phase and metric carries the same cost: one value per seed
        sec = D.by_seed_mean(rs, "score_seconds")
        smp = D.by_seed_mean(rs, "score_samples")
        out[key] = (label, st, sec, smp)
    return mode, s, out


def plot_cost(
    records: Sequence[dict],
    *,
    sparsity: float | None = None,
    width: str | float = "single",
    height: float | None = None,
):
    """Dots with std error bars: wall-clock seconds (log axis) and samples read by the scoring
    that pruned to `sparsity` (default: the recorded target closest to 0.9), mean over seeds.
    Single-pass criteria score once; multi-round ones (SynFlow, OBS with recompute_steps) report
    the sum over their rounds, as the sweep records it. Dots, not bars: a bar's length on a log
    axis depends on where the axis starts, so only its end would mean anything."""
    mode, s, costs = _costs(records, sparsity)
    if not costs:
        log.info("cost: no records with score_seconds; skipped")
        return None
    n = len(costs)
    fig, axes = new_figure(width, height or 0.9 + 0.2 * n, 1, 2, sharey=True)
    y = np.arange(n)[::-1]
    labels = [c[0] for c in costs.values()]
    colors = [c[1]["color"] for c in costs.values()]
    for ax, idx, title in (
        (axes[0, 0], 2, "Seconds (log scale)"),
        (axes[0, 1], 3, "Samples read"),
    ):
        vals = [c[idx] for c in costs.values()]
        mean = np.array([np.mean(v) if v else np.nan for v in vals])
        sd = np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in vals])
        for yi, m, e, c in zip(y, mean, sd, colors, strict=True):
            if np.isfinite(m):
                ax.errorbar(m, yi, xerr=e, fmt="o", color=c, ms=4, elinewidth=0.6, capsize=1.5)
        ax.set_xlabel(title)
        ax.grid(axis="y", visible=False)
        if idx == 2 and np.nanmin(mean) > 0:
            log_axis(ax, "x")
        if idx == 3:
            ax.set_xlim(left=0)
            if not np.nan_to_num(mean).any():
                ax.set_xlim(0, 1)  # all data-free: no meaningless +-0.05 axis
                ax.set_xticks([0])
        for yi, m, e in zip(y, mean, sd, strict=True):
            if np.isfinite(m):
                txt = f"{m:.2g}" if idx == 2 else (f"{m:.0f}" if m else "0 (data-free)")
                # right of the error bar, so a cap never reads as a minus sign
                ax.annotate(
                    txt,
                    (m + e, yi),
                    xytext=(4, 0),
                    textcoords="offset points",
                    va="center",
                    fontsize="x-small",
                )
        ax.margins(x=0.25)
    axes[0, 0].set_yticks(y, labels)
    axes[0, 0].set_ylim(-0.7, n - 0.3)
    fig.suptitle(f"Scoring cost, {D.MODE_SHORT.get(mode, mode)} to s = {s:g}")
    return fig


def layer_sparsity(
    records, out_dir, *, sparsity=None, stem="layer_sparsity", layer_sizes=None, usetex=False
) -> list[Path]:
    paths: list[Path] = []
    with paper_style(usetex=usetex):
        for suffix, recs, _, config in D.split_settings(records):
            fig = plot_layer_sparsity(recs, sparsity=sparsity, layer_sizes=layer_sizes)
            if fig is not None:
                D.config_title(fig, config)
                cap = (
                    "Fraction of each layer's weights pruned by each criterion at one global "
                    "sparsity (dashed), mean over seeds; layer sizes in parentheses when known."
                ) + D.config_note(config)
                paths += save_figure(fig, out_dir, stem + suffix, caption=cap)
    return paths


def cost(records, out_dir, *, sparsity=None, stem="cost", usetex=False) -> list[Path]:
    paths: list[Path] = []
    with paper_style(usetex=usetex):
        for suffix, recs, _, config in D.split_settings(records):
            fig = plot_cost(recs, sparsity=sparsity)
            if fig is not None:
                D.config_title(fig, config)
                cap = (
                    "Scoring cost per criterion: wall-clock seconds (log scale) and training "
                    "samples read; dots: mean over seeds, error bars: std (none with one seed). "
                    "Single-pass criteria score once; multi-round criteria (e.g. SynFlow, OBS "
                    "with recomputation) report the sum over their rounds. Data-free criteria "
                    "read no samples."
                ) + D.config_note(config)
                paths += save_figure(fig, out_dir, stem + suffix, caption=cap)
    return paths
