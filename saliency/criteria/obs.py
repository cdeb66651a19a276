"""Optimal Brain Surgeon (Hassibi & Stork 1993) on block inverse curvature (WoodFisher)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from saliency import inverse_fisher
from saliency.criteria import Scores, register_criterion
from saliency.criteria.base import default_loss, preserve_model_state


@register_criterion
@dataclass(frozen=True)
class OBS:
    """Optimal Brain Surgeon: predicted loss increase w_q^2 / (2 [H^-1]_qq) (Hassibi & Stork 1993).

    Removing weight q and letting the others move optimally under the quadratic model
    ``L(w + dw) - L(w) = 1/2 dw^T H dw`` (at a minimum) costs ``w_q^2 / (2 [H^-1]_qq)``
    (``loss_units``). ``H^-1`` is block diagonal: WoodFisher's damped empirical Fisher on
    contiguous blocks of ``block_size`` weights of each tensor (``hessian="fisher"``, Singh &
    Alistarh 2020), or the exact autograd Hessian of all targets jointly for small models
    (``hessian="exact"``, up to ``max_params`` weights). See ``saliency.inverse_fisher`` for the
    damping: ``damp`` is relative to the mean of each block's curvature diagonal (default 1e-2
    for the Fisher, **0 for the exact Hessian**, which is then refused with a clear error if it is
    not positive definite: pass ``damp`` to damp it), ``damp_absolute`` is added as is.

    ``apply_update`` (called by ``saliency.prune`` after allocation) applies the joint OBS update for
    the set Q of weights pruned in a block: ``dw = -H^-1[:, Q] (H^-1[Q, Q])^-1 w_Q`` (the
    minimizer of the quadratic subject to ``w_Q + dw_Q = 0``, not a sum of one-weight updates);
    ``update=False`` only zeros the pruned weights (mask only). Weights already pruned when scoring (zero
    or masked) are held out of the inverse, so they stay exactly zero.

    ``recompute_steps=k`` reaches the target in k rounds, re-estimating curvature and
    re-applying the update each round. The targets are geometric in density,
    ``s_i = 1 - (1 - s)^(i/k)``: every round removes the same fraction of the surviving
    weights, so each quadratic model extrapolates over the same relative step. Linear spacing
    would instead leave the last rounds the largest relative jumps (90% -> 95% removes half of
    what is left), where the quadratic model is least trustworthy.
    """

    name: ClassVar[str] = "obs"
    loss_units: ClassVar[bool] = True
    channel_reduce: ClassVar[str] = "sum"

    hessian: Literal["fisher", "exact"] = "fisher"
    block_size: int = 128
    n_samples: int | None = 1024
    damp: float | None = None
    damp_absolute: float = 0.0
    dtype: Literal["float32", "float64"] = "float32"
    method: Literal["cholesky", "woodbury"] = "cholesky"
    update: bool = True
    recompute_steps: int = 1
    eval_mode: bool = True
    chunk_size: int = 128
    max_params: int = 4096

    def __post_init__(self) -> None:
        if self.hessian not in ("fisher", "exact"):
            raise ValueError(f"hessian must be 'fisher' or 'exact'; got {self.hessian!r}")
        if not isinstance(self.recompute_steps, int) or self.recompute_steps < 1:
            raise ValueError(f"recompute_steps must be an int >= 1; got {self.recompute_steps!r}")
        if self.n_samples is not None and (
            not isinstance(self.n_samples, int) or self.n_samples < 1
        ):
            raise ValueError(f"n_samples must be a positive int or None; got {self.n_samples!r}")
        inverse_fisher._check(
            self.block_size, self.relative_damping, self.damp_absolute, self.method, self.dtype,
            self.chunk_size,
        )  # fmt: skip

    @property
    def relative_damping(self) -> float:
        """``damp``, or its default: 1e-2 for the Fisher blocks; 0 for ``hessian="exact"``,
        which must be exact (OBS on a quadratic lands on the constrained optimum)."""
        if self.damp is not None:
            return self.damp
        return 0.0 if self.hessian == "exact" else 1e-2

    def schedule(self, sparsity: float | None) -> list[float | None]:
        """Round targets ``1 - (1 - s)^(i/k)``, i = 1..k (geometric in density)."""
        if sparsity is None or self.recompute_steps == 1:
            return [sparsity]
        k, d = self.recompute_steps, 1.0 - float(sparsity)
        return [1.0 - d ** (i / k) for i in range(1, k)] + [float(sparsity)]

    def inverse(self, model, params, data, loss_fn=None) -> inverse_fisher.InverseCurvature:
        """The block inverse curvature this criterion uses (conditioned on unpruned weights)."""
        loss_fn = default_loss if loss_fn is None else loss_fn
        kw = dict(n_samples=self.n_samples, damp=self.relative_damping)
        kw["damp_absolute"] = self.damp_absolute
        kw["dtype"] = self.dtype
        with preserve_model_state(model):
            if self.eval_mode:
                model.eval()
            if self.hessian == "exact":
                return inverse_fisher.exact_inverse_hessian(
                    model, params, data, loss_fn, max_params=self.max_params, **kw
                )
            return inverse_fisher.block_inverse_fisher(
                model, params, data, loss_fn, block_size=self.block_size, method=self.method,
                chunk_size=self.chunk_size, **kw,
            )  # fmt: skip

    def score(self, model, params, data, loss_fn=None) -> Scores:
        inv = self.inverse(model, params, data, loss_fn)
        diag, alive = inv.diag(), inv.alive()
        scores = Scores()
        for n, p in params.items():
            w = p.detach().to(diag[n].dtype)
            s = w.square() / (2 * diag[n].to(w.device))
            scores[n] = torch.where(alive[n].to(w.device), s, 0).to(torch.float32)
        scores.extra["obs"] = inv
        scores.cost.samples = inv.samples
        scores.cost.backward_passes = inv.backward_passes
        return scores

    def apply_update(self, model, params, masks, scores) -> None:
        """Joint OBS update of the weights kept, for the weights pruned since scoring (in place);
        every pruned weight ends exactly zero. ``scores`` must come from this criterion on the
        same weights (e.g. the same model, or a copy of it as sweeps do)."""
        if set(params) - set(masks):
            raise ValueError(f"params {sorted(set(params) - set(masks))[:5]} have no mask")
        if not self.update:  # mask only
            with torch.no_grad():
                for n, p in params.items():
                    p.masked_fill_(~masks[n].to(p.device).bool(), 0.0)
            return
        inv = getattr(scores, "extra", {}).get("obs")
        if not isinstance(inv, inverse_fisher.InverseCurvature):
            raise ValueError(
                "scores hold no OBS inverse curvature (scores.extra['obs']): pass the scores "
                "returned by the 'obs' criterion's score()"
            )
        covered = {n for b in inv.blocks for n in b.names}
        missing = sorted(set(params) - covered)
        if missing:
            raise ValueError(
                f"params {missing[:5]} have no OBS inverse in these scores: score, allocate and "
                "update the same parameters"
            )
        _check_same_state(inv, params)
        with torch.no_grad():
            for blk in inv.blocks:
                if not set(blk.names) <= set(params):
                    raise ValueError(f"OBS block over {blk.names} needs all of them in params")
                keep = blk.flatten({n: masks[n].bool() for n in blk.names}).bool()
                w = blk.flatten(params, torch.float64)
                w = torch.where(keep, w + _obs_delta(blk.Hinv, w, blk.alive & ~keep), 0.0)
                for n, v in blk.unflatten(w).items():
                    p = params[n]
                    p.copy_(torch.where(masks[n].to(p.device).bool(), v.to(p), 0))


def _obs_delta(Hinv: torch.Tensor, w: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """``dw = -Hinv[:, Q] (Hinv[Q, Q])^-1 w_Q`` per block, batched over blocks with any Q:
    ``A = P Hinv P + (I - P)`` (P the 0/1 diagonal of Q) makes every block a full-size SPD
    system ``A z = P w`` whose solution is zero off Q, so ``dw = -Hinv z``. In float64."""
    dw = torch.zeros_like(w)
    rows = Q.any(1).nonzero().squeeze(1)
    if len(rows) == 0:
        return dw
    H = Hinv[rows].to(torch.float64)
    q = Q[rows].to(torch.float64)
    A = H * (q[:, :, None] * q[:, None, :]) + torch.diag_embed(1.0 - q)
    L, info = torch.linalg.cholesky_ex(A)
    if bool((info != 0).any()):  # rounding made a sub-block indefinite: fall back to LU
        z = torch.linalg.solve(A, (w[rows] * q).unsqueeze(-1))
    else:
        z = torch.cholesky_solve((w[rows] * q).unsqueeze(-1), L)
    dw[rows] = -(H @ z).squeeze(-1)
    return dw


def _check_same_state(inv, params) -> None:
    for n, (s, s2) in inv.state.items():
        if n not in params:
            continue
        w = params[n].detach().double()
        now = (float(w.sum()), float(w.pow(2).sum()))
        if not (math.isclose(now[0], s, rel_tol=1e-5, abs_tol=1e-6 * (1 + abs(s2)) ** 0.5)
                and math.isclose(now[1], s2, rel_tol=1e-5)):  # fmt: skip
            raise ValueError(
                f"the weights of {n!r} changed since the OBS scores were computed: the update "
                "needs the inverse curvature of the current weights; score again"
            )
