"""Per-sample gradients and diagonal curvature (Fisher, GGN, Hessian) for pruning criteria.

Conventions (used by every function here and by the OBD/OBS criteria):

- ``l_n`` is sample n's own loss, ``loss_fn(f(x_n)[None], y_n[None])``; ``g_n = dl_n/dw`` is its
  gradient. With a mean-reduced ``loss_fn`` on a batch of B samples, ``g_n`` is B times that
  sample's contribution to the batch gradient. Per-sample losses come from ``reduction="none"``
  for cross-entropy and MSE and from ``torch.func.vmap`` over ``loss_fn`` otherwise (a loop over
  samples if it cannot be vmapped), so sum- and mean-reduced losses give the same ``g_n``.
- Every curvature is a mean over the N samples read: ``F = (1/N) sum_n g_n g_n^T`` (empirical
  Fisher), ``G = (1/N) sum_n J_n^T H_n J_n`` (GGN, ``H_n`` the Hessian of ``l_n`` w.r.t. the
  outputs), ``H = (1/N) sum_n d^2 l_n / dw^2``. Only their diagonals are returned here.
- Closed forms for ``nn.Linear`` (``g_n = sum_t delta_nt x_nt^T``) and ``nn.Conv1d/2d``
  (unfolded inputs) come from a forward hook on the layer input and a tensor hook on its output
  gradient ``delta``; every other parameter goes through ``torch.func.vmap(grad(...))`` over
  ``functional_call``, chunked. A hooked weight whose per-sample gradients do not sum to
  autograd's batch gradient (it is also used outside its layer, e.g. tied) falls back to that
  generic path. Several backward passes over one forward (GGN columns, Monte Carlo draws) run as
  one vmapped backward (``is_grads_batched``) unless a layer output is modified in place.
  Hooks are removed in ``finally`` blocks, ``.grad`` is never written (``torch.autograd.grad``
  only; BackPACK works on a deep copy), ``requires_grad`` is restored.
- Models whose samples interact in the forward pass (BatchNorm in train mode) have no per-sample
  gradients: they raise a ValueError; put the model in ``eval()`` mode (running statistics) first.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Literal

import torch
import torch.nn.functional as F_
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from saliency.criteria.base import default_loss, iter_batches, model_device

LossFn = Callable[[Tensor, Tensor], Tensor]
_CLOSED_FORM = (nn.Linear, nn.Conv1d, nn.Conv2d)
_BASE_FORWARD = {
    nn.Linear: nn.Linear.forward,
    nn.Conv1d: nn.Conv1d.forward,
    nn.Conv2d: nn.Conv2d.forward,
}


class DiagCurvature(dict):
    """``dict[name, Tensor]`` of a curvature diagonal shaped like each parameter, plus what it
    cost: ``samples`` read and ``backward_passes`` (batched backward calls, each over one batch)."""

    def __init__(self, *args, samples: int = 0, backward_passes: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.samples = samples
        self.backward_passes = backward_passes


# ----------------------------------------------------------------------------- checks and helpers


def check_per_sample(model: nn.Module) -> None:
    """Raise a ValueError if the model's forward pass mixes samples (BatchNorm in train mode)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise ValueError(
                f"module {name or type(m).__name__!r} is {type(m).__name__} in train mode: it mixes "
                "the samples of a batch, so per-sample gradients are undefined; call model.eval() "
                "before scoring (BatchNorm then uses its running statistics)"
            )


def _check_params(model: nn.Module, params: dict[str, Tensor]) -> None:
    if not isinstance(params, dict) or not params:
        raise ValueError("params must be a non-empty dict name -> parameter of the model")
    named = dict(model.named_parameters())
    for n, p in params.items():
        if n not in named or named[n] is not p:
            raise ValueError(
                f"params[{n!r}] is not the parameter of that name in model.named_parameters(); "
                "pass e.g. saliency.prunable_parameters(model)"
            )


@contextlib.contextmanager
def _requiring_grad(params: dict[str, Tensor]) -> Iterator[None]:
    saved = [(p, p.requires_grad) for p in params.values()]
    try:
        with torch.enable_grad():
            for p, _ in saved:
                p.requires_grad_(True)
            yield
    finally:
        for p, req in saved:
            p.requires_grad_(req)


