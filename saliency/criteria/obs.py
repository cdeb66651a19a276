"""Optimal Brain Surgeon (Hassibi & Stork 1993) on block inverse curvature (WoodFisher)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from saliency import distributed, inverse_fisher, kfac
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
    (``hessian="exact"``, up to ``max_params`` weights), or K-FAC's Kronecker factors per layer
    (``hessian="kfac"``, ``saliency.kfac``). See ``saliency.inverse_fisher`` for the damping:
    ``damp`` is relative to the mean curvature diagonal of each layer (``damp_scope="layer"``, the
    default; ``"block"``: of each block, WoodFisher's convention, which left blocks over inputs
    that are almost always zero undamped) (default 1e-2 for the Fisher and K-FAC, **0 for the
    exact Hessian**, which is then refused with a clear error if it is not positive definite: pass
    ``damp`` to damp it), ``damp_absolute`` is added as is.

    ``selection="greedy"`` (the default for the Fisher blocks and K-FAC) scores each weight by
    the joint cost of removing it together with the cheaper ones of its block, along the greedy
    OBS order (``greedy_scores``; for K-FAC on each output row's block of the inverse), so that a
    global threshold does not take thousands of weights that each look cheap alone;
    ``"single"`` keeps the one-weight saliency above (the default for the exact Hessian).

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

    hessian: Literal["fisher", "exact", "kfac"] = "fisher"
    block_size: int = 128
    n_samples: int | None = 1024
    damp: float | None = None
    damp_absolute: float = 0.0
    damp_scope: Literal["layer", "block"] = "layer"
    dtype: Literal["float32", "float64"] = "float32"
    method: Literal["cholesky", "woodbury"] = "cholesky"
    update: bool = True
    selection: Literal["single", "greedy"] | None = None
    recompute_steps: int = 1
    fisher: Literal["empirical", "true"] = "empirical"
    mc_samples: int = 1
    seed: int = 0
    eval_mode: bool = True
    chunk_size: int = 128
    max_params: int = 4096

    def __post_init__(self) -> None:
        if self.hessian not in ("fisher", "exact", "kfac"):
            raise ValueError(f"hessian must be 'fisher', 'exact' or 'kfac'; got {self.hessian!r}")
        if self.fisher not in ("empirical", "true"):
            raise ValueError(f"fisher must be 'empirical' or 'true'; got {self.fisher!r}")
        if self.selection not in (None, "single", "greedy"):
            raise ValueError(f"selection must be 'single' or 'greedy'; got {self.selection!r}")
        if self.damp_scope not in ("layer", "block"):
            raise ValueError(f"damp_scope must be 'layer' or 'block'; got {self.damp_scope!r}")
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

    @property
    def selection_rule(self) -> str:
        """``selection``, or its default: ``"greedy"`` for the Fisher blocks and K-FAC (there on
        each output row's block of the K-FAC inverse); ``"single"`` for ``hessian="exact"``
        (one block over all weights: the greedy pass would cost ``P^3``)."""
        if self.selection is not None:
            return self.selection
        return "single" if self.hessian == "exact" else "greedy"

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
            if self.hessian == "kfac":
                kw.pop("dtype")
                return kfac.kfac_factors(
                    model, params, data, loss_fn, fisher=self.fisher, mc_samples=self.mc_samples,
                    seed=self.seed, **kw,
                )  # fmt: skip
            if self.hessian == "exact":
                return inverse_fisher.exact_inverse_hessian(
                    model, params, data, loss_fn, max_params=self.max_params, **kw
                )
            return inverse_fisher.block_inverse_fisher(
                model, params, data, loss_fn, block_size=self.block_size, method=self.method,
                chunk_size=self.chunk_size, damp_scope=self.damp_scope, **kw,
            )  # fmt: skip

    def score(self, model, params, data, loss_fn=None) -> Scores:
        inv = self.inverse(model, params, data, loss_fn)
        scores = Scores()
        if isinstance(inv, kfac.KFAC):
            for n, p in params.items():
                f, w = inv.factors[n], p.detach().to(torch.float64)
                live = f.from_matrix(f.live_mask()).to(w.device) & (w != 0)
                if self.selection_rule == "greedy":  # per output row, its block of the inverse
                    rows = f.as_matrix(w)
                    s = f.from_matrix(greedy_scores(f.row_inverse, rows, f.as_matrix(live).bool()))
                else:
                    s = w.square() / (2 * f.inv_diag().to(w.device))
                scores[n] = torch.where(live, s, 0).to(torch.float32)
        elif self.selection_rule == "greedy":
            for blk in inv.blocks:  # each rank its own share of the blocks when sharded
                r = blk.rows
                w = blk.flatten(params, torch.float64)
                g = blk.gather(greedy_scores(blk.Hinv, w[r], blk.alive[r]))
                for n, v in blk.unflatten(g).items():
                    scores[n] = v.to(torch.float32).to(params[n].device)
        else:
            diag, alive = inv.diag(), inv.alive()
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
        if isinstance(inv, kfac.KFAC):
            _kfac_update(inv, params, masks)
            return
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
                r = blk.rows  # each rank updates its own share of the blocks when sharded
                keep = blk.flatten({n: masks[n].bool() for n in blk.names}).bool()[r]
                w = blk.flatten(params, torch.float64)[r]
                w = torch.where(keep, w + _obs_delta(blk.Hinv, w, blk.alive[r] & ~keep), 0.0)
                for n, v in blk.unflatten(blk.gather(w)).items():
                    p = params[n]
                    p.copy_(torch.where(masks[n].to(p.device).bool(), v.to(p), 0))

    def loss_predictions(self, weights, masks, scores) -> dict[str, float]:
        """The quadratic model's loss increase for pruning the scored ``weights`` (before the
        update) to ``masks``: "joint" and "single", as :func:`predicted_increase` defines them."""
        return predicted_increase(scores.extra["obs"], weights, masks)


def _kfac_update(inv, params, masks) -> None:
    missing = sorted(set(params) - set(inv.factors))
    if missing:
        raise ValueError(f"params {missing[:5]} have no K-FAC factors in these scores")
    _check_same_state(inv, params)
    with torch.no_grad():
        for n, p in params.items():
            keep = masks[n].to(p.device).bool() & (p != 0)
            p.copy_(kfac.masked_solve(inv.factors[n], p.detach(), keep).to(p))


def greedy_scores(Hinv, w: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """Joint OBS costs along the greedy removal order within each block, ``[nb, B]``.

    Per block, repeatedly remove the alive weight of least saliency ``w_q^2 / (2 [Hinv]_qq)``,
    apply its OBS update ``w <- w - Hinv[:, q] w_q / [Hinv]_qq`` and condition the inverse on the
    removal, ``Hinv <- Hinv - Hinv[:, q] Hinv[q, :] / [Hinv]_qq`` (Hassibi & Stork 1993, eq. 5;
    the sequential form of OBC, Frantar & Alistarh 2022). The saliency of step t is then the
    exact increase of the quadratic model ``1/2 w_Q^T (Hinv_QQ)^-1 w_Q`` from the first t-1
    removals to the first t, so removal costs add up jointly instead of as if each weight were
    removed alone. A weight's score is the running maximum of those increments up to its step:
    non-decreasing along the order, so any global threshold removes a greedy prefix of every
    block. Not-alive weights score 0. In float64. ``Hinv`` is ``[nb, B, B]``, or a function
    of a slice of blocks returning theirs (K-FAC builds its row blocks on demand)."""
    out = torch.zeros(w.shape, dtype=torch.float64, device=w.device)
    # chunks of blocks small enough to stay in cache over all B steps: one pass over the whole
    # [nb, B, B] inverse per step, with its outer-product temporary, was 5x slower (page faults)
    step = max(1, (1 << 19) // (w.shape[1] ** 2))
    for i in range(0, w.shape[0], step):
        block = slice(i, i + step)
        inv = Hinv(block) if callable(Hinv) else Hinv[block]
        out[block] = _greedy_chunk(inv, w[block], alive[block])
    return out


def _greedy_chunk(Hinv: torch.Tensor, w: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    H = Hinv.to(torch.float64).clone()
    w = w.to(torch.float64).clone()
    a = alive.clone()
    nb, B = w.shape
    out = torch.zeros(nb, B, dtype=torch.float64, device=w.device)
    run = torch.zeros(nb, dtype=torch.float64, device=w.device)
    rows = torch.arange(nb, device=w.device)
    for _ in range(B):
        live = a.any(1)
        if not bool(live.any()):
            break
        d = torch.diagonal(H, dim1=1, dim2=2)
        s = torch.where(a, w.square() / (2 * d.clamp(min=1e-300)), torch.inf)
        q = s.argmin(1)
        run = torch.where(live, torch.maximum(run, s[rows, q]), run)
        out[rows[live], q[live]] = run[live]
        hq = H[rows, :, q] * live[:, None]  # [nb, B], zero for finished blocks
        hqq = torch.where(live, d[rows, q], 1.0)
        w -= hq * (w[rows, q] / hqq)[:, None]
        H.baddbmm_(hq[:, :, None], (hq / hqq[:, None])[:, None, :], alpha=-1.0)  # in place
        w[rows[live], q[live]] = 0.0
        a[rows[live], q[live]] = False
    return out


def predicted_increase(inv, params, masks) -> dict[str, float]:
    """Loss increase the quadratic model predicts for pruning ``params`` to ``masks``, for the
    weights alive in ``inv``: ``"joint"``, ``sum_blocks 1/2 w_Q^T (Hinv_QQ)^-1 w_Q`` (the OBS
    update moves the kept weights; Hassibi & Stork 1993), and ``"single"``, the sum of the
    one-weight saliencies ``sum_q w_q^2 / (2 [Hinv]_qq)`` (as if each weight were removed
    alone; equal to the joint value only when the Q sub-block of ``Hinv`` is diagonal)."""
    joint = single = 0.0
    if isinstance(inv, kfac.KFAC):
        for n, f in inv.factors.items():
            w = params[n].detach().to(torch.float64)
            keep = masks[n].to(w.device).bool() & (w != 0)
            dw = kfac.masked_solve(f, w, keep) - w
            joint += 0.5 * float((dw * f.matvec(dw)).sum())
            single += float((w.square() / (2 * f.inv_diag()) * (w != 0) * ~keep).sum())
        return {"joint": joint, "single": single}
    shared = torch.zeros(2, dtype=torch.float64)  # sums over the blocks of a sharded inverse
    for blk in inv.blocks:
        r = blk.rows
        keep = blk.flatten({n: masks[n].bool() for n in blk.names}).bool()[r]
        w = blk.flatten(params, torch.float64)[r]
        Q = blk.alive[r] & ~keep
        z = _obs_z(blk.Hinv, w, Q)
        d = torch.diagonal(blk.Hinv, dim1=-2, dim2=-1).to(torch.float64)
        part = torch.stack([0.5 * (w * Q * z).sum(), (w.square() / (2 * d) * Q).sum()]).cpu()
        if blk.sharded:
            shared += part
        else:
            joint, single = joint + float(part[0]), single + float(part[1])
    if any(blk.sharded for blk in inv.blocks):
        shared = distributed.sum_shards(shared)
        joint, single = joint + float(shared[0]), single + float(shared[1])
    return {"joint": joint, "single": single}


def _obs_z(Hinv: torch.Tensor, w: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """``z = (Hinv[Q, Q])^-1 w_Q`` per block (zero off Q), batched as in :func:`_obs_delta`."""
    z = torch.zeros_like(w, dtype=torch.float64)
    rows = Q.any(1).nonzero().squeeze(1)
    if len(rows) == 0:
        return z
    H = Hinv[rows].to(torch.float64)
    q = Q[rows].to(torch.float64)
    A = H * (q[:, :, None] * q[:, None, :]) + torch.diag_embed(1.0 - q)
    L, info = torch.linalg.cholesky_ex(A)
    b = (w[rows].to(torch.float64) * q).unsqueeze(-1)
    if bool((info != 0).any()):  # rounding made a sub-block indefinite: fall back to LU
        z[rows] = torch.linalg.solve(A, b).squeeze(-1)
    else:
        z[rows] = torch.cholesky_solve(b, L).squeeze(-1)
    return z


def _obs_delta(Hinv: torch.Tensor, w: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """``dw = -Hinv[:, Q] (Hinv[Q, Q])^-1 w_Q`` per block, batched over blocks with any Q:
    ``A = P Hinv P + (I - P)`` (P the 0/1 diagonal of Q) makes every block a full-size SPD
    system ``A z = P w`` whose solution is zero off Q, so ``dw = -Hinv z``. In float64."""
    z = _obs_z(Hinv, w, Q)
    return -(Hinv.to(torch.float64) @ z.unsqueeze(-1)).squeeze(-1)


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
