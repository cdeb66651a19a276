"""Figure 3: do criteria agree? Spearman rank correlation of their scores and Jaccard overlap of
the weights they keep, at one global sparsity, from the scores a sweep saved.

Scores live in `results/<sweep>/scores/<mode>-seed<seed>/<criterion>.pt` ({param name: tensor}).
Masks are `saliency.allocate(scores, s, scope="global", granularity="element")`; Jaccard is
|K_a & K_b| / |K_a | K_b| over the kept sets K. Both matrices are averaged over seeds.
"""

from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from saliency.plotting.data import MODE_ORDER, MODE_TITLES
from saliency.plotting.style import new_figure, order_key, paper_style, save_figure

log = logging.getLogger(__name__)
_DIR = re.compile(r"^(?P<mode>.+)-seed(?P<seed>-?\d+)$")


def find_scores(scores_roots: Sequence[str | os.PathLike], mode: str | None = None):
    """(mode, {seed: {criterion: path}}) for one mode (default: one-shot if saved, else the first)."""
    found: dict[str, dict[int, dict[str, Path]]] = defaultdict(lambda: defaultdict(dict))
    for root in scores_roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for d in sorted(root.iterdir()):
            m = _DIR.match(d.name)
            if m and d.is_dir():
                for f in sorted(d.glob("*.pt")):
                    found[m["mode"]][int(m["seed"])][f.stem] = f
    if not found:
        return None, {}
    if mode is None:
        mode = next((m for m in MODE_ORDER if m in found), sorted(found)[0])
    return mode, dict(found.get(mode, {}))


def layer_sizes(scores_roots: Sequence[str | os.PathLike]) -> dict[str, int]:
    """{param name: numel} in model order, from the first saved score file (torch.save keeps the
    dict's insertion order, which is `named_parameters` order); {} when none was saved."""
    _, seeds = find_scores(scores_roots)
    for _, paths in sorted(seeds.items()):
        for path in paths.values():
            sd = _load(path)
            if sd:
                return {n: v.numel() for n, v in sd.items()}
    return {}


def _load(path: Path) -> dict[str, torch.Tensor] | None:
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        log.warning("agreement: %s is not a {name: tensor} dict; ignored", path)
        return None
    if any(torch.isnan(v).any() for v in sd.values()):
        log.warning("agreement: %s has NaN scores; ignored", path)
        return None
    big = torch.finfo(torch.float32).max
    return {n: torch.nan_to_num(v.float(), posinf=big, neginf=-big) for n, v in sd.items()}


def ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions), as Spearman's rho needs."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    start = np.r_[0, np.flatnonzero(xs[1:] != xs[:-1]) + 1]
    end = np.r_[start[1:], xs.size]
    avg = (start + end - 1) / 2.0
    r = np.empty(x.size)
    r[order] = np.repeat(avg, end - start)
    return r


def agreement_matrices(
    scores: Mapping[str, Mapping[str, torch.Tensor]],
    sparsity: float,
    *,
    max_elements: int = 2_000_000,
):
    """(names, Spearman matrix, Jaccard matrix) for {criterion: scores} of one seed.

    Jaccard is exact. Spearman uses every weight up to `max_elements`, else a fixed random subset
    of that size (seed 0; the standard error of rho is then below 1e-3), to bound memory on
    large models.
    """
    from saliency import allocate

    names = list(scores)
    common = sorted(set.intersection(*(set(s) for s in scores.values())))
    flat = {c: torch.cat([scores[c][n].flatten() for n in common]).float().numpy() for c in names}
    total = next(iter(flat.values())).size
    idx = None
    if total > max_elements:
        idx = np.sort(np.random.default_rng(0).choice(total, max_elements, replace=False))
    R = np.array([ranks(flat[c] if idx is None else flat[c][idx]) for c in names])
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.corrcoef(R) if len(names) > 1 else np.ones((1, 1))
    keep = {}
    for c in names:
        m = allocate(
            {n: scores[c][n] for n in common}, sparsity, scope="global", granularity="element"
        )
        keep[c] = torch.cat([m[n].flatten() for n in common])
    jac = np.ones((len(names), len(names)))
    for i, a in enumerate(names):
        for j, b in enumerate(names[:i]):
            union = int((keep[a] | keep[b]).sum())
            jac[i, j] = jac[j, i] = int((keep[a] & keep[b]).sum()) / union if union else np.nan
    return names, rho, jac