def per_sample_losses(loss_fn: LossFn, out: Tensor, y: Tensor) -> Tensor:
    """``[B]`` vector of ``l_n = loss_fn(out[n:n+1], y[n:n+1])`` (vmapped; a loop if that fails)."""
    return _vmap_or_loop(_loss_phi(loss_fn), out, y)


def _split(model: nn.Module, params: dict[str, Tensor]):
    """Which parameters have a closed form: {module: {"weight"/"bias": name}}, and the rest."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for m in model.modules():
        for attr, p in m._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((m, attr))
    hooked: dict[nn.Module, dict[str, str]] = {}
    generic: list[str] = []
    for n, p in params.items():
        own = owners.get(id(p), [])
        if len(own) == 1:
            m, attr = own[0]
            base = next((c for c in _CLOSED_FORM if isinstance(m, c)), None)
            if (
                base is not None
                and type(m).forward is _BASE_FORWARD[base]
                and attr in ("weight", "bias")
            ):
                hooked.setdefault(m, {})[attr] = n
                continue
        generic.append(n)  # shared (tied) weights, other layers, custom forwards
    return hooked, generic


# ----------------------------------------------------------------------------- closed forms


def _unfold(m: nn.Module, x: Tensor) -> Tensor:
    """Conv input -> ``[B, C_in * prod(kernel), L]`` patches (padding mode honoured), ordered as
    ``F.unfold`` orders them. Built from strided views (``Tensor.unfold``) and one copy: on CPU
    this measured ~10x faster than ``F.unfold`` (im2col)."""
    pad = m._reversed_padding_repeated_twice
    if any(pad):
        x = F_.pad(x, pad, mode="constant" if m.padding_mode == "zeros" else m.padding_mode)
    p = x
    for dim, (k, d, s) in enumerate(zip(m.kernel_size, m.dilation, m.stride, strict=True), 2):
        p = p.unfold(dim, (k - 1) * d + 1, s)  # appends a window dim of size (k - 1) * d + 1
    if isinstance(m, nn.Conv1d):  # [B, C, L, k]
        p = p[..., :: m.dilation[0]].permute(0, 1, 3, 2)
    else:  # [B, C, H', W', kh, kw]
        p = p[..., :: m.dilation[0], :: m.dilation[1]].permute(0, 1, 4, 5, 2, 3)
    B, C = x.shape[:2]
    return p.reshape(B, C * math.prod(m.kernel_size), -1)


def _input_factor(m: nn.Module, x: Tensor) -> Tensor:
    """Per-sample input factor ``a``: ``[B, T, in]`` for Linear (T = product of extra dims),
    ``[B, G, in/G * k, L]`` unfolded patches for convolutions with G groups."""
    B = x.shape[0]
    if isinstance(m, nn.Linear):
        if x.dim() < 2:
            raise ValueError(f"{m} got unbatched input of shape {tuple(x.shape)}")
        return x.reshape(B, -1, x.shape[-1])
    if x.dim() != (3 if isinstance(m, nn.Conv1d) else 4):
        raise ValueError(
            f"{m} got input of shape {tuple(x.shape)}; per-sample gradients need a batch"
        )
    a = _unfold(m, x)
    return a.reshape(B, m.groups, a.shape[1] // m.groups, a.shape[2])


def _delta_factor(m: nn.Module, delta: Tensor) -> Tensor:
    """Output gradient as ``[B, T, out]`` (Linear) or ``[B, G, out/G, L]`` (convolutions), so
    that ``g_n = d_n^T a_n`` summed over T or L."""
    B = delta.shape[0]
    if isinstance(m, nn.Linear):
        return delta.reshape(B, -1, delta.shape[-1])
    return delta.reshape(B, m.groups, delta.shape[1] // m.groups, -1)


_CHUNK_ELEMENTS = 2**23  # per-chunk budget (elements) of per-sample gradients and patches


def _grads_from_factors(m: nn.Module, a: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """Materialized per-sample weight and bias gradients ``[B, *shape]``."""
    if isinstance(m, nn.Linear):
        return torch.einsum("bto,bti->boi", d, a), d.sum(1)
    gw = torch.matmul(d, a.transpose(-1, -2))  # [B, G, out/G, in/G * k]
    return gw.reshape(len(a), *m.weight.shape), d.sum(-1).reshape(len(a), -1)


def _layer_stats(m: nn.Module, pairs, want: str):
    """From the (input, output gradient) of each call of layer m in one backward pass:
    ``(w, b, w_sum, b_sum)`` with ``w, b`` the per-sample gradients ``[B, *shape]``
    (``want="grads"``) or ``sum_n g_n^2`` (``want="sq"``), and ``w_sum, b_sum = sum_n g_n`` to
    check against autograd (``w_sum`` is None when only a projection is cheap).

    ``sum_n g_n^2`` of a Linear layer on ``[B, in]`` inputs is one matmul ``(delta^2)^T (x^2)``;
    otherwise per-sample gradients are materialized a chunk of samples at a time (patches
    unfolded per chunk, so memory stays within ``_CHUNK_ELEMENTS``)."""
    x0 = pairs[0][0]
    K = len(pairs[0][1]) if pairs[0][1].dim() == x0.dim() + 1 else 0  # K vmapped passes
    if want == "sq" and isinstance(m, nn.Linear) and len(pairs) == 1 and x0.dim() == 2:
        d = pairs[0][1]
        d2 = d * d
        if K:  # sum_k sum_n d_kn^2 x_n^2 = (sum_k d_k^2)^T x^2
            d2, d = d2.sum(0), d.sum(0)
        return d2.T @ (x0 * x0), d2.sum(0), None, d.sum(0)
    if K:  # the K passes become K * B samples
        pairs = [
            (x.expand(K, *x.shape).reshape(K * len(x), *x.shape[1:]), d.flatten(0, 1))
            for x, d in pairs
        ]
        x0 = pairs[0][0]
    B = len(x0)
    patch = x0[0].numel() * (1 if isinstance(m, nn.Linear) else math.prod(m.kernel_size))
    chunk = max(1, min(B, _CHUNK_ELEMENTS // (m.weight.numel() + patch)))
    w, b, w_sum, b_sum = [], [], 0, 0
    for i in range(0, B, chunk):
        gw = gb = 0
        for x, d in pairs:
            a, dd = _input_factor(m, x[i : i + chunk]), _delta_factor(m, d[i : i + chunk])
            cw, cb = _grads_from_factors(m, a, dd)
            gw, gb = gw + cw, gb + cb
        w_sum, b_sum = w_sum + gw.sum(0), b_sum + gb.sum(0)
        if want == "sq":
            gw, gb = (gw * gw).sum(0), (gb * gb).sum(0)
        w.append(gw)
        b.append(gb)
    if want == "sq":
        return sum(w), sum(b), w_sum, b_sum
    return torch.cat(w), torch.cat(b), w_sum, b_sum


def _explains(m: nn.Module, pairs, stats, gw: Tensor | None, gb: Tensor | None) -> bool:
    """Do the hooked per-sample gradients sum to the batch gradient autograd found? They do not
    when the parameter is also used outside its layer's forward (``x @ layer.weight.T``
    elsewhere): then the caller falls back to the generic path."""
    if gw is None:
        return not pairs
    if not pairs:
        return False
    close = lambda u, v: torch.allclose(u, v, rtol=1e-3, atol=1e-5 * float(v.abs().max()) + 1e-12)
    _, _, w_sum, b_sum = stats
    if w_sum is None:  # Linear closed form: compare one random projection (sum_n g_n) r
        x, d = pairs[0]
        d = d.sum(0) if d.dim() == x.dim() + 1 else d
        r = torch.randn(x.shape[1], generator=torch.Generator().manual_seed(0), dtype=x.dtype)
        r = r.to(x.device)
        ok = close(d.T @ (x @ r), gw @ r)
    else:
        ok = close(w_sum.reshape(gw.shape), gw)
    return ok and (gb is None or close(b_sum.reshape(gb.shape), gb))


class _Capture:
    """Forward hooks storing each hooked layer's input and, through a tensor hook on its output,
    the output gradient of every backward pass (layers called several times are summed)."""

    def __init__(self, modules) -> None:
        self.modules = list(modules)
        self.inputs: dict[nn.Module, list[Tensor]] = {m: [] for m in self.modules}
        self.deltas: dict[nn.Module, dict[int, Tensor]] = {m: {} for m in self.modules}
        self.outputs: dict[nn.Module, list[tuple[Tensor, int]]] = {m: [] for m in self.modules}
        self.handles = []
        self.active = True

    def __enter__(self) -> _Capture:
        for m in self.modules:
            self.handles.append(m.register_forward_hook(self._forward))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _forward(self, m, inputs, out) -> None:
        i = len(self.inputs[m])
        self.inputs[m].append(inputs[0].detach())
        self.outputs[m].append((out, out._version))
        if out.requires_grad:
            # a tensor hook sees the gradient w.r.t. this value even if a later op is in-place
            out.register_hook(lambda g, m=m, i=i: self._store(m, i, g))

    def _store(self, m, i, g) -> None:
        if self.active:  # off during vmapped backward passes (their gradients are batched)
            self.deltas[m][i] = g.detach()

    def untouched_outputs(self) -> bool:
        """No layer output was modified in place after the layer (``relu_``): gradients taken
        w.r.t. the outputs themselves are then the layers' output gradients."""
        return all(o._version == v for outs in self.outputs.values() for o, v in outs)

    def terms(self, m: nn.Module) -> list[tuple[Tensor, Tensor]]:
        """(input, output gradient) of each call of layer m in the last backward pass."""
        ds, xs = self.deltas[m], self.inputs[m]
        pairs = [(xs[i], ds[i]) for i in range(len(xs)) if i in ds]
        ds.clear()
        return pairs


