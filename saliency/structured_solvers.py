"""Structured solvers on plain matrices: whole input columns of an output projection at a time.

A layer ``y = W x`` with ``W [out, d]`` and calibration statistics ``H = 2 X^T X / n`` (``[d, d]``,
as ``capture.Stats.H``), the input mean ``mu [d]`` and second moment ``E[x_j^2] [d]``. A unit owns
a set of input columns, ``units [n_units, k]``: an attention head's ``k = head_dim`` columns of
``o_proj`` (under GQA, its group's), an MLP neuron's one column of ``down_proj`` (``k = 1``).

- Structured OBS (Hassibi & Stork 1993 with a group of weights per row, all rows sharing ``H^-1``;
  ZipLM, Kurtic et al. 2023; SlimGPT, Ling et al. 2024): removing the columns ``Q`` with the
  optimal update of the others costs ``0.5 tr(W_Q ([H^-1]_QQ)^-1 W_Q^T)``, the update is
  ``W <- W - W_Q ([H^-1]_QQ)^-1 H^-1[Q, :]``; units are removed greedily, one at a time, each
  under the inverse left by the ones before (``H^-1 <- H^-1 - H^-1[:, Q] ([H^-1]_QQ)^-1 H^-1[Q, :]``).
- FLAP (An et al. 2024): the fluctuation ``Var[x_j] ||W[:, j]||^2`` of each input channel, scores
  standardized per layer for a global ranking, and a bias ``W_R mu_R`` that keeps the output's
  mean when the columns ``R`` go.

Damping and inputs never active on the calibration data follow ``saliency.solvers``: ``H`` is
damped by ``damp * mean(diag H)`` and the dead inputs are decoupled, so that their weights cost 0
and moving them moves nothing else. Everything is computed in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from saliency.solvers import damped, dead_inputs, inverse


def _check(W: Tensor, units: Tensor, d_stats: int) -> None:
    """ValueError unless ``W [out, d]`` matches statistics of size ``d`` and ``units [n, k]`` are
    disjoint sets of column indices in ``[0, d)``."""
    if W.dim() != 2 or W.shape[1] != d_stats:
        raise ValueError(
            f"W of shape {tuple(W.shape)} does not match statistics of size {d_stats}: "
            f"W must be [out, {d_stats}]"
        )
    if units.dim() != 2 or units.dtype not in (torch.int32, torch.int64) or units.numel() == 0:
        raise ValueError(
            f"units must be a non-empty integer tensor [n_units, k], got {units.dtype} of shape "
            f"{tuple(units.shape)}"
        )
    lo, hi = int(units.min()), int(units.max())
    if lo < 0 or hi >= d_stats:
        raise ValueError(f"units hold column {lo if lo < 0 else hi}: accepted are 0..{d_stats - 1}")
    flat = units.flatten()
    if flat.unique().numel() != flat.numel():
        values, counts = flat.unique(return_counts=True)
        raise ValueError(
            f"units overlap: column {int(values[counts > 1][0])} belongs to more than one unit; "
            "each column may belong to one unit at most"
        )


def _costs(W: Tensor, Hinv: Tensor, units: Tensor, live: Tensor) -> Tensor:
    """``0.5 tr(W_Q ([H^-1]_QQ)^-1 W_Q^T)`` for each unit (row of ``units``), the weights of the
    inputs not ``live`` counted 0; batched through the Cholesky factor ``L`` of ``[H^-1]_QQ``:
    ``0.5 ||L^-1 W_Q^T||_F^2`` (``k = 1``: ``0.5 ||W_q||^2 / [H^-1]_qq``)."""
    if units.shape[1] == 1:
        q = units[:, 0]
        # column norms before the gather: a strided gather of W's columns costs 7x more
        return 0.5 * W.square().sum(0)[q] / torch.diagonal(Hinv)[q] * live[q]
    W = W * live
    S = Hinv[units[:, :, None], units[:, None, :]]  # [n, k, k]
    L = torch.linalg.cholesky(S)
    Z = torch.linalg.solve_triangular(L, W[:, units].permute(1, 2, 0), upper=False)  # [n, k, out]
    return 0.5 * Z.square().sum((1, 2))


def _setup(W: Tensor, H: Tensor, units: Tensor, damp: float, removed: Tensor | None = None):
    """``(W in float64 with the ``removed`` columns zeroed, H^-1 of the damped H with those
    columns decoupled as solvers does for dead inputs, live [d]: False for the dead inputs)``."""
    _check(W, units, H.shape[-1])
    if H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"H of shape {tuple(H.shape)}: accepted is [d, d] = {[W.shape[1]] * 2}")
    Hd = damped(H, damp)
    live = ~dead_inputs(torch.diagonal(H))
    W = W.detach().to(torch.float64).clone()
    if removed is not None and removed.numel():
        diag = torch.diagonal(Hd)[removed].clone()
        Hd[removed], Hd[:, removed] = 0.0, 0.0
        Hd[removed, removed] = diag
        W[:, removed] = 0.0
    return W, inverse(Hd), live


def unit_obs_costs(W: Tensor, H: Tensor, units: Tensor, *, damp: float = 0.01) -> Tensor:
    """Structured OBS cost of removing each unit alone, with the optimal update of the rest:
    ``0.5 tr(W_Q ([H^-1]_QQ)^-1 W_Q^T)`` on the damped ``H`` (ZipLM; SlimGPT; Hassibi & Stork
    1993). The weights of dead inputs count 0. ``W [out, d]``, ``H [d, d]``; returns
    ``[n_units]`` float64."""
    W, Hinv, live = _setup(W, H, units, damp)
    return _costs(W, Hinv, units, live)


def structured_obs(
    W: Tensor,
    H: Tensor,
    units: Tensor,
    n_remove: int,
    *,
    damp: float = 0.01,
    alive: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Greedy structured OBS (ZipLM, Kurtic et al. 2023; SlimGPT, Ling et al. 2024): ``n_remove``
    times, remove the alive unit ``Q`` of lowest cost ``0.5 tr(W_Q ([H^-1]_QQ)^-1 W_Q^T)`` under
    the current inverse, ``W <- W - W_Q ([H^-1]_QQ)^-1 H^-1[Q, :]`` and
    ``H^-1 <- H^-1 - H^-1[:, Q] ([H^-1]_QQ)^-1 H^-1[Q, :]``. The result is the least-squares refit
    of the kept columns. ``alive [n_units]`` (bool, False: removed before) units are no candidates
    and their columns stay 0. Returns ``(W' [out, d] in W's dtype with the removed columns exactly
    0, removed unit ids in order [n_remove], cost of each step [n_remove] float64)``."""
    _check(W, units, H.shape[-1])
    n_units = units.shape[0]
    if alive is None:
        alive = torch.ones(n_units, dtype=torch.bool)
    elif alive.dtype != torch.bool or alive.shape != (n_units,):
        raise ValueError(
            f"alive must be a bool tensor of shape [{n_units}] (one per unit), got {alive.dtype} "
            f"of shape {tuple(alive.shape)}"
        )
    alive = alive.cpu().clone()
    n_alive = int(alive.sum())
    if not isinstance(n_remove, int) or not 0 <= n_remove <= n_alive:
        raise ValueError(
            f"n_remove={n_remove!r}: accepted are the integers 0..{n_alive} (alive units)"
        )
    dtype = W.dtype
    W, Hinv, live = _setup(W, H, units, damp, units[~alive].flatten())
    removed, costs = [], []
    for _ in range(n_remove):
        candidates = torch.nonzero(alive).flatten()
        c = _costs(W, Hinv, units[candidates], live)
        i = int(torch.argmin(c))
        u, Q = int(candidates[i]), units[candidates[i]]
        # one solve serves both updates: M = ([H^-1]_QQ)^-1 H^-1[Q, :]
        M = torch.linalg.solve(Hinv[Q][:, Q], Hinv[Q])
        W.addmm_(W[:, Q], M, alpha=-1.0)  # in place: no [d, d] temporary
        Hinv.addmm_(Hinv[:, Q], M, alpha=-1.0)
        W[:, Q], Hinv[Q], Hinv[:, Q] = 0.0, 0.0, 0.0  # exact zeros where round-off leaves ~1e-17
        alive[u] = False
        removed.append(u)
        costs.append(c[i])
    costs_t = torch.stack(costs) if costs else torch.zeros(0, dtype=torch.float64)
    return W.to(dtype), torch.tensor(removed, dtype=torch.long), costs_t


