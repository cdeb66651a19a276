"""Per-sample gradients for curvature estimates: closed forms from layer hooks, `vmap` otherwise.

``l_n`` is sample n's own loss, ``loss_fn(f(x_n)[None], y_n[None])`` (``x_n``: every
per-sample tensor of a ``model_io.Batch``, keyword arguments included), and ``g_n = dl_n/dw`` its
gradient (with a mean-reduced ``loss_fn`` on a batch of B samples, B times that sample's share of
the batch gradient). Per-sample losses come from ``reduction="none"`` for cross-entropy and MSE
and from ``torch.func.vmap`` over ``loss_fn`` otherwise (a loop if it cannot be vmapped).

Closed forms for ``nn.Linear`` (``g_n = sum_t delta_nt x_nt^T``; transformers' ``Conv1D``, whose
weight is ``[in, out]``: its transpose) and ``nn.Conv1d/2d`` (unfolded inputs) come from a forward hook on the layer input and a tensor hook on its output gradient
``delta``; every other parameter goes through ``torch.func.vmap(grad(...))`` over
``functional_call``, chunked. A hooked weight whose per-sample gradients do not sum to autograd's
batch gradient (it is also used outside its layer, e.g. tied) falls back to that generic path.
Several backward passes over one forward (GGN columns, Monte Carlo draws) run as one vmapped
backward (``is_grads_batched``) unless a layer output is modified in place. Hooks are removed in
``finally`` blocks, ``.grad`` is never written, ``requires_grad`` is restored. `saliency.curvature`
builds the diagonal Fisher, GGN and Hessian on these.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F_
from torch import Tensor, nn
from torch.func import grad, vmap

from saliency import fastpaths
from saliency.fastpaths import check_per_sample
from saliency.model_io import (
    Batch,
    LossFn,
    as_batch,
    check_batch,
    forward,
    loss_kind,
    loss_phi,
    per_sample_losses,
    resolve_loss,
    vmap_or_loop,
)
from saliency.targets import is_transposed_linear

__all__ = [
    "LossFn", "accumulate", "batched_dot", "check_batch", "check_params", "check_per_sample",
    "loss_kind", "loss_phi", "output_passes", "per_sample_grads", "per_sample_losses",
    "replaced_parameters", "requiring_grad", "sum_grad_squared", "vmap_or_loop",
]  # fmt: skip


# ----------------------------------------------------------------------------- checks and helpers


def check_params(model: nn.Module, params: dict[str, Tensor]) -> None:
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
def requiring_grad(params: dict[str, Tensor]) -> Iterator[None]:
    saved = [(p, p.requires_grad) for p in params.values()]
    try:
        with torch.enable_grad():
            for p, _ in saved:
                p.requires_grad_(True)
            yield
    finally:
        for p, req in saved:
            p.requires_grad_(req)


@contextlib.contextmanager
def replaced_parameters(model: nn.Module, values: dict[str, Tensor]) -> Iterator[None]:
    """Run ``model`` with the parameters named in ``values`` (``named_parameters`` names)
    replaced by those tensors, in every module that holds them (tied weights, a module
    registered twice), and put the original Parameter objects back on exit.
    ``torch.func.functional_call`` is not used: on a module registered twice it swaps twice and
    restores once, leaving a plain tensor in place of the model's Parameter."""
    named = dict(model.named_parameters())
    by_id = {id(named[n]): v for n, v in values.items()}
    slots = [
        (m, attr, p)
        for m in model.modules()
        for attr, p in m._parameters.items()
        if p is not None and id(p) in by_id
    ]
    try:
        for m, attr, p in slots:
            m._parameters[attr] = by_id[id(p)]
        yield
    finally:
        for m, attr, p in slots:
            m._parameters[attr] = p