def _check_batch(x, y) -> None:
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(
            f"inputs and targets must be tensors; got {type(x).__name__} and {type(y).__name__}"
        )
    if len(x) != len(y):
        raise ValueError(f"inputs hold {len(x)} samples but targets hold {len(y)}")


def per_sample_grads(
    model: nn.Module,
    params: dict[str, Tensor],
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    *,
    chunk_size: int | None = 64,
) -> dict[str, Tensor]:
    """Materialized per-sample gradients ``g_n = dl_n/dw``, ``[N, *param.shape]`` per name.

    ``l_n = loss_fn(model(x)[n:n+1], y[n:n+1])`` is sample n's own loss (for a mean-reduced
    ``loss_fn`` on a batch of B, ``g_n`` is B times sample n's share of the batch gradient).
    Linear and Conv1d/2d layers use the closed form ``g_n = delta_n a_n^T`` from one batched
    forward and backward (``a_n`` the layer input, unfolded for convolutions; extra leading dims
    summed); other parameters use ``vmap(grad(...))`` in chunks of ``chunk_size`` samples.
    The model's mode, ``.grad``, hooks and ``requires_grad`` are left as they were.
    """
    _check_batch(x, y)
    grads, _ = _passes(model, params, x, _loss_phi(loss_fn), lambda out: [y], chunk_size, "grads")
    return grads