def fluctuation(W: Tensor, mean: Tensor, second_moment: Tensor) -> Tensor:
    """FLAP's weighted input feature variance (WIFV) of each input channel (An et al. 2024, eq. 5):
    ``Var[x_j] ||W[:, j]||_2^2`` with ``Var[x_j] = E[x_j^2] - E[x_j]^2`` over the calibration
    tokens (clamped at 0 against round-off). ``W [out, d]``, ``mean``, ``second_moment [d]``."""
    d = W.shape[-1]
    if W.dim() != 2 or mean.shape != (d,) or second_moment.shape != (d,):
        raise ValueError(
            f"W {tuple(W.shape)}, mean {tuple(mean.shape)}, second_moment "
            f"{tuple(second_moment.shape)}: accepted are W [out, d] with mean, second_moment [d]"
        )
    return input_variance(mean, second_moment) * W.detach().double().square().sum(0)


def input_variance(mean: Tensor, second_moment: Tensor) -> Tensor:
    """``Var[x_j] = E[x_j^2] - E[x_j]^2`` in float64, clamped at 0 against round-off."""
    return (second_moment.double() - mean.double().square()).clamp_min(0.0)


def flap_scores(W: Tensor, mean: Tensor, second_moment: Tensor, units: Tensor) -> Tensor:
    """FLAP score of each unit within one layer: its channels' ``fluctuation`` summed
    (``[n_units]`` float64, higher = keep)."""
    _check(W, units, mean.shape[-1])
    return fluctuation(W, mean, second_moment)[units].sum(1)


