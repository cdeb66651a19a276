"""Per-sample gradients and diagonal curvature (Fisher, GGN, Hessian) for pruning criteria.

Conventions (used by every function here and by the OBD/OBS criteria):

- ``l_n`` is sample n's own loss, ``loss_fn(f(x_n)[None], y_n[None])``; ``g_n = dl_n/dw`` is its
  gradient. With a mean-reduced ``loss_fn`` on a batch of B samples, ``g_n`` is B times that
  sample's contribution to the batch gradient. Per-sample losses are obtained by
  ``torch.func.vmap`` over ``loss_fn`` (a loop over samples if ``loss_fn`` cannot be vmapped),
  so sum- and mean-reduced losses give the same ``g_n``.
- Every curvature is a mean over the N samples read: ``F = (1/N) sum_n g_n g_n^T`` (empirical
  Fisher), ``G = (1/N) sum_n J_n^T H_n J_n`` (GGN, ``H_n`` the Hessian of ``l_n`` w.r.t. the
  outputs), ``H = (1/N) sum_n d^2 l_n / dw^2``. Only their diagonals are returned here.
- Closed forms for ``nn.Linear`` (``g_n = sum_t delta_nt x_nt^T``) and ``nn.Conv1d/2d``
  (unfolded inputs) come from a forward hook on the layer input and a tensor hook on its output
  gradient ``delta``; every other parameter goes through ``torch.func.vmap(grad(...))`` over
  ``functional_call``, chunked. Hooks are removed in ``finally`` blocks, ``.grad`` is never written
  (``torch.autograd.grad`` only), ``requires_grad`` is restored.
- Models whose samples interact in the forward pass (BatchNorm in train mode) have no per-sample
  gradients: they raise a ValueError; put the model in ``eval()`` mode (running statistics) first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F_
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

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
    """Conv input -> ``[B, C_in * prod(kernel), L]`` patches (padding mode honoured)."""
    pad = m._reversed_padding_repeated_twice
    mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
    if any(pad):
        x = F_.pad(x, pad, mode=mode)
    if isinstance(m, nn.Conv1d):
        x = x.unsqueeze(2)
        k, d, s = (1, m.kernel_size[0]), (1, m.dilation[0]), (1, m.stride[0])
    else:
        k, d, s = m.kernel_size, m.dilation, m.stride
    return F_.unfold(x, k, dilation=d, stride=s)


def _layer_terms(m: nn.Module, x: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample (input, output-gradient) factors such that g_n = delta_n @ a_n^T:
    ``a [B, T, in]``, ``d [B, T, out]`` for Linear (T = product of extra dims);
    ``a [B, G, in/G * k, L]``, ``d [B, G, out/G, L]`` for grouped convolutions."""
    B = x.shape[0]
    if isinstance(m, nn.Linear):
        if x.dim() < 2:
            raise ValueError(f"{m} got unbatched input of shape {tuple(x.shape)}")
        return x.reshape(B, -1, x.shape[-1]), delta.reshape(B, -1, delta.shape[-1])
    if x.dim() != (3 if isinstance(m, nn.Conv1d) else 4):
        raise ValueError(
            f"{m} got input of shape {tuple(x.shape)}; per-sample gradients need a batch"
        )
    a = _unfold(m, x)
    G = m.groups
    a = a.reshape(B, G, a.shape[1] // G, a.shape[2])
    d = delta.reshape(B, G, delta.shape[1] // G, -1)
    return a, d


def _grads_from_terms(m: nn.Module, a: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """Materialized per-sample weight and bias gradients ``[B, *shape]``."""
    B = a.shape[0]
    if isinstance(m, nn.Linear):
        return torch.einsum("bto,bti->boi", d, a), d.sum(1)
    gw = torch.einsum("bgol,bgil->bgoi", d, a).reshape(B, *m.weight.shape)
    return gw, d.sum(-1).reshape(B, -1)


def _sq_from_terms(m: nn.Module, a: Tensor, d: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """``sum_n g_n^2`` for weight and bias; one matmul ``(delta^2)^T (x^2)`` when the Linear
    input has no extra dims, otherwise per-sample gradients materialized ``chunk`` at a time."""
    if isinstance(m, nn.Linear) and a.shape[1] == 1:
        a2, d2 = a[:, 0] ** 2, d[:, 0] ** 2
        return d2.T @ a2, d2.sum(0)
    sw = sb = 0
    for i in range(0, a.shape[0], chunk):
        gw, gb = _grads_from_terms(m, a[i : i + chunk], d[i : i + chunk])
        sw, sb = sw + (gw**2).sum(0), sb + (gb**2).sum(0)
    return sw, sb


class _Capture:
    """Forward hooks storing each hooked layer's input and, through a tensor hook on its output,
    the output gradient of every backward pass (layers called several times are summed)."""

    def __init__(self, modules) -> None:
        self.modules = list(modules)
        self.inputs: dict[nn.Module, list[Tensor]] = {m: [] for m in self.modules}
        self.deltas: dict[nn.Module, dict[int, Tensor]] = {m: {} for m in self.modules}
        self.handles = []

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
        if out.requires_grad:
            # a tensor hook sees the gradient w.r.t. this value even if a later op is in-place
            out.register_hook(lambda g, m=m, i=i: self.deltas[m].__setitem__(i, g.detach()))

    def terms(self, m: nn.Module):
        """(a, d) factor pairs of the last backward pass, one per call of layer m."""
        ds = self.deltas[m]
        pairs = [_layer_terms(m, x, ds[i]) for i, x in enumerate(self.inputs[m]) if i in ds]
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
    ``g_n`` ``chunk_size`` samples at a time; other parameters go through ``vmap(grad)``.
    """
    _check_batch(x, y)
    sq, _ = _passes(model, params, x, _loss_phi(loss_fn), lambda out: [y], chunk_size, "sq")
    return sq


def _loss_phi(loss_fn: LossFn) -> Callable[[Tensor, Tensor], Tensor]:
    return lambda o, t: loss_fn(o.unsqueeze(0), t.unsqueeze(0))


def _vmap_or_loop(phi, out: Tensor, t: Tensor) -> Tensor:
    try:
        return vmap(phi)(out, t)
    except Exception:  # functions that vmap cannot trace (data-dependent control flow)
        return torch.stack([phi(out[i], t[i]) for i in range(len(out))])


def _explains(m: nn.Module, pairs, gw: Tensor | None, gb: Tensor | None) -> bool:
    """Do the hooked factors sum to the batch gradient autograd found? They do not when the
    parameter is also used outside its layer's forward (``x @ layer.weight.T`` elsewhere);
    checked cheaply through one random projection ``(sum_n g_n) r``."""
    if gw is None:
        return not pairs
    r = torch.randn(gw[0].numel(), generator=torch.Generator().manual_seed(0), dtype=gw.dtype)
    r = r.to(gw.device)
    if isinstance(m, nn.Linear):
        proj = sum(torch.einsum("bto,bt->o", d, a @ r) for a, d in pairs)
    else:
        proj = sum(
            torch.einsum("bgol,bgl->go", d, torch.einsum("bgil,i->bgl", a, r)) for a, d in pairs
        ).reshape(-1)
    want = gw.reshape(gw.shape[0], -1) @ r
    ok = torch.allclose(proj, want, rtol=1e-3, atol=1e-5 * float(want.abs().max()) + 1e-12)
    if gb is not None:
        got_b = sum(d.sum(1) if isinstance(m, nn.Linear) else d.sum(-1) for a, d in pairs)
        got_b = got_b.sum(0).reshape(-1)
        ok = ok and torch.allclose(got_b, gb, rtol=1e-3, atol=1e-5 * float(gb.abs().max()) + 1e-12)
    return ok


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
        for k, t in enumerate(targets):
            if hooked:
                s = _vmap_or_loop(phi, out, t).sum()
                g = torch.autograd.grad(s, hp, retain_graph=k + 1 < len(targets), allow_unused=True)
                batch = dict(zip((id(p) for p in hp), g, strict=True))
                passes += 1
                for m in list(hooked):
                    pairs = cap.terms(m)
                    names = hooked[m]
                    gw, gb = (batch.get(id(m._parameters[a])) for a in ("weight", "bias"))
                    if not _explains(m, pairs, gw, gb if "bias" in names else None):
                        generic += list(hooked.pop(m).values())  # fall back to the generic path
                        continue
                    _accumulate(acc, m, names, pairs, params, len(x), chunk_size, want)
            if generic:
                for n, g in _generic_phi_grads(
                    model, params, generic, x, t, phi, chunk_size
                ).items():
                    _add(acc, n, g if want == "grads" else g.pow(2).sum(0))
                passes += 1
    return {
        n: acc[n].to(p.dtype) if n in acc else _zeros(p, len(x), want) for n, p in params.items()
    }, passes


def _zeros(p: Tensor, B: int, want: str) -> Tensor:
    return (
        torch.zeros(B, *p.shape, dtype=p.dtype, device=p.device)
        if want == "grads"
        else torch.zeros_like(p)
    )


def _add(acc: dict[str, Tensor], n: str, v: Tensor) -> None:
    acc[n] = acc[n] + v if n in acc else v


def _accumulate(acc, m, names, pairs, params, B, chunk_size, want) -> None:
    if not pairs:  # the layer was not on the path to the loss: zero gradients
        return
    if want == "sq" and len(pairs) == 1:
        gw, gb = _sq_from_terms(m, *pairs[0], chunk_size or B)
    else:  # materialize; a layer called several times gets its calls summed before squaring
        gs = [_grads_from_terms(m, a, d) for a, d in pairs]
        gw, gb = sum(g[0] for g in gs), sum(g[1] for g in gs)
        if want == "sq":
            gw, gb = gw.pow(2).sum(0), gb.pow(2).sum(0)
    for attr, n in names.items():
        _add(acc, n, gw if attr == "weight" else gb)


def _generic_phi_grads(model, params, names, x, t, phi, chunk_size) -> dict[str, Tensor]:
    """``vmap(grad(phi(f(x_n), t_n)))`` over ``functional_call``: per-sample gradients of any
    parameter, ``chunk_size`` samples at a time."""
    values = {n: params[n].detach() for n in names}

    def one(p, xn, tn):
        return phi(functional_call(model, p, (xn.unsqueeze(0),))[0], tn)

    return vmap(grad(one), in_dims=(None, 0, 0), chunk_size=chunk_size)(values, x, t)