def sum_grad_squared(
    model: nn.Module,
    params: dict[str, Tensor],
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    *,
    chunk_size: int | None = 64,
) -> dict[str, Tensor]:
    """``sum_n g_n * g_n`` (elementwise) over the batch, shaped like each parameter.

    For ``nn.Linear`` on ``[B, in]`` inputs this is one matmul, ``(delta^2)^T (x^2)``, without
    materializing ``g_n``; convolutions and Linear layers on inputs with extra dims materialize
    ``g_n`` a memory-bounded chunk of samples at a time; other parameters go through
    ``vmap(grad)``, ``chunk_size`` samples at a time.
    """
    _check_batch(x, y)
    sq, _ = _passes(model, params, x, _loss_phi(loss_fn), lambda out: [y], chunk_size, "sq")
    return sq


def _loss_kind(loss_fn: LossFn) -> str | None:
    """ "ce", "mse_mean", "mse_sum" for the losses with closed forms here, else None."""
    if loss_fn in (default_loss, F_.cross_entropy) or (
        type(loss_fn) is nn.CrossEntropyLoss and loss_fn.weight is None and loss_fn.ignore_index < 0
    ):
        return "ce"
    if loss_fn is F_.mse_loss or (type(loss_fn) is nn.MSELoss and loss_fn.reduction == "mean"):
        return "mse_mean"
    if type(loss_fn) is nn.MSELoss and loss_fn.reduction == "sum":
        return "mse_sum"
    return None


