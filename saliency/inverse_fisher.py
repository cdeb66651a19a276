"""Block-diagonal inverse curvature for Optimal Brain Surgeon: WoodFisher and the exact Hessian.

WoodFisher (Singh & Alistarh 2020): every prunable tensor is flattened (row-major) and cut into
contiguous blocks of ``B`` weights (the last block padded); within block b the curvature is the
damped empirical Fisher

    F_b = lambda_b I + (1/m) sum_n g_{n,b} g_{n,b}^T,

``g_n`` the gradient of sample n's own loss (``saliency.per_sample.per_sample_grads``), m samples,
and ``Hinv_b = F_b^-1``. Two ways to invert, equal up to rounding:

- ``"cholesky"`` (default): accumulate ``G_b^T G_b`` with batched matmuls over chunks of samples,
  then one batched Cholesky factorization and a batched triangular inverse. Measured faster:
  ``benchmarks/bench_obs.py``, LeNet-300-100, m = 1000, B = 128, 2 shared CPUs: the inverse
  part 22-50x faster than the recursion, the whole OBS scoring pass 13-27x (by load).
- ``"woodbury"``: WoodFisher's rank-1 recursion ``Hinv <- Hinv - Hinv g g^T Hinv / (m + g^T Hinv g)``
  from ``Hinv = I / lambda``, one sample at a time (m sequential steps): the paper's reference.

Damping. ``lambda_b = damp * mean(diag(G_b^T G_b / m)) + damp_absolute``: relative to the mean of
the block's Fisher diagonal by default. Near zero training loss every g_n is tiny, and so is F;
a fixed small ``lambda`` then dominates it, ``Hinv ~ I / lambda``, and the OBS saliency
``w_q^2 / (2 [Hinv]_qq)`` silently becomes ``lambda w_q^2 / 2``: magnitude pruning. Relative
damping keeps the same conditioning whatever the loss scale. Blocks whose diagonal is all zero
(dead units) borrow their tensor's mean; the mean is floored relative to the curvature of all
targets (``saliency.negligible``).

Curvature of round-off. Weights whose Fisher (or Hessian) diagonal is negligible against the
mean over all targets (``saliency.negligible``: an attention key bias, a branch that does not
reach the loss) are decoupled like pruned ones (``alive`` False, unit diagonal): their saliency
is exactly 0 and the OBS update moves no other weight for them, on every machine.

Conditioning on the pruned. Weights not ``alive`` (already pruned: exactly zero, or masked by an
attached mask) get zero gradient columns and a unit diagonal, so each block inverse splits into
``(F_b[K, K])^-1`` on the alive set K and an identity on the rest: saliencies and OBS updates are
those of the problem restricted to the remaining weights, and pruned weights stay exactly zero.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from saliency import distributed, fastpaths, negligible, per_sample
from saliency.activations import twice_differentiable
from saliency.apply import attached_masks
from saliency.model_io import (
    Batch,
    LossFn,
    default_loss,
    forward,
    iter_batches,
    model_device,
    per_sample_losses,
    resolve_loss,
)

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class BlockInverse:
    """``Hinv [nb, B, B]`` over the concatenation of ``names`` (flattened, zero-padded to nb*B).

    ``alive [nb, B]`` marks the weights the inverse is conditioned on (False: pruned, padding, or
    of negligible curvature),
    ``damping [nb]`` the lambda added to each block."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    Hinv: Tensor
    alive: Tensor
    damping: Tensor
    first: int = 0
    sharded: bool = False

    @property
    def block_size(self) -> int:
        return self.Hinv.shape[-1]

    @property
    def rows(self) -> slice:
        """The blocks ``Hinv`` holds: all of them, or this rank's share when ``sharded`` (the
        blocks of a distributed run are split among ranks, each inverting its own)."""
        return slice(self.first, self.first + len(self.Hinv))

    def gather(self, part: Tensor) -> Tensor:
        """``[nb, ...]`` from each rank's ``[rows, ...]`` (itself when not sharded)."""
        if not self.sharded:
            return part
        return distributed.assemble(part, self.first, self.alive.shape[0])

    def flatten(self, tensors: Mapping[str, Tensor], dtype: torch.dtype | None = None) -> Tensor:
        """``[nb, B]`` view of ``tensors[name]`` for the names of this group, zero-padded."""
        flat = torch.cat([tensors[n].detach().reshape(-1) for n in self.names])
        if dtype is not None:
            flat = flat.to(dtype)
        nb, B = self.alive.shape
        flat = torch.nn.functional.pad(flat, (0, nb * B - flat.numel()))
        return flat.view(nb, B).to(self.Hinv.device)

    def unflatten(self, blocks: Tensor) -> dict[str, Tensor]:
        sizes = [math.prod(s) for s in self.shapes]
        parts = blocks.reshape(-1)[: sum(sizes)].split(sizes)
        return {n: p.view(s) for n, p, s in zip(self.names, parts, self.shapes, strict=True)}

    def diag(self) -> dict[str, Tensor]:
        """``[Hinv]_qq`` shaped like each parameter."""
        return self.unflatten(self.gather(torch.diagonal(self.Hinv, dim1=-2, dim2=-1)))


