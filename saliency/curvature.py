"""Diagonal curvature (Fisher, GGN, Hessian) for pruning criteria, from per-sample gradients.

Conventions (used by every function here and by the OBD/OBS criteria):

- ``l_n`` is sample n's own loss, ``loss_fn(f(x_n)[None], y_n[None])``; ``g_n = dl_n/dw`` is its
  gradient. With a mean-reduced ``loss_fn`` on a batch of B samples, ``g_n`` is B times that
  sample's contribution to the batch gradient, so sum- and mean-reduced losses give the same
  ``g_n`` (see ``saliency.per_sample``).
- Every curvature is a mean over the N samples read: ``F = (1/N) sum_n g_n g_n^T`` (empirical
  Fisher), ``G = (1/N) sum_n J_n^T H_n J_n`` (GGN, ``H_n`` the Hessian of ``l_n`` w.r.t. the
  outputs), ``H = (1/N) sum_n d^2 l_n / dw^2``. Only their diagonals are returned here.
- Per-sample quantities come from ``saliency.per_sample``: closed forms for ``nn.Linear`` and
  ``nn.Conv1d/2d`` from layer hooks, ``torch.func.vmap(grad(...))`` for other parameters, and
  several backward passes over one forward as one vmapped backward. ``.grad`` is never written
  (``torch.autograd.grad`` only; BackPACK works on a deep copy), ``requires_grad`` is restored.
- Models whose samples interact in the forward pass (BatchNorm in train mode) have no per-sample
  gradients: they raise a ValueError; put the model in ``eval()`` mode (running statistics) first.
"""

from __future__ import annotations

import copy
import warnings
from typing import Literal

import torch
from torch import Tensor, nn

from saliency import distributed, fastpaths
from saliency.activations import twice_differentiable
from saliency.model_io import (
    LossFn,
    _ce_settings,
    causal_lm_loss,
    check_loss,
    forward,
    iter_batches,
    loss_kind,
    loss_phi,
    model_device,
    per_sample_losses,
    resolve_loss,
    vmap_or_loop,
)
from saliency.per_sample import (
    accumulate,
    batched_dot,
    check_params,
    output_passes,
    requiring_grad,
)