def _fast_losses(loss_fn: LossFn):
    """Batched per-sample losses for the common losses (equal to ``loss_fn`` on one sample,
    whatever its reduction), or None: vmap works for any loss but costs milliseconds per call."""
    kind = _loss_kind(loss_fn)
    if kind == "ce":
        eps = getattr(loss_fn, "label_smoothing", 0.0)
        return lambda o, t: (
            F_.cross_entropy(o, t, reduction="none", label_smoothing=eps)
            .reshape(len(o), -1)
            .mean(1)
        )
    if kind is not None:
        per = "mean" if kind == "mse_mean" else "sum"
        return lambda o, t: getattr(F_.mse_loss(o, t, reduction="none").reshape(len(o), -1), per)(1)
    return None


def _loss_phi(loss_fn: LossFn) -> Callable[[Tensor, Tensor], Tensor]:
    phi = lambda o, t: loss_fn(o.unsqueeze(0), t.unsqueeze(0))
    phi.batched = _fast_losses(loss_fn)
    return phi


def _dot(o: Tensor, t: Tensor) -> Tensor:
    return (o * t).sum()


_dot.batched = lambda out, t: (out * t).reshape(len(out), -1).sum(1)


def _vmap_or_loop(phi, out: Tensor, t: Tensor) -> Tensor:
    """``[phi(out[n], t[n]) for n]``, batched when ``phi.batched`` exists, else vmapped."""
    if getattr(phi, "batched", None) is not None:
        return phi.batched(out, t)
    try:
        return vmap(phi)(out, t)
    except Exception:  # functions that vmap cannot trace (data-dependent control flow)
        return torch.stack([phi(out[i], t[i]) for i in range(len(out))])


def _passes(model, params, x, phi, make_targets, chunk_size, want):
    """One forward, then one backward per target tensor ``t`` from ``make_targets(outputs)``:
    per-sample gradients ``d phi(f(x_n), t_n) / dw`` either materialized (``want="grads"``, one
    target) or squared and summed over samples and targets (``want="sq"``).
    Returns (dict name -> tensor, number of batched backward passes)."""
    _check_params(model, params)
    check_per_sample(model)
    hooked, generic = _split(model, params)
    acc: dict[str, Tensor] = {}
    passes = 0
    with _requiring_grad(params):
        with _Capture(hooked) as cap:
            out = model(x)
        if not isinstance(out, Tensor):
            raise TypeError(f"the model must return one tensor; got {type(out).__name__}")
        targets = list(make_targets(out.detach()))
        hp = [params[n] for names in hooked.values() for n in names.values()]
        untouched = bool(hooked) and cap.untouched_outputs()
        sole = untouched and _sole_uses(out, hooked, cap)
        batched = untouched and (sole or len(targets) > 1)
        if batched:  # backward to the layer outputs only; K passes vmapped into one
            passes += len(targets)
            _from_outputs(cap, hooked, generic, acc, out, phi, targets, [] if sole else hp, want)
        for k, t in enumerate(targets):
            if hooked and not batched:
                s = _vmap_or_loop(phi, out, t).sum()
                g = torch.autograd.grad(s, hp, retain_graph=k + 1 < len(targets), allow_unused=True)
                batch = dict(zip((id(p) for p in hp), g, strict=True))
                passes += 1
                for m in list(hooked):
                    pairs = cap.terms(m)
                    names = hooked[m]
                    gw, gb = (batch.get(id(m._parameters[a])) for a in ("weight", "bias"))
                    stats = _layer_stats(m, pairs, want) if pairs else None
                    if not _explains(m, pairs, stats, gw, gb if "bias" in names else None):
                        generic += list(hooked.pop(m).values())  # fall back to the generic path
                        continue
                    for attr, n in names.items():
                        if stats is not None:
                            _add(acc, n, stats[0] if attr == "weight" else stats[1])
            if generic:
                for n, g in _generic_phi_grads(
                    model, params, generic, x, t, phi, chunk_size
                ).items():
                    _add(acc, n, g if want == "grads" else g.pow(2).sum(0))
                passes += 1
    return {
        n: acc[n].to(p.dtype) if n in acc else _zeros(p, len(x), want) for n, p in params.items()
    }, passes