def _split(model: nn.Module, params: dict[str, Tensor]):
    """Which parameters may have a closed form (``fastpaths.closed_form_reason``), as
    {module: {"weight"/"bias": name}}, and the rest (generic path). A parameter held by two
    modules (tied) is generic; the per-call proofs come later (``output_passes``)."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for m in model.modules():
        for attr, p in m._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((m, attr))
    hooked: dict[nn.Module, dict[str, str]] = {}
    generic: list[str] = []
    for n, p in params.items():
        own = owners.get(id(p), [])
        if len(own) == 1 and fastpaths.closed_form_reason(*own[0]) is None:
            m, attr = own[0]
            hooked.setdefault(m, {})[attr] = n
        else:
            generic.append(n)
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


def _linear(m: nn.Module) -> bool:
    """Linear, or a Linear with its weight stored [in, out] (transformers' Conv1D)."""
    return isinstance(m, nn.Linear) or is_transposed_linear(m)


def _input_factor(m: nn.Module, x: Tensor) -> Tensor:
    """Per-sample input factor ``a``: ``[B, T, in]`` for Linear (T = product of extra dims),
    ``[B, G, in/G * k, L]`` unfolded patches for convolutions with G groups."""
    B = x.shape[0]
    if _linear(m):
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
    if _linear(m):
        return delta.reshape(B, -1, delta.shape[-1])
    return delta.reshape(B, m.groups, delta.shape[1] // m.groups, -1)


_CHUNK_ELEMENTS = 2**23  # per-chunk budget (elements) of per-sample gradients and patches


def _grads_from_factors(m: nn.Module, a: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """Materialized per-sample weight and bias gradients ``[B, *shape]``."""
    if _linear(m):  # HF Conv1D: the weight and its gradient are [in, out]
        form = "bto,bti->bio" if is_transposed_linear(m) else "bto,bti->boi"
        return torch.einsum(form, d, a), d.sum(1)
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
    if want == "sq" and _linear(m) and len(pairs) == 1 and x0.dim() == 2:
        d = pairs[0][1]
        d2 = d * d
        if K:  # sum_k sum_n d_kn^2 x_n^2 = (sum_k d_k^2)^T x^2
            d2, d = d2.sum(0), d.sum(0)
        w = (x0 * x0).T @ d2 if is_transposed_linear(m) else d2.T @ (x0 * x0)
        return w, d2.sum(0), None, d.sum(0)
    if K:  # the K passes become K * B samples
        pairs = [
            (x.expand(K, *x.shape).reshape(K * len(x), *x.shape[1:]), d.flatten(0, 1))
            for x, d in pairs
        ]
        x0 = pairs[0][0]
    B = len(x0)
    patch = x0[0].numel() * (1 if _linear(m) else math.prod(m.kernel_size))
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
        ok = close(d.T @ (x @ r), (gw.T if is_transposed_linear(m) else gw) @ r)
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

    def batch_aligned(self, m: nn.Module, B: int) -> bool:
        """Every call of layer m took and gave tensors whose dim 0 has the batch size B."""
        return all(
            x.dim() > 0 and len(x) == B and o.dim() > 0 and len(o) == B
            for x, (o, _) in zip(self.inputs[m], self.outputs[m], strict=True)
        )

    def terms(self, m: nn.Module) -> list[tuple[Tensor, Tensor]]:
        """(input, output gradient) of each call of layer m in the last backward pass."""
        ds, xs = self.deltas[m], self.inputs[m]
        pairs = [(xs[i], ds[i]) for i in range(len(xs)) if i in ds]
        ds.clear()
        return pairs


def per_sample_grads(
    model: nn.Module,
    params: dict[str, Tensor],
    x: Tensor | Batch,
    y: Tensor | None,
    loss_fn: LossFn | None,
    *,
    chunk_size: int | None = 64,
) -> dict[str, Tensor]:
    """Materialized per-sample gradients ``g_n = dl_n/dw``, ``[N, *param.shape]`` per name.

    ``l_n = loss_fn(model(x)[n:n+1], y[n:n+1])`` is sample n's own loss (for a mean-reduced
    ``loss_fn`` on a batch of B, ``g_n`` is B times sample n's share of the batch gradient).
    Linear and Conv1d/2d layers use the closed form ``g_n = delta_n a_n^T`` from one batched
    forward and backward (``a_n`` the layer input, unfolded for convolutions; extra leading dims
    summed); other parameters use ``vmap(grad(...))`` in chunks of ``chunk_size`` samples.
    ``x`` may be a ``model_io.Batch`` (then ``y`` is None); ``loss_fn`` None or ``default_loss``:
    ``model_io.resolve_loss``. The model's mode, ``.grad``, hooks and ``requires_grad`` are left
    as they were.
    """
    batch = as_batch(x, y)
    phi = loss_phi(resolve_loss(loss_fn, model, batch))
    grads, _ = output_passes(
        model, params, batch, phi, lambda out: [batch.targets], chunk_size, "grads"
    )
    for n, g in grads.items():  # the contract every caller relies on
        if g.shape != (len(batch), *params[n].shape):
            raise RuntimeError(f"per-sample gradients of {n!r} have shape {tuple(g.shape)}")
    return grads


def sum_grad_squared(
    model: nn.Module,
    params: dict[str, Tensor],
    x: Tensor | Batch,
    y: Tensor | None,
    loss_fn: LossFn | None,
    *,
    chunk_size: int | None = 64,
) -> dict[str, Tensor]:
    """``sum_n g_n * g_n`` (elementwise) over the batch, shaped like each parameter.

    For ``nn.Linear`` on ``[B, in]`` inputs this is one matmul, ``(delta^2)^T (x^2)``, without
    materializing ``g_n``; convolutions and Linear layers on inputs with extra dims materialize
    ``g_n`` a memory-bounded chunk of samples at a time; other parameters go through
    ``vmap(grad)``, ``chunk_size`` samples at a time.
    """
    batch = as_batch(x, y)
    phi = loss_phi(resolve_loss(loss_fn, model, batch))
    sq, _ = output_passes(model, params, batch, phi, lambda out: [batch.targets], chunk_size, "sq")
    return sq


def batched_dot(o: Tensor, t: Tensor) -> Tensor:
    return (o * t).sum()


batched_dot.batched = lambda out, t: (out * t).reshape(len(out), -1).sum(1)


def output_passes(model, params, batch, phi, make_targets, chunk_size, want):
    """One forward on ``batch`` (a ``model_io.Batch``), then one backward per target tensor
    ``t`` from ``make_targets(outputs)``:
    per-sample gradients ``d phi(f(x_n), t_n) / dw`` either materialized (``want="grads"``, one
    target) or squared and summed over samples and targets (``want="sq"``).
    Returns (dict name -> tensor, number of batched backward passes)."""
    check_params(model, params)
    check_per_sample(model)
    hooked, generic = _split(model, params)
    proven = fastpaths.probe(model, batch, hooked)  # raises if the model mixes samples
    acc: dict[str, Tensor] = {}
    passes = 0
    with requiring_grad(params):
        with _Capture(hooked) as cap:
            out = forward(model, batch)
        for m in list(hooked):  # closed forms only where the sample axis is proven dim 0
            if m not in proven or not cap.batch_aligned(m, len(batch)):
                generic += list(hooked.pop(m).values())
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
                s = vmap_or_loop(phi, out, t).sum()
                g = torch.autograd.grad(s, hp, retain_graph=k + 1 < len(targets), allow_unused=True)
                whole = dict(zip((id(p) for p in hp), g, strict=True))
                passes += 1
                for m in list(hooked):
                    pairs = cap.terms(m)
                    names = hooked[m]
                    gw, gb = (whole.get(id(m._parameters[a])) for a in ("weight", "bias"))
                    stats = _layer_stats(m, pairs, want) if pairs else None
                    if not _explains(m, pairs, stats, gw, gb if "bias" in names else None):
                        generic += list(hooked.pop(m).values())  # fall back to the generic path
                        continue
                    for attr, n in names.items():
                        if stats is not None:
                            accumulate(acc, n, stats[0] if attr == "weight" else stats[1])
            if generic:
                for n, g in _generic_phi_grads(
                    model, params, generic, batch, t, phi, chunk_size
                ).items():
                    accumulate(acc, n, g if want == "grads" else g.pow(2).sum(0))
                passes += 1
    return {
        n: acc[n].to(p.dtype) if n in acc else _zeros(p, len(batch), want)
        for n, p in params.items()
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


_TARGET_BYTES = 2**30  # per batched backward: output gradients and inputs, times the targets


def _from_outputs(cap, hooked, generic, acc, out, phi, targets, hp, want) -> None:
    """Backward w.r.t. the captured layer outputs themselves (no weight-gradient matmuls; K
    targets per ``is_grads_batched`` backward, like BackPACK's matrix backpropagation).
    With ``hp`` (parameters) the batch gradients are also taken, to check the hooked ones
    (on the first group of targets: whether a layer's hooks explain autograd's gradient does
    not depend on the target).

    Each target costs the output gradients of every hooked layer and, in ``_layer_stats``, a
    copy of their inputs: all C - 1 targets of an exact GGN at once would be (C - 1) times the
    activations (ResNet-50 at 224x224, batch 8, 1000 classes: 0.65 GiB a target, 650 GiB in
    all). The targets go in groups that keep that under ``_TARGET_BYTES``."""
    if phi is batched_dot:  # d/df sum_n <f_n, t_n> = t
        G = torch.stack(targets)
    else:
        o = out.detach().requires_grad_()
        G = torch.stack([torch.autograd.grad(vmap_or_loop(phi, o, t).sum(), o)[0] for t in targets])
    outs = [(m, i, o) for m in hooked for i, (o, _) in enumerate(cap.outputs[m]) if o.requires_grad]
    if not outs:
        return
    per_target = sum(o.numel() * o.element_size() for _, _, o in outs) + sum(
        x.numel() * x.element_size() for m in {m for m, _, _ in outs} for x in cap.inputs[m]
    )
    step = max(1, _TARGET_BYTES // max(per_target, 1))
    for start in range(0, len(G), step):
        outs = [t for t in outs if t[0] in hooked]  # not those the first group sent to generic
        if not outs:
            return
        _batched_backward(cap, hooked, generic, acc, out, outs, G[start : start + step],
                          hp if start == 0 else [], want, retain=start + step < len(G))  # fmt: skip


def _batched_backward(cap, hooked, generic, acc, out, outs, G, hp, want, retain) -> None:
    """One backward of the ``K = len(G)`` output gradients ``G`` (vmapped when K > 1) to the
    hooked layers' outputs (and ``hp``), accumulated into ``acc`` by ``_layer_stats``."""
    K = len(G)
    cap.active = False
    try:
        res = torch.autograd.grad(
            out, [o for _, _, o in outs] + hp, grad_outputs=G if K > 1 else G[0],
            is_grads_batched=K > 1, allow_unused=True, retain_graph=retain,
        )  # fmt: skip
    finally:
        cap.active = True
    deltas = {(m, i): d for (m, i, _), d in zip(outs, res, strict=False)}
    whole = {
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
            gw, gb = (whole.get(id(m._parameters[a])) for a in ("weight", "bias"))
            if not _explains(m, pairs, stats, gw, gb if "bias" in names else None):
                generic += list(hooked.pop(m).values())  # fall back to the generic path
                continue
        for attr, n in names.items():
            if stats is not None:
                accumulate(acc, n, stats[0] if attr == "weight" else stats[1])


def _zeros(p: Tensor, B: int, want: str) -> Tensor:
    return (
        torch.zeros(B, *p.shape, dtype=p.dtype, device=p.device)
        if want == "grads"
        else torch.zeros_like(p)
    )


def accumulate(acc: dict[str, Tensor], n: str, v: Tensor) -> None:
    acc[n] = acc[n] + v if n in acc else v


def _generic_phi_grads(model, params, names, batch, t, phi, chunk_size) -> dict[str, Tensor]:
    """The generic path: ``vmap(grad(phi(f(x_n), t_n)))`` with the parameters swapped in
    (``replaced_parameters``; every other parameter detached, so no graph is kept), vmapped over
    every per-sample input tensor of ``batch`` (``Batch.rows``: keyword arguments too),
    ``chunk_size`` samples at a time; a plain loop over samples where vmap cannot trace the
    model (e.g. RNN kernels). Any layout, any layer, tied or shared weights."""
    values = {n: params[n].detach() for n in names}
    others = {n: p.detach() for n, p in model.named_parameters() if n not in values}

    def one(p, rows, tn):
        sample = batch.with_rows({k: v.unsqueeze(0) for k, v in rows.items()})
        with replaced_parameters(model, {**others, **p}):
            return phi(forward(model, sample)[0], tn)

    try:
        with fastpaths.reference_kernels():
            g = vmap(grad(one), in_dims=(None, 0, 0), chunk_size=chunk_size)(
                values, batch.rows(), t
            )
    except Exception:  # not vmappable (in-place kernels, data-dependent control flow): loop
        g = _loop_phi_grads(model, params, names, batch, t, phi)
    return {n: v.detach() for n, v in g.items()}


def _loop_phi_grads(model, params, names, batch, t, phi) -> dict[str, Tensor]:
    """Per-sample gradients by one forward and backward per sample (the slow generic path)."""
    ps = [params[n] for n in names]
    rows = []
    for i in range(len(batch)):
        loss = phi(forward(model, batch[i : i + 1])[0], t[i])
        rows.append(torch.autograd.grad(loss, ps, allow_unused=True, materialize_grads=True))
    return {n: torch.stack([r[j] for r in rows]) for j, n in enumerate(names)}
