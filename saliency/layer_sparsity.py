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
  the ``round(s N)`` cheapest weights over all layers give each layer its sparsity.
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
    n_samples: int | None = 128,
) -> dict[str, float]:
    """Layer sparsities from one global budget over the normalized layer-wise OBS costs."""
    _check(sparsity)
    stats = layerwise.dense_stats(model, params, data, n_samples=n_samples, diag_only=False)
    modules = capture.layer_modules(model, params)
    costs: dict[str, Tensor] = {}
    for n, st in stats.items():
        W = capture.weight_matrix(modules[n]).detach().double().cpu()
        c = solvers.obs_costs(W, st.H, damp)
        energy = float(torch.einsum("ij,jk,ik->", W, st.H.double(), W)) / 2
        costs[n] = c.reshape(-1) / max(energy, 1e-300)
    flat = torch.cat(list(costs.values()))
    k = round(sparsity * flat.numel())
    order = torch.sort(flat, stable=True).indices[:k]
    chosen = torch.zeros(flat.numel(), dtype=torch.long).index_fill_(0, order, 1)
    out, start = {}, 0
    for n, c in costs.items():
        out[n] = float(chosen[start : start + c.numel()].sum()) / c.numel()
        start += c.numel()
    return out