def _sole_uses(out: Tensor, hooked, cap) -> bool:
    """Is each hooked parameter used by its own layer's calls and nowhere else in the graph of
    ``out``? Counted as edges into its AccumulateGrad node (one per call of the layer). Then the
    hooked per-sample gradients are complete without checking them against autograd's."""
    if out.grad_fn is None:
        return False
    uses: dict[int, int] = {}
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            var = getattr(nxt, "variable", None)
            if var is not None:
                uses[id(var)] = uses.get(id(var), 0) + 1
            else:
                stack.append(nxt)
    for m, names in hooked.items():
        calls = sum(o.requires_grad for o, _ in cap.outputs[m])
        if any(uses.get(id(m._parameters[a]), 0) != calls for a in names):
            return False
    return True


def _from_outputs(cap, hooked, generic, acc, out, phi, targets, hp, want) -> None:
    """Backward w.r.t. the captured layer outputs themselves (no weight-gradient matmuls; all K
    targets in one ``is_grads_batched`` backward, like BackPACK's matrix backpropagation).
    With ``hp`` (parameters) the batch gradients are also taken, to check the hooked ones."""
    if phi is _dot:  # d/df sum_n <f_n, t_n> = t
        G = torch.stack(targets)
    else:
        o = out.detach().requires_grad_()
        G = torch.stack(
            [torch.autograd.grad(_vmap_or_loop(phi, o, t).sum(), o)[0] for t in targets]
        )
    outs = [(m, i, o) for m in hooked for i, (o, _) in enumerate(cap.outputs[m]) if o.requires_grad]
    if not outs:
        return
    K = len(targets)
    cap.active = False
    try:
        res = torch.autograd.grad(
            out, [o for _, _, o in outs] + hp, grad_outputs=G if K > 1 else G[0],
            is_grads_batched=K > 1, allow_unused=True,
        )  # fmt: skip
    finally:
        cap.active = True
    deltas = {(m, i): d for (m, i, _), d in zip(outs, res, strict=False)}
    batch = {
        id(p): None if g is None else g.sum(0) if K > 1 else g
        for p, g in zip(hp, res[len(outs) :], strict=True)
    }
    for m in list(hooked):
        names = hooked[m]
        pairs = [
            (x, deltas[m, i]) for i, x in enumerate(cap.inputs[m]) if deltas.get((m, i)) is not None
        ]
        stats = _layer_stats(m, pairs, want) if pairs else None
        if hp:
            gw, gb = (batch.get(id(m._parameters[a])) for a in ("weight", "bias"))
            if not _explains(m, pairs, stats, gw, gb if "bias" in names else None):
                generic += list(hooked.pop(m).values())  # fall back to the generic path
                continue
        for attr, n in names.items():
            if stats is not None:
                _add(acc, n, stats[0] if attr == "weight" else stats[1])


def _zeros(p: Tensor, B: int, want: str) -> Tensor:
    return (
        torch.zeros(B, *p.shape, dtype=p.dtype, device=p.device)
        if want == "grads"
        else torch.zeros_like(p)
    )


def _add(acc: dict[str, Tensor], n: str, v: Tensor) -> None:
    acc[n] = acc[n] + v if n in acc else v


def _generic_phi_grads(model, params, names, x, t, phi, chunk_size) -> dict[str, Tensor]:
    """``vmap(grad(phi(f(x_n), t_n)))`` over ``functional_call``: per-sample gradients of any
    parameter, ``chunk_size`` samples at a time."""
    values = {n: params[n].detach() for n in names}

    def one(p, xn, tn):
        return phi(functional_call(model, p, (xn.unsqueeze(0),))[0], tn)

    return vmap(grad(one), in_dims=(None, 0, 0), chunk_size=chunk_size)(values, x, t)