def _heatmap(fig, ax, M, names, vmin, vmax, cmap, label):
    # aspect 'auto': the image fills the axes, so the colorbar is exactly as tall as the map
    im = ax.imshow(M, vmin=vmin, vmax=vmax, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(len(names)), names)
    ax.grid(False)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    small = len(names) > 6
    for (i, j), v in np.ndenumerate(M):
        r, g, b, _ = im.cmap(im.norm(v)) if np.isfinite(v) else (1, 1, 1, 1)
        dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
        ax.text(
            j,
            i,
            f"{v:.2f}".replace("-0.00", "0.00") if np.isfinite(v) else "\u2013",
            ha="center",
            va="center",
            fontsize=6 if small else 7,  # 6 pt: the print minimum
            color="white" if dark else "black",
        )
    fig.colorbar(im, ax=ax, label=label, fraction=0.08, pad=0.03)


def plot_agreement(
    scores_roots: Sequence[str | os.PathLike],
    sparsity: float,
    *,
    mode: str | None = None,
    width: str | float = "double",
    height: float | None = None,
):
    """Two heatmaps (Spearman of scores; Jaccard of kept weights at `sparsity`), or None (logged)."""
    mode, seeds = find_scores(scores_roots, mode)
    if not seeds:
        log.info(
            "agreement: no saved scores under %s (sweep with save_scores = true); skipped",
            [str(r) for r in scores_roots],
        )
        return None
    crits = sorted({c for per in seeds.values() for c in per}, key=order_key)
    rho_sum = np.zeros((len(crits), len(crits)))
    jac_sum = np.zeros_like(rho_sum)
    count = np.zeros_like(rho_sum)
    for _seed, paths in sorted(seeds.items()):
        loaded = {c: _load(paths[c]) for c in crits if c in paths}
        loaded = {c: s for c, s in loaded.items() if s}
        if len(loaded) < 2:
            continue
        names, rho, jac = agreement_matrices(loaded, sparsity)
        idx = [crits.index(c) for c in names]
        ix = np.ix_(idx, idx)
        rho_sum[ix] += np.nan_to_num(rho)
        jac_sum[ix] += np.nan_to_num(jac)
        count[ix] += np.isfinite(rho)
    if not count.any():
        log.info("agreement: fewer than two usable score files per seed; skipped")
        return None
    keep = [i for i in range(len(crits)) if count[i].sum() > 1]
    ix = np.ix_(keep, keep)
    with np.errstate(invalid="ignore"):
        rho, jac = (rho_sum / count)[ix], (jac_sum / count)[ix]
    names = [crits[i] for i in keep]
    n = len(names)
    fig, axes = new_figure(width, height or min(max(1.2 + 0.2 * n, 2.4), 3.8), 1, 2)
    _heatmap(fig, axes[0, 0], rho, names, -1, 1, "RdBu_r", "Spearman \u03c1")
    _heatmap(fig, axes[0, 1], jac, names, 0, 1, "viridis", "Jaccard")
    axes[0, 0].set_title("Rank correlation of scores")
    axes[0, 1].set_title(f"Overlap of kept weights, s = {sparsity:g}")
    fig.suptitle(f"{MODE_TITLES.get(mode, mode)}: mean over {len(seeds)} seed(s)")
    return fig


def agreement(
    scores_roots,
    out_dir,
    *,
    sparsity: float = 0.9,
    mode: str | None = None,
    stem: str = "agreement",
    usetex: bool = False,
) -> list[Path]:
    with paper_style(usetex=usetex):
        fig = plot_agreement(scores_roots, sparsity, mode=mode)
        cap = (
            f"Agreement between criteria. Left: Spearman rank correlation of the scores over all "
            f"prunable weights. Right: Jaccard overlap |A \u2229 B| / |A \u222a B| of the weights "
            f"each criterion keeps at global sparsity {sparsity:g} (element granularity). Both "
            f"from the first scoring pass of the trained dense model, averaged over seeds."
        )
        return [] if fig is None else save_figure(fig, out_dir, stem, caption=cap)