@dataclass
class InverseCurvature:
    """The groups of a block inverse (one per tensor for WoodFisher, one for the exact Hessian),
    with what it cost to estimate."""

    blocks: list[BlockInverse]
    samples: int = 0
    backward_passes: int = 0
    kind: str = "fisher"
    state: dict[str, tuple[float, float]] = field(default_factory=dict)

    def diag(self) -> dict[str, Tensor]:
        return {n: d for b in self.blocks for n, d in b.diag().items()}

    def alive(self) -> dict[str, Tensor]:
        return {n: a.bool() for b in self.blocks for n, a in b.unflatten(b.alive).items()}


def alive_masks(model: nn.Module, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """True where a weight is still free: nonzero and not pruned by a mask attached to ``model``.
    (A trained weight is never exactly zero by chance; pruned ones are zeroed by every path.)"""
    attached = attached_masks(model) or {}
    out = {}
    for n, p in params.items():
        a = p.detach() != 0
        if n in attached:
            a &= attached[n].to(a.device).bool()
        out[n] = a
    return out


def _fingerprint(params: Mapping[str, Tensor]) -> dict[str, tuple[float, float]]:
    return {
        n: (float(p.detach().double().sum()), float(p.detach().double().pow(2).sum()))
        for n, p in params.items()
    }


def _check(block_size, damp, damp_absolute, method, dtype, chunk_size) -> torch.dtype:
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int; got {block_size!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
    if not (damp >= 0 and damp_absolute >= 0 and math.isfinite(damp + damp_absolute)):
        raise ValueError(
            f"damp and damp_absolute must be finite and >= 0; got {damp!r}, {damp_absolute!r}"
        )
    if method not in ("cholesky", "woodbury"):
        raise ValueError(f"method must be 'cholesky' or 'woodbury'; got {method!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}; got {dtype!r}")
    return _DTYPES[dtype]


def _damping(
    diag_sum: Tensor,
    alive: Tensor,
    m: int,
    damp: float,
    damp_absolute: float,
    scope: str = "layer",
    scale: float = 0.0,
) -> Tensor:
    """Per-block lambda ``[nb]`` from the Fisher diagonal sums ``[nb, B]`` (alive entries only):
    ``damp`` times the mean diagonal of the whole tensor (``scope="layer"``) or of each block
    (``"block"``; blocks whose diagonal is all zero borrow the tensor's mean), plus
    ``damp_absolute``. Means are floored at ``NULL_RTOL * scale`` (``saliency.negligible``)."""
    whole = negligible.floored((diag_sum * alive).sum() / (m * alive.sum().clamp(min=1)), scale)
    if scope == "layer":
        return (damp * whole + damp_absolute).expand(len(diag_sum)).clone()
    count = alive.sum(1).clamp(min=1)
    mean = (diag_sum * alive).sum(1) / (m * count)
    mean = torch.where(mean > 0, mean, whole)  # dead blocks borrow the tensor's mean
    return damp * negligible.floored(mean, scale) + damp_absolute


def _pairs(T: Tensor, n: int, row: int, col: int) -> Tensor:
    """``[k, B/(2n), n, n]`` strided view of the n x n blocks of ``T [k, B, B]`` at rows
    ``2in + row``, columns ``2in + col`` (no copy)."""
    k, B, _ = T.shape
    s0, s1, s2 = T.stride()
    shape, stride = (k, B // (2 * n), n, n), (s0, 2 * n * (s1 + s2), s1, s2)
    return T.as_strided(shape, stride, T.storage_offset() + row * s1 + col * s2)


def _tri_inv(L: Tensor) -> Tensor:
    """Inverse of a batch of lower-triangular ``[k, B, B]`` (B a power of two), bottom-up over
    2x2 block levels, ``[[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]]``, every level
    one batched matmul over strided views: no per-matrix LAPACK call (MKL's ``potri``/``trsm``,
    which ``cholesky_inverse`` uses, were 10-25x slower on a busy 2-core machine)."""
    Linv = torch.zeros_like(L)
    Linv.diagonal(dim1=-2, dim2=-1).copy_(L.diagonal(dim1=-2, dim2=-1).reciprocal())
    n = 1
    while n < L.shape[-1]:
        A, D, C = _pairs(Linv, n, 0, 0), _pairs(Linv, n, n, n), _pairs(L, n, n, 0)
        _pairs(Linv, n, n, 0).copy_(-(D @ C) @ A)
        n *= 2
    return Linv


def _invert(F: Tensor, name: str, hint: str) -> Tensor:
    """``F^-1`` of a batch of SPD blocks: Cholesky ``F = L L^T``, then ``L^-T L^-1``."""
    L, info = torch.linalg.cholesky_ex(F)
    if bool((info != 0).any()):
        raise ValueError(
            f"the damped curvature of {name!r} is not positive definite in "
            f"{int((info != 0).sum())} block(s): raise damp (relative) or damp_absolute, {hint}"
        )
    n = L.shape[-1]
    pad = (1 << (n - 1).bit_length()) - n  # to a power of two, with an identity block
    if pad:
        L = torch.nn.functional.pad(L, (0, pad, 0, pad))
        L.diagonal(dim1=-2, dim2=-1)[:, n:] = 1
    Linv = _tri_inv(L)[:, :n, :n]
    return Linv.mT @ Linv


def _shard(GtG: dict[str, Tensor], groups: dict[str, BlockInverse]) -> dict[str, Tensor]:
    """Distributed: sum the ``G^T G`` blocks over ranks, each rank receiving only its share of
    the blocks (contiguous over all tensors' blocks, as equal as can be), in place of ``GtG``;
    returns the summed diagonals of every block (the damping reads whole tensors)."""
    diag = distributed.all_reduce_dict(
        {n: torch.diagonal(G, dim1=1, dim2=2).clone() for n, G in GtG.items()}
    )
    rank = distributed.world()[0]
    shares, offset = distributed.shares(sum(len(G) for G in GtG.values())), 0
    for n in list(GtG):
        nb = len(GtG[n])
        ranges = [(min(max(lo - offset, 0), nb), min(max(hi - offset, 0), nb)) for lo, hi in shares]
        GtG[n] = distributed.reduce_rows(GtG.pop(n), ranges)
        groups[n].first, groups[n].sharded = ranges[rank][0], True
        offset += nb
    return diag


def _decouple_negligible(
    groups: Mapping[str, BlockInverse], diag_sums: Mapping[str, Tensor], m: int
) -> float:
    """Mark the weights of negligible Fisher diagonal not alive (``saliency.negligible``);
    returns the scale, the mean diagonal over all alive weights of all targets."""
    s = negligible.scale([diag_sums[n] / m for n in groups], [b.alive for b in groups.values()])
    for n, blk in groups.items():
        blk.alive &= ~negligible.negligible(diag_sums[n] / m, s).to(blk.alive.device)
    return s


def _read(data, n_samples, device) -> list[Batch]:
    return list(iter_batches(data, n_samples, device=device))


def block_inverse_fisher(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    data: Iterable,
    loss_fn: LossFn = default_loss,
    *,
    block_size: int = 128,
    n_samples: int | None = 1024,
    damp: float = 1e-2,
    damp_absolute: float = 0.0,
    damp_scope: Literal["layer", "block"] = "layer",
    method: Literal["cholesky", "woodbury"] = "cholesky",
    dtype: Literal["float32", "float64"] = "float32",
    chunk_size: int = 128,
    alive: Mapping[str, Tensor] | None = None,
) -> InverseCurvature:
    """WoodFisher block inverses ``(lambda_b I + (1/m) sum_n g_nb g_nb^T)^-1`` per tensor (module
    docstring). Per-sample gradients are materialized ``chunk_size`` samples at a time, so memory
    is ``chunk_size * total weights`` plus the blocks (``total weights * B``), in ``dtype``.
    ``alive`` (default :func:`alive_masks`) selects the weights the inverse is conditioned on.
    The model's mode, ``.grad``, hooks and ``requires_grad`` are left as they were."""
    dt = _check(block_size, damp, damp_absolute, method, dtype, chunk_size)
    if damp_scope not in ("layer", "block"):
        raise ValueError(f"damp_scope must be 'layer' or 'block'; got {damp_scope!r}")
    params = dict(params)
    alive = alive_masks(model, params) if alive is None else dict(alive)
    if method == "woodbury" and distributed.world() is not None:
        raise ValueError(
            "method='woodbury' is WoodFisher's recursion over the samples of one process; "
            "under torch.distributed use method='cholesky' (the same inverse up to rounding) "
            "or distributed=False"
        )
    batches = _read(data, n_samples, model_device(model))
    (m,) = distributed.sum_counts(sum(len(b) for b in batches))
    B = block_size
    groups = {}
    for n, p in params.items():
        nb = -(-p.numel() // B)
        # the empty Hinv placeholder fixes the device that flatten() moves blocks to
        a = BlockInverse(
            (n,),
            (p.shape,),
            torch.empty(0, device=p.device),
            torch.zeros(nb, B, dtype=torch.bool),
            None,
        )
        a.alive = a.flatten({n: alive[n].bool()}).bool()
        groups[n] = a

    bufs: dict[str, Tensor] = {}
    keep = {n: alive[n].reshape(1, -1).to(device=p.device, dtype=dt) for n, p in params.items()}

    def chunks():
        """Per chunk of samples: name -> ``[nb, c, B]`` masked gradients (a strided view of a
        zero-padded buffer reused across chunks: masking, casting and padding in one copy)."""
        for b in batches:
            for i in range(0, len(b), chunk_size):
                g = per_sample.per_sample_grads(model, params, b[i : i + chunk_size], None, loss_fn)
                out = {}
                for n, gn in g.items():
                    c, nb = len(gn), groups[n].alive.shape[0]
                    if n not in bufs or bufs[n].shape[0] < c:
                        bufs[n] = torch.zeros(c, nb * B, dtype=dt, device=gn.device)
                    buf = bufs[n][:c]
                    torch.mul(gn.reshape(c, -1), keep[n], out=buf[:, : keep[n].shape[1]])
                    out[n] = buf.view(c, nb, B).transpose(0, 1)
                yield out

    n_chunks = sum(-(-len(b) // chunk_size) for b in batches)
    if method == "cholesky":
        GtG = {
            n: torch.zeros(*groups[n].alive.shape, B, dtype=dt, device=p.device)
            for n, p in params.items()
        }
        for g in chunks():
            for n, Gb in g.items():
                GtG[n].baddbmm_(Gb.transpose(1, 2), Gb)
        bufs.clear()
        if distributed.world() is not None:
            diag_sums = _shard(GtG, groups)
        else:
            diag_sums = {n: torch.diagonal(G, dim1=1, dim2=2).clone() for n, G in GtG.items()}
        s = _decouple_negligible(groups, diag_sums, m)
        error = None
        for n, blk in groups.items():
            F = GtG.pop(n)
            F /= m
            a = blk.alive[blk.first : blk.first + len(F)].to(F.device)
            F *= a[:, :, None] & a[:, None, :]  # negligible rows and columns: exactly zero
            lam = _damping(diag_sums[n], blk.alive, m, damp, damp_absolute, damp_scope, s)
            d = torch.where(blk.alive, lam[:, None], torch.ones_like(lam)[:, None])
            F += torch.diag_embed(d[blk.first : blk.first + len(F)].to(dt))
            blk.damping = lam
            try:
                blk.Hinv = _invert(F, n, "or use more samples than the block size") if len(F) else F
            except ValueError as e:  # under sharding the other ranks must hear of it
                error, blk.Hinv = error or e, F
        distributed.raise_together(error)
    else:
        sq = {
            n: torch.zeros(blk.alive.shape, dtype=dt, device=params[n].device)
            for n, blk in groups.items()
        }
        for g in chunks():  # first pass: the diagonal, for the relative damping
            for n, gn in g.items():
                sq[n] += gn.pow(2).sum(1)
        s = _decouple_negligible(groups, sq, m)
        for n, blk in groups.items():  # the second pass leaves out the negligible weights
            keep[n] = blk.alive.reshape(1, -1)[:, : keep[n].shape[1]].to(keep[n])
            lam = _damping(sq[n], blk.alive, m, damp, damp_absolute, damp_scope, s)
            d = torch.where(blk.alive, lam[:, None], torch.ones_like(lam)[:, None])
            if bool((d <= 0).any()):
                raise ValueError(f"the Woodbury recursion needs lambda > 0; got 0 for {n!r}")
            blk.Hinv, blk.damping = torch.diag_embed(1.0 / d.to(dt)), lam
        for g in chunks():
            for n, gn in g.items():
                Hinv = groups[n].Hinv
                for gs in gn.unbind(1):  # one sample: [nb, B]
                    u = torch.bmm(Hinv, gs.unsqueeze(-1))  # [nb, B, 1]
                    denom = m + (gs.unsqueeze(1) @ u).squeeze(-1)  # [nb, 1]
                    Hinv.baddbmm_(u / denom[..., None], u.transpose(1, 2), alpha=-1)
    passes = n_chunks * (1 if method == "cholesky" else 2)  # Woodbury reads the gradients twice
    return InverseCurvature(list(groups.values()), m, passes, "fisher", _fingerprint(params))


def exact_inverse_hessian(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    data: Iterable,
    loss_fn: LossFn = default_loss,
    *,
    n_samples: int | None = 1024,
    damp: float = 0.0,
    damp_absolute: float = 0.0,
    dtype: Literal["float32", "float64"] = "float64",
    max_params: int = 4096,
    alive: Mapping[str, Tensor] | None = None,
) -> InverseCurvature:
    """Inverse of the full Hessian ``H = d^2 L / dw^2`` of the mean per-sample loss
    ``L = (1/m) sum_n l_n`` over ``n_samples``,
    jointly over all of ``params`` (one block, cross-tensor terms kept), by autograd, damped as
    ``H + (damp * mean(diag H) + damp_absolute) I``. The reference for small models: it refuses
    more than ``max_params`` weights (the Hessian has that number squared entries and costs one
    backward pass per weight). ``H`` must be positive definite on the alive weights (a minimum)."""
    dt = _check(1, damp, damp_absolute, "cholesky", dtype, 1)
    params = dict(params)
    total = sum(p.numel() for p in params.values())
    if total > max_params:
        raise ValueError(
            f"the exact Hessian of {total:,} weights is too large (max_params={max_params:,}): "
            "it holds total^2 entries and needs one backward pass per weight; use "
            "hessian='fisher' (block WoodFisher) or raise max_params"
        )
    alive = alive_masks(model, params) if alive is None else dict(alive)
    batches = _read(data, n_samples, model_device(model))
    (m,) = distributed.sum_counts(sum(len(b) for b in batches))
    names = tuple(params)
    dev = model_device(model)
    blk = BlockInverse(names, tuple(p.shape for p in params.values()), torch.empty(0, device=dev),
                       torch.zeros(1, total, dtype=torch.bool), None)  # fmt: skip
    blk.alive = blk.flatten(alive).bool()
    flat0 = blk.flatten(params, dt).reshape(-1).detach()

    fastpaths.check_per_sample(model)
    loss_fn = resolve_loss(loss_fn, model, batches[0])
    for b in batches:
        fastpaths.probe(model, b, ())  # refuses models whose samples interact
    others = {n: p.detach() for n, p in model.named_parameters() if n not in params}

    def loss_of(flat: Tensor) -> Tensor:
        ws = blk.unflatten(flat)
        out = 0
        values = {**others, **{n: ws[n].to(params[n].dtype) for n in names}}
        with per_sample.replaced_parameters(model, values):
            for b in batches:
                out = out + per_sample_losses(loss_fn, forward(model, b), b.targets).sum().to(dt)
        return out / m

    with fastpaths.reference_kernels(), twice_differentiable(model):
        H = torch.autograd.functional.hessian(loss_of, flat0).to(dt)
    H = distributed.all_reduce_sum(H)  # this rank's share of the mean: the sum over ranks
    a = blk.alive[0]
    s = negligible.scale([torch.diagonal(H)], [a])  # rows of round-off: decoupled as pruned
    a &= ~negligible.negligible((H * a[None, :]).abs().amax(1), s, negligible.SECOND_DERIVATIVES)
    H = H * (a[:, None] & a[None, :])
    lam = _damping(torch.diagonal(H)[None] * m, blk.alive, m, damp, damp_absolute, "layer", s)
    H = H + torch.diag(torch.where(a, lam, torch.ones_like(lam)))
    blk.Hinv, blk.damping = _invert(H[None], "+".join(names), "or reach a minimum first"), lam
    return InverseCurvature([blk], m, total, "exact", _fingerprint(params))
