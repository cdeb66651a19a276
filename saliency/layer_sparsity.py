"""Non-uniform layer sparsities for the layer-wise solvers, as data: ``{layer: sparsity}``.

Computed once, on the dense model, before any layer is solved, and handed to ``prune(...,
scope="layer", layer_sparsity=...)`` (or ``allocation="owl" | "obs"``), so that the solvers stay
per-layer. Both average exactly to the requested sparsity, weighted by the layers' sizes
(``sum_l s_l n_l = s sum_l n_l`` up to float round-off; ``allocate`` then rounds each layer to
whole weights).

- ``owl_sparsity``: OWL (Yin et al. 2024, "Outlier Weighed Layerwise sparsity"). The outlier
  ratio of a group of layers (a transformer block) is the share of its Wanda scores
  ``|W_ij| ||X_j||`` above ``M`` times their mean; the ratios are mapped linearly onto
  ``[0, 2 lambda]`` and a group's sparsity is ``s - (D_g - mean D)``: blocks with more outliers
  keep more weights. Defaults ``M = 5``, ``lambda = 0.08`` (the paper's LLaMA settings).
- ``obs_budget_sparsity``: one global budget from the layer-wise OBS costs ``w^2 / (2 [H^-1]_jj)``
  (Frantar & Alistarh 2022), each divided by its layer's dense output energy
  ``tr(W H W^T) / 2`` so that layers of different output scales compare (a relative error):
  the cheapest weights over all layers give each layer its sparsity, bounded to
  ``[s - lambda, s + lambda]`` (``lambda = 0.08``, OWL's spread): unbounded, the single-weight
  costs ignore how errors compound within a layer and the budget empties layers (Wanda on
  SmolLM2-135M: perplexity 5,402 at 60% and 153,540 at 70%, against 53.5 and 404 uniform).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from saliency import capture, layerwise, solvers

_BLOCK = re.compile(r"^(.*?\.\d+)\.")  # "model.layers.3.self_attn.q_proj.weight" -> block 3


def block_of(name: str) -> str:
    """The repeated block a layer belongs to (the name up to its first numeric part), or the
    layer's own name."""
    m = _BLOCK.match(name)
    return m.group(1) if m else name


def _check(sparsity: float) -> None:
    if not (isinstance(sparsity, (int, float)) and 0 <= sparsity < 1):
        raise ValueError(f"sparsity must be a number in [0, 1); got {sparsity!r}")


def _spread(sizes: Mapping[str, int], offsets: Mapping[str, float], sparsity: float):
    """``s - (D_l - weighted mean D)``; refuses results outside ``[0, 1)``."""
    total = sum(sizes.values())
    mean = sum(offsets[n] * sizes[n] for n in sizes) / total
    out = {n: sparsity - (offsets[n] - mean) for n in sizes}
    bad = {n: round(v, 4) for n, v in out.items() if not 0 <= v < 1}
    if bad:
        raise ValueError(
            f"OWL sparsities outside [0, 1) for {list(bad.items())[:4]}: lower lam (now gives "
            "a spread of 2*lam) or the target sparsity"
        )
    return out


def owl_sparsity(
    model: nn.Module,
    params: Mapping[str, Tensor],
    data: Iterable,
    sparsity: float,
    *,
    M: float = 5.0,
    lam: float = 0.08,
    n_samples: int | None = 128,
) -> dict[str, float]:
    """OWL layer sparsities (module docstring), one value per block of layers."""
    _check(sparsity)
    if not (M > 0 and 0 <= lam < 0.5):
        raise ValueError(f"OWL needs M > 0 and 0 <= lam < 0.5; got M={M!r}, lam={lam!r}")
    stats = layerwise.dense_stats(model, params, data, n_samples=n_samples, diag_only=True)
    modules = capture.layer_modules(model, params)
    counts: dict[str, list[int]] = {}
    for n, st in stats.items():
        score = solvers.wanda_scores(capture.weight_matrix(modules[n]).cpu(), st.H)
        c = counts.setdefault(block_of(n), [0, 0])
        c[0] += int((score > M * score.mean()).sum())
        c[1] += score.numel()
    ratio = {b: k / total for b, (k, total) in counts.items()}
    lo, hi = min(ratio.values()), max(ratio.values())
    scaled = {b: 0.0 if hi == lo else (r - lo) / (hi - lo) * 2 * lam for b, r in ratio.items()}
    sizes = {n: params[n].numel() for n in stats}
    return _spread(sizes, {n: scaled[block_of(n)] for n in sizes}, sparsity)


def obs_budget_sparsity(
    model: nn.Module,
    params: Mapping[str, Tensor],
    data: Iterable,
    sparsity: float,
    *,
    damp: float = 0.01,
    lam: float | None = 0.08,
    n_samples: int | None = 128,
) -> dict[str, float]:
    """Layer sparsities from one global budget over the normalized layer-wise OBS costs, each
    within ``[s - lam, s + lam]`` (``lam=None``: unbounded)."""
    _check(sparsity)
    if lam is not None and not 0 <= lam < 0.5:
        raise ValueError(f"lam must be in [0, 0.5) or None; got {lam!r}")
    stats = layerwise.dense_stats(model, params, data, n_samples=n_samples, diag_only=False)
    modules = capture.layer_modules(model, params)
    costs: dict[str, Tensor] = {}
    for n, st in stats.items():
        W = capture.weight_matrix(modules[n]).detach().double().cpu()
        c = solvers.obs_costs(W, st.H, damp)
        energy = float(torch.einsum("ij,jk,ik->", W, st.H.double(), W)) / 2
        costs[n] = c.reshape(-1).sort().values / max(energy, 1e-300)
    lo, hi = (0.0, 1.0) if lam is None else (max(0.0, sparsity - lam), min(1.0, sparsity + lam))
    return _bounded_budget(costs, sparsity, lo, hi)


def _bounded_budget(costs: Mapping[str, Tensor], sparsity: float, lo: float, hi: float):
    """``s_l = clip(share of layer l's costs below t, lo, hi)`` with the threshold ``t`` found by
    bisection so that the size-weighted mean is ``sparsity``; the last rounding residual is
    spread over the layers strictly inside the bounds. Without bounds (0, 1) this is the
    ``round(s N)`` cheapest weights over all layers."""
    sizes = {n: c.numel() for n, c in costs.items()}
    total = sum(sizes.values())

    def at(t: float) -> dict[str, float]:
        return {n: min(hi, max(lo, int(torch.searchsorted(c, t, right=True)) / sizes[n]))
                for n, c in costs.items()}  # fmt: skip

    flat = torch.cat(list(costs.values())).sort().values
    a, b = 0, flat.numel() - 1  # bisection over the sorted costs: the threshold is one of them
    while a < b:
        mid = (a + b) // 2
        mean = sum(v * sizes[n] for n, v in at(float(flat[mid])).items()) / total
        a, b = (mid + 1, b) if mean < sparsity else (a, mid)
    out = at(float(flat[a]))
    free = [n for n, v in out.items() if lo < v < hi] or list(out)
    residual = sparsity * total - sum(v * sizes[n] for n, v in out.items())
    share = residual / sum(sizes[n] for n in free)
    return {n: v + share if n in free else v for n, v in out.items()}