# ----------------------------------------------------------------------------- diagonal curvatures

Likelihood = Literal["auto", "categorical", "gaussian"]


def _setup(model, params, data, loss_fn, n_samples):
    _check_params(model, params)
    check_per_sample(model)
    if n_samples is not None and (not isinstance(n_samples, int) or n_samples < 1):
        raise ValueError(f"n_samples must be a positive int or None (all data); got {n_samples!r}")
    loss_fn = default_loss if loss_fn is None else loss_fn
    return loss_fn, iter_batches(data, n_samples, device=model_device(model))


def _generator(seed: int, device: torch.device) -> torch.Generator:
    if not isinstance(seed, int):
        raise TypeError(f"seed must be an int; got {seed!r}")
    return torch.Generator(device=device).manual_seed(seed)


def _finish(acc, params, N, passes, divide_by=1) -> DiagCurvature:
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
    c = float(loss_fn(o + e, o))
    ok = c > 0 and abs(float(loss_fn(o + 2 * e, o)) - 4 * c) <= 1e-4 * c
    ok = ok and abs(float(loss_fn(o + e2, o)) - c) <= 1e-4 * c and abs(float(loss_fn(o, o))) <= 1e-6
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
    if likelihood == "categorical":
        if out.dim() < 2:
            raise ValueError(
                f"categorical sampling needs [N, C, ...] logits; got {tuple(out.shape)}"
            )
        p = torch.softmax(out.float(), dim=1).movedim(1, -1)
        draw = torch.multinomial(p.reshape(-1, p.shape[-1]), 1, generator=gen)
        return draw.reshape(p.shape[:-1])
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
    for x, y in batches:
        _check_batch(x, y)
        if kind == "empirical":
            make = lambda out, y=y: [y]
        else:
            make = lambda out, y=y: [
                _sample_targets(out, y, loss_fn, likelihood, gen) for _ in range(mc_samples)
            ]
        sq, p = _passes(model, params, x, _loss_phi(loss_fn), make, chunk_size, "sq")
        for n, v in sq.items():
            _add(acc, n, v)
        N, passes = N + len(x), passes + p
    return _finish(acc, params, N, passes, 1 if kind == "empirical" else mc_samples)


def _loss_hessian_sqrt(loss_fn, out: Tensor, y: Tensor) -> Tensor:
    """``S [B, D, D]`` with ``S_n S_n^T = H_n``, the Hessian of ``l_n`` w.r.t. the flattened
    output ``f_n``; columns with no curvature in any sample are dropped (CE: the constant one)."""
    out = out.detach()
    B, D = len(out), out[0].numel()
    kind = _loss_kind(loss_fn)
    if kind == "ce" and out.dim() == 2:  # softmax cross-entropy: diag(p) - p p^T, any target
        p = torch.softmax(out, 1)
        H = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    elif kind in ("mse_mean", "mse_sum"):  # c ||f - y||^2: 2c I
        c = 1.0 / D if kind == "mse_mean" else 1.0
        return (2 * c) ** 0.5 * torch.eye(D, dtype=out.dtype, device=out.device).expand(B, D, D)
    else:
        phi = _loss_phi(loss_fn)
        flat = lambda o, t: phi(o.reshape(out.shape[1:]), t)
        H = _vmap_or_loop(torch.func.hessian(flat), out.reshape(B, -1), y)
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
        why = backpack_unsupported(model, loss_fn)
        if backend == "backpack" and why:
            raise ValueError(f"backend='backpack' cannot be used: {why}")
        if why is None:
            return _backpack_diag(model, params, batches, loss_fn, "DiagGGNExact")
    gen = _generator(seed, model_device(model))
    acc, N, passes = {}, 0, 0
    for x, y in batches:
        _check_batch(x, y)

        def make(out, y=y):
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

        sq, p = _passes(model, params, x, _dot, make, chunk_size, "sq")
        for n, v in sq.items():
            _add(acc, n, v)
        N, passes = N + len(x), passes + p
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
    with _requiring_grad(params):
        for x, y in batches:
            _check_batch(x, y)
            L = per_sample_losses(loss_fn, model(x), y).sum()
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
                        _add(acc, n, z * h)
            N, passes = N + len(x), passes + 1 + n_probes
    return _finish(acc, params, N, passes, n_probes)