class DiagCurvature(dict):
    """``dict[name, Tensor]`` of a curvature diagonal shaped like each parameter, plus what it
    cost: ``samples`` read and ``backward_passes`` (batched backward calls, each over one batch)."""

    def __init__(self, *args, samples: int = 0, backward_passes: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.samples = samples
        self.backward_passes = backward_passes


# ----------------------------------------------------------------------------- diagonal curvatures

Likelihood = Literal["auto", "categorical", "gaussian"]


def _setup(model, params, data, loss_fn, n_samples):
    """Checked arguments: (loss_fn, list of batches). Refuses models known to mix samples."""
    check_params(model, params)
    fastpaths.check_per_sample(model)
    if n_samples is not None and (not isinstance(n_samples, int) or n_samples < 1):
        raise ValueError(f"n_samples must be a positive int or None (all data); got {n_samples!r}")
    batches = list(iter_batches(data, n_samples, device=model_device(model)))
    loss_fn = resolve_loss(loss_fn, model, batches[0])
    check_loss(loss_fn, model, batches[0])
    return loss_fn, batches


def _summed_losses(model, batch, loss_fn) -> Tensor:
    """``sum_n l_n`` of a batch from one forward, after proving the samples do not interact."""
    fastpaths.probe(model, batch, ())
    return per_sample_losses(loss_fn, forward(model, batch), batch.targets).sum()


def _generator(seed: int, device: torch.device) -> torch.Generator:
    """Seeded from ``seed`` (on rank r > 0 of a distributed run, ``distributed.rank_seed``)."""
    if not isinstance(seed, int):
        raise TypeError(f"seed must be an int; got {seed!r}")
    return torch.Generator(device=device).manual_seed(distributed.rank_seed(seed))


def _finish(acc, params, N, passes, divide_by=1) -> DiagCurvature:
    """``sum / (N * divide_by)`` per parameter, sums and counts combined across ranks first."""
    if distributed.world() is not None:
        acc = distributed.all_reduce_dict({n: acc[n] if n in acc else torch.zeros_like(p)
                                           for n, p in params.items()})  # fmt: skip
        N, passes = distributed.sum_counts(N, passes)
    out = DiagCurvature(samples=N, backward_passes=passes)
    for n, p in params.items():
        out[n] = (acc[n] / (N * divide_by)).to(p.dtype) if n in acc else torch.zeros_like(p)
    return out


def _gaussian_scale(loss_fn: LossFn, out: Tensor) -> float:
    """``c`` such that ``loss_fn(f, y) = c ||f - y||^2`` for one sample; refuses other losses."""
    o = out[:1].detach()
    e = torch.zeros_like(o)
    e.view(-1)[0] = 1.0
    e2 = torch.zeros_like(o)
    e2.view(-1)[-1] = 1.0
    try:
        c = float(loss_fn(o + e, o))
        ok = c > 0 and abs(float(loss_fn(o + 2 * e, o)) - 4 * c) <= 1e-4 * c
        ok = ok and abs(float(loss_fn(o + e2, o)) - c) <= 1e-4 * c
        ok = ok and abs(float(loss_fn(o, o))) <= 1e-6
    except ValueError:  # e.g. the default cross-entropy refuses real-valued targets
        ok = False
    if not ok:
        raise ValueError(
            "likelihood='gaussian' needs a squared-error loss_fn(f, y) = c ||f - y||^2 per sample "
            "(e.g. F.mse_loss); for classification losses use likelihood='categorical'"
        )
    return c


def _sample_targets(out: Tensor, y: Tensor, loss_fn, likelihood: str, gen) -> Tensor:
    """Targets drawn from the model's predictive distribution: labels ~ softmax over dim 1
    (categorical), or ``f + sigma eps`` with ``sigma^2 = 1 / (2c)`` (gaussian), so that
    ``exp(-loss_fn)`` is the likelihood and the expected Fisher is the GGN."""
    if likelihood == "auto":
        likelihood = "gaussian" if y.is_floating_point() else "categorical"
    if likelihood == "categorical" and loss_fn is causal_lm_loss:  # next token ~ softmax(f_t)
        p = torch.softmax(out[:, :-1].float(), dim=-1)
        draw = torch.multinomial(p.reshape(-1, p.shape[-1]), 1, generator=gen)
        draw = torch.cat([y[:, :1], draw.reshape(p.shape[:-1])], 1)
        return torch.where(y == -100, y, draw)  # padding stays out of the loss
    if likelihood == "categorical":
        if out.dim() < 2:
            raise ValueError(
                f"categorical sampling needs [N, C, ...] logits; got {tuple(out.shape)}"
            )
        p = torch.softmax(out.float(), dim=1).movedim(1, -1)
        draw = torch.multinomial(p.reshape(-1, p.shape[-1]), 1, generator=gen)
        draw = draw.reshape(p.shape[:-1])
        ce = _ce_settings(loss_fn)
        if ce is not None and not y.is_floating_point() and y.shape == draw.shape:
            draw = torch.where(y == ce["ignore_index"], y, draw)  # padding stays out of the loss
        return draw
    if likelihood == "gaussian":
        sigma = (2 * _gaussian_scale(loss_fn, out)) ** -0.5
        return out + sigma * torch.randn(
            out.shape, generator=gen, device=out.device, dtype=out.dtype
        )
    raise ValueError(f"likelihood must be 'auto', 'categorical' or 'gaussian'; got {likelihood!r}")


def diag_fisher(
    model: nn.Module,
    params: dict[str, Tensor],
    data,
    loss_fn: LossFn | None = None,
    *,
    kind: Literal["empirical", "true"] = "empirical",
    n_samples: int | None = None,
    mc_samples: int = 1,
    seed: int = 0,
    likelihood: Likelihood = "auto",
    chunk_size: int | None = 64,
) -> DiagCurvature:
    """Diagonal Fisher ``F = (1/N) sum_n g_n * g_n`` over the first ``n_samples`` of ``data``.

    ``kind="empirical"``: ``g_n`` is the gradient of sample n's own loss at its true label
    (the "empirical Fisher"; Martens 2020 discusses how it differs from the Fisher).
    ``kind="true"``: the Fisher of the model's predictive distribution,
    ``(1/N) sum_n E_{y ~ p(y|x_n)} [g_n(y)^2]``, estimated with ``mc_samples`` labels per sample drawn
    with ``seed``: categorical (softmax over dim 1) for integer targets, Gaussian ``N(f, 1/(2c))``
    for float targets with a squared-error loss ``c ||f - y||^2`` (``likelihood`` forces either).
    Scaling: ``g_n`` is the gradient of the per-sample loss, so ``F`` does not depend on the batch
    size or on the loss reduction. Sums of squares use the closed forms of ``sum_grad_squared``.
    The result carries ``samples`` and ``backward_passes`` (one per batch and MC sample).
    """
    if kind not in ("empirical", "true"):
        raise ValueError(f"kind must be 'empirical' or 'true'; got {kind!r}")
    if not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"mc_samples must be a positive int; got {mc_samples!r}")
    loss_fn, batches = _setup(model, params, data, loss_fn, n_samples)
    gen = _generator(seed, model_device(model))
    acc, N, passes = {}, 0, 0
    for batch in batches:
        y = batch.targets
        if kind == "empirical":
            make = lambda out, y=y: [y]
        else:
            make = lambda out, y=y: [
                _sample_targets(out, y, loss_fn, likelihood, gen) for _ in range(mc_samples)
            ]
        sq, p = output_passes(model, params, batch, loss_phi(loss_fn), make, chunk_size, "sq")
        for n, v in sq.items():
            accumulate(acc, n, v)
        N, passes = N + len(batch), passes + p
    return _finish(acc, params, N, passes, 1 if kind == "empirical" else mc_samples)