def flap_standardize(channel_scores: Tensor, units: Tensor) -> Tensor:
    """FLAP's scores comparable across layers and modules (An et al. 2024, eq. 6): each channel's
    ``fluctuation`` standardized over the layer's channels in ``units``, ``(s - mean s) / std s``
    (unbiased std, as the reference code), then averaged over each unit's channels. A layer whose
    scores are all equal gets 0 everywhere. Returns ``[n_units]`` float64."""
    _check(channel_scores[None, :], units, channel_scores.shape[-1])
    s = channel_scores.double()
    cols = s[units.flatten()]
    std = cols.std() if cols.numel() > 1 else cols.new_zeros(())
    z = (s - cols.mean()) / std if float(std) > 0 else torch.zeros_like(s)
    return z[units].mean(1)


def flap_compensation(W: Tensor, mean: Tensor, removed_units: Tensor, units: Tensor) -> Tensor:
    """FLAP's baseline bias (An et al. 2024): ``W[:, R] @ mu[R]`` over the columns ``R`` of the
    removed units, to add to the layer's bias so that ``E[W' x + b']`` stays ``E[W x]`` when the
    columns ``R`` are zeroed. Returns ``[out]`` in W's dtype (computed in float64)."""
    _check(W, units, mean.shape[-1])
    removed_units = torch.as_tensor(removed_units, dtype=torch.long).flatten()
    if removed_units.numel() and not 0 <= int(removed_units.min()) <= int(
        removed_units.max()
    ) < len(units):
        raise ValueError(
            f"removed_units {removed_units.tolist()}: accepted are 0..{len(units) - 1}"
        )
    R = units[removed_units].flatten()
    return (W.detach().double()[:, R] @ mean.double()[R]).to(W.dtype)