# ----------------------------------------------------------------------------- exact diagonals

_BACKPACK_LAYERS = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ReLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU,
    nn.ELU, nn.SELU, nn.LogSigmoid, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d,
    nn.AvgPool2d, nn.AvgPool3d, nn.Flatten, nn.Dropout, nn.ZeroPad2d,
)  # fmt: skip


def _backpack_loss(loss_fn, out: Tensor):
    """The BackPACK loss module (sum-reduced) and the factor turning its curvature into
    ``sum_n`` of the per-sample loss's, or None when ``loss_fn`` is not one BackPACK knows."""
    if loss_fn in (default_loss, F_.cross_entropy):
        return nn.CrossEntropyLoss(reduction="sum"), 1.0
    if loss_fn is F_.mse_loss:
        return nn.MSELoss(reduction="sum"), 1.0 / out[0].numel()
    if (
        type(loss_fn) is nn.CrossEntropyLoss
        and loss_fn.weight is None
        and not loss_fn.label_smoothing
    ):
        return nn.CrossEntropyLoss(reduction="sum"), 1.0
    if type(loss_fn) is nn.MSELoss and loss_fn.reduction in ("mean", "sum"):
        return nn.MSELoss(reduction="sum"), 1.0 / out[
            0
        ].numel() if loss_fn.reduction == "mean" else 1.0
    return None


def backpack_unsupported(model: nn.Module, loss_fn: LossFn | None = None) -> str | None:
    """Why BackPACK cannot compute second-order quantities for this model and loss (None if it
    can): it needs backpack-for-pytorch, an ``nn.Sequential`` of layers it supports (a custom
    ``forward`` with functional ops would silently be skipped), and cross-entropy or MSE."""
    try:
        import backpack  # noqa: F401
    except ImportError:
        return "backpack-for-pytorch is not installed (pip install backpack-for-pytorch)"
    loss_fn = default_loss if loss_fn is None else loss_fn
    for name, m in model.named_modules():
        if any(True for _ in m.children()):
            if type(m) is not nn.Sequential:
                return f"BackPACK needs an nn.Sequential model; {name or 'the model'} is a {type(m).__name__}"
        elif type(m) not in _BACKPACK_LAYERS:
            return f"BackPACK has no second-order rule for layer {name!r} ({type(m).__name__})"
    if _backpack_loss(loss_fn, torch.zeros(1, 1)) is None:
        return f"BackPACK supports cross-entropy and MSE losses, not {loss_fn!r}"
    return None


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
        for x, y in batches:
            _check_batch(x, y)
            out = twin(x)
            lossmod, scale = _backpack_loss(loss_fn, out)
            with backpack.backpack(ext()), warnings.catch_warnings():
                # BackPACK's module hooks warn when the inputs do not require grad: harmless here
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                backpack.extend(lossmod)(out, y).backward()
            for n in params:
                _add(acc, n, getattr(tp[n], field).detach() * scale)
                tp[n].grad = None
            N, passes = N + len(x), passes + 1
    return _finish(acc, params, N, passes)


def _autograd_diag_hessian(model, params, batches, loss_fn, chunk_size) -> DiagCurvature:
    names = list(params)
    acc, N, passes = {}, 0, 0
    with _requiring_grad(params):
        for x, y in batches:
            _check_batch(x, y)
            L = per_sample_losses(loss_fn, model(x), y).sum()
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
                    (h,) = torch.autograd.grad(
                        gi,
                        p,
                        grad_outputs=V.view(len(idx), *p.shape),
                        retain_graph=True,
                        is_grads_batched=True,
                        allow_unused=True,
                        materialize_grads=True,
                    )
                    d[idx] = h.reshape(len(idx), P)[rows, idx]
                _add(acc, n, d.view_as(p))
                passes += P  # one Hessian-vector product per weight (vmapped in chunks)
            N = N + len(x)
    return _finish(acc, params, N, passes)


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
    why = backpack_unsupported(model, loss_fn) if backend != "autograd" else "backend='autograd'"
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