def _loss_hessian_sqrt(loss_fn, out: Tensor, y: Tensor) -> Tensor:
    """``S [B, D, D]`` with ``S_n S_n^T = H_n``, the Hessian of ``l_n`` w.r.t. the flattened
    output ``f_n``; columns with no curvature in any sample are dropped (CE: the constant one)."""
    out = out.detach()
    B, D = len(out), out[0].numel()
    kind = loss_kind(loss_fn)
    if kind == "ce" and out.dim() == 2:  # softmax cross-entropy: diag(p) - p p^T, any target
        p = torch.softmax(out, 1)
        H = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
        if not y.is_floating_point():  # an ignored target has no loss, hence no curvature
            H = H * (y != _ce_settings(loss_fn)["ignore_index"]).to(H.dtype)[:, None, None]
    elif kind in ("mse_mean", "mse_sum"):  # c ||f - y||^2: 2c I
        c = 1.0 / D if kind == "mse_mean" else 1.0
        return (2 * c) ** 0.5 * torch.eye(D, dtype=out.dtype, device=out.device).expand(B, D, D)
    else:
        phi = loss_phi(loss_fn)
        flat = lambda o, t: phi(o.reshape(out.shape[1:]), t)
        H = vmap_or_loop(torch.func.hessian(flat), out.reshape(B, -1), y)
    lam, V = torch.linalg.eigh(H)  # eigenvalues ascending
    lam = lam.clamp(min=0)
    tol = 100 * torch.finfo(lam.dtype).eps * float(lam.max().clamp(min=1e-30))
    keep = lam.max(0).values > tol
    return (V * lam.sqrt().unsqueeze(1))[:, :, keep]


def diag_ggn(
    model: nn.Module,
    params: dict[str, Tensor],
    data,
    loss_fn: LossFn | None = None,
    *,
    exact: bool = True,
    n_samples: int | None = None,
    mc_samples: int = 1,
    seed: int = 0,
    max_outputs: int = 1000,
    backend: Literal["auto", "backpack", "torch"] = "auto",
    chunk_size: int | None = 64,
) -> DiagCurvature:
    """Diagonal generalized Gauss-Newton ``G = (1/N) sum_n J_n^T H_n J_n`` (Schraudolph 2002),
    ``J_n`` the Jacobian of the outputs w.r.t. the weights, ``H_n`` the Hessian of ``l_n`` w.r.t.
    the outputs (any twice-differentiable ``loss_fn``: cross-entropy, MSE, ...).

    ``exact=True``: ``H_n = S_n S_n^T`` by eigendecomposition and one backward per column of
    ``S`` (``C - 1`` for C-class cross-entropy), ``G_qq = (1/N) sum_{n,k} (J_n^T s_nk)_q^2``, as
    BackPACK's ``DiagGGNExact`` does. ``exact=False``: ``mc_samples`` backwards of ``S_n eps``
    with Rademacher ``eps`` (unbiased, as ``DiagGGNMC``). Refuses more than ``max_outputs``
    outputs per sample in exact mode. ``backend``: in exact mode, ``"auto"`` uses BackPACK's
    ``DiagGGNExact`` (one extended backward per batch) where ``backpack_unsupported`` finds nothing
    against it, ``"torch"`` never does, ``"backpack"`` insists.

    For networks piecewise linear in their weights' inputs (ReLU, max-pool, no BatchNorm in train
    mode) with a loss convex in the outputs, the second-derivative term of the Hessian vanishes
    almost everywhere, so the exact Hessian diagonal equals this GGN diagonal.
    """
    if not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"mc_samples must be a positive int; got {mc_samples!r}")
    if backend not in ("auto", "backpack", "torch"):
        raise ValueError(f"backend must be 'auto', 'backpack' or 'torch'; got {backend!r}")
    loss_fn, batches = _setup(model, params, data, loss_fn, n_samples)
    if exact and backend != "torch":
        why = backpack_unsupported(model, loss_fn, batches)
        if backend == "backpack" and why:
            raise ValueError(f"backend='backpack' cannot be used: {why}")
        if why is None:
            return _backpack_diag(model, params, batches, loss_fn, "DiagGGNExact")
    gen = _generator(seed, model_device(model))
    acc, N, passes = {}, 0, 0
    for batch in batches:

        def make(out, y=batch.targets):
            if exact and out[0].numel() > max_outputs:
                raise ValueError(
                    f"diag_ggn(exact=True) needs one backward per output: {out[0].numel()} "
                    f"outputs per sample > max_outputs={max_outputs}; use exact=False (Monte Carlo)"
                )
            S = _loss_hessian_sqrt(loss_fn, out, y)
            if exact:
                return [S[:, :, k].reshape(out.shape) for k in range(S.shape[2])]
            ts = []
            for _ in range(mc_samples):
                eps = torch.randint(0, 2, S.shape[::2], generator=gen, device=S.device)
                ts.append(
                    torch.einsum("bij,bj->bi", S, 2.0 * eps.to(S.dtype) - 1).reshape(out.shape)
                )
            return ts

        sq, p = output_passes(model, params, batch, batched_dot, make, chunk_size, "sq")
        for n, v in sq.items():
            accumulate(acc, n, v)
        N, passes = N + len(batch), passes + p
    return _finish(acc, params, N, passes, 1 if exact else mc_samples)


def diag_hessian_hutchinson(
    model: nn.Module,
    params: dict[str, Tensor],
    data,
    loss_fn: LossFn | None = None,
    *,
    n_probes: int = 16,
    n_samples: int | None = None,
    seed: int = 0,
) -> DiagCurvature:
    """Hutchinson's estimate of the Hessian diagonal of ``(1/N) sum_n l_n``:
    ``diag(H) ~ (1/K) sum_k z_k * (H z_k)`` with ``K = n_probes`` Rademacher probes per batch
    (Bekas, Kokiopoulou & Saad 2007), ``H z`` by double backward.

    A fallback only: its variance is large (entries can come out negative), while the exact GGN
    diagonal costs about as much as a few probes. Cost per batch: one backward with
    ``create_graph`` plus one double-backward per probe (``backward_passes`` counts 1 + K).
    """
    if not isinstance(n_probes, int) or n_probes < 1:
        raise ValueError(f"n_probes must be a positive int; got {n_probes!r}")
    loss_fn, batches = _setup(model, params, data, loss_fn, n_samples)
    gen = _generator(seed, model_device(model))
    names = list(params)
    acc, N, passes = {}, 0, 0
    with requiring_grad(params), fastpaths.reference_kernels(), twice_differentiable(model):
        for batch in batches:
            L = _summed_losses(model, batch, loss_fn)
            g = torch.autograd.grad(
                L, [params[n] for n in names], create_graph=True, allow_unused=True
            )
            live = [
                (n, gi)
                for n, gi in zip(names, g, strict=True)
                if gi is not None and gi.requires_grad
            ]
            for _ in range(n_probes):
                zs = [
                    2.0
                    * torch.randint(0, 2, gi.shape, generator=gen, device=gi.device).to(gi.dtype)
                    - 1
                    for _, gi in live
                ]
                Hz = torch.autograd.grad(
                    [gi for _, gi in live],
                    [params[n] for n, _ in live],
                    grad_outputs=zs,
                    retain_graph=True,
                    allow_unused=True,
                )
                for (n, _), z, h in zip(live, zs, Hz, strict=True):
                    if h is not None:
                        accumulate(acc, n, z * h)
            N, passes = N + len(batch), passes + 1 + n_probes
    return _finish(acc, params, N, passes, n_probes)


# ----------------------------------------------------------------------------- exact diagonals


def backpack_unsupported(model: nn.Module, loss_fn: LossFn | None = None, batches=None):
    """Why BackPACK cannot be used here, or None (``saliency.fastpaths.backpack_reason``)."""
    return fastpaths.backpack_reason(model, loss_fn, batches)


def _backpack_diag(model, params, batches, loss_fn, extension: str) -> DiagCurvature:
    """Sum BackPACK's ``extension`` (DiagHessian, DiagGGNExact, SumGradSquared) over batches on a
    deep copy of the model (``extend`` adds hooks and attributes we must not leave behind)."""
    import backpack
    from backpack import extensions

    ext = getattr(extensions, extension)
    field = {
        "DiagHessian": "diag_h",
        "DiagGGNExact": "diag_ggn_exact",
        "SumGradSquared": "sum_grad_squared",
    }[extension]
    twin = backpack.extend(copy.deepcopy(model))
    tp = dict(twin.named_parameters())
    for n, p in tp.items():
        p.requires_grad_(n in params)
        p.grad = None
    acc, N, passes = {}, 0, 0
    with torch.enable_grad():
        for batch in batches:
            out = forward(twin, batch)
            lossmod, scale = fastpaths._backpack_loss_module(loss_fn, out)
            with backpack.backpack(ext()), warnings.catch_warnings():
                # BackPACK's module hooks warn when the inputs do not require grad: harmless here
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                backpack.extend(lossmod)(out, batch.targets).backward()
            for n in params:
                accumulate(acc, n, getattr(tp[n], field).detach() * scale)
                tp[n].grad = None
            N, passes = N + len(batch), passes + 1
    return _finish(acc, params, N, passes)


def _autograd_diag_hessian(model, params, batches, loss_fn, chunk_size) -> DiagCurvature:
    names = list(params)
    acc, N, passes = {}, 0, 0
    with requiring_grad(params), fastpaths.reference_kernels(), twice_differentiable(model):
        for batch in batches:
            L = _summed_losses(model, batch, loss_fn)
            g = torch.autograd.grad(
                L, [params[n] for n in names], create_graph=True, allow_unused=True
            )
            for n, gi in zip(names, g, strict=True):
                if gi is None or not gi.requires_grad:
                    continue  # the loss is linear (or constant) in this parameter
                P, p = gi.numel(), params[n]
                d = torch.empty(P, dtype=gi.dtype, device=gi.device)
                for i0 in range(0, P, chunk_size):
                    idx = torch.arange(i0, min(P, i0 + chunk_size), device=gi.device)
                    rows = torch.arange(len(idx), device=gi.device)
                    V = torch.zeros(len(idx), P, dtype=gi.dtype, device=gi.device)
                    V[rows, idx] = 1
                    h = _batched_hvp(gi, p, V.view(len(idx), *p.shape))
                    d[idx] = h.reshape(len(idx), P)[rows, idx]
                accumulate(acc, n, d.view_as(p))
                passes += P  # one Hessian-vector product per weight (vmapped in chunks)
            N = N + len(batch)
    return _finish(acc, params, N, passes)


def _batched_hvp(g: Tensor, p: Tensor, V: Tensor) -> Tensor:
    """``H v`` for every row v of ``V`` (``g`` the gradient w.r.t. ``p`` with its graph), vmapped;
    one at a time where an op of the double backward has no batching rule (the double backward
    of a depthwise convolution: "Batching rule not implemented for aten::is_nonzero")."""
    kw = {"retain_graph": True, "allow_unused": True, "materialize_grads": True}
    try:
        return torch.autograd.grad(g, p, grad_outputs=V, is_grads_batched=True, **kw)[0]
    except RuntimeError:
        return torch.stack([torch.autograd.grad(g, p, grad_outputs=v, **kw)[0] for v in V])


def diag_hessian_exact(
    model: nn.Module,
    params: dict[str, Tensor],
    data,
    loss_fn: LossFn | None = None,
    *,
    n_samples: int | None = None,
    backend: Literal["auto", "backpack", "autograd"] = "auto",
    max_params: int = 20_000,
    chunk_size: int = 256,
) -> DiagCurvature:
    """Exact Hessian diagonal ``H_qq`` of ``(1/N) sum_n l_n`` (per-sample losses, as everywhere).

    ``backend="backpack"``: BackPACK's ``DiagHessian`` (Dangel, Kunstner & Hennig 2020), one
    extended backward per batch, for ``nn.Sequential`` models of layers it supports and
    cross-entropy / MSE losses. ``backend="autograd"``: the reference, one Hessian-vector product
    per weight (double backward with ``is_grads_batched``, ``chunk_size`` rows at a time), refused
    above ``max_params`` weights because its cost grows with their number. ``"auto"`` takes
    BackPACK when it can and the autograd reference otherwise.

    For networks piecewise linear in their weights' inputs (ReLU, max-pool, no BatchNorm in
    train mode) with cross-entropy or MSE, the exact Hessian diagonal equals the GGN diagonal
    (``diag_ggn``), which is much cheaper: use that for large models.
    """
    if backend not in ("auto", "backpack", "autograd"):
        raise ValueError(f"backend must be 'auto', 'backpack' or 'autograd'; got {backend!r}")
    loss_fn, batches = _setup(model, params, data, loss_fn, n_samples)
    why = (
        backpack_unsupported(model, loss_fn, batches)
        if backend != "autograd"
        else "backend='autograd'"
    )
    if backend == "backpack" and why:
        raise ValueError(f"backend='backpack' cannot be used: {why}")
    if why is None:
        return _backpack_diag(model, params, batches, loss_fn, "DiagHessian")
    total = sum(p.numel() for p in params.values())
    if total > max_params:
        raise ValueError(
            f"the autograd Hessian diagonal needs one Hessian-vector product per weight: "
            f"{total:,} weights > max_params={max_params:,}. BackPACK cannot be used ({why}). "
            "Raise max_params if you can wait, or use diag_ggn (equal to the exact diagonal for "
            "piecewise-linear networks) or diag_hessian_hutchinson"
        )
    return _autograd_diag_hessian(model, params, batches, loss_fn, chunk_size)
