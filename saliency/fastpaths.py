"""Which fast path applies, decided in one place: each rule is one line with its reason.

Per-sample quantities have a generic definition that ``torch.func`` (or a plain loop) computes
on any model whose samples do not interact; closed forms (layer hooks, BackPACK) are
optimizations of it and must prove they apply on the actual call, or step aside:

- ``mixing_reasons(model)``: modules known to mix the samples of a batch (then no per-sample
  quantity exists: callers refuse with the reason and the way out).
- ``probe(model, x, modules)``: runs the model on two samples, then again with sample 0
  replaced by sample 1, and returns which hooked layers **proved** that dim 0 of their input
  and output is the sample axis (row 1 unchanged, row 0 changed, leading size 2). It raises
  when the model output of sample 1 moves with sample 0 (the model mixes samples, or is
  random: dropout in train mode).
- ``rows_reach_own_losses(losses, acts, grads)``: the proof by gradients for layers whose
  values prove nothing (a layer behind a ReLU that is off for every sample outputs its bias,
  the same row for every sample): on the batch itself, row n of the activation reaches sample
  n's loss alone.
- ``closed_form_reason(module, attr)`` and ``backpack_reason(model, loss_fn, batches)``: why a
  layer's closed form or BackPACK cannot be used (None: it can).

A new layer type adds one rule to a table here, nothing elsewhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from saliency.model_io import Batch, default_loss, forward
from saliency.targets import transposed_linear_types

# ----------------------------------------------------------------------------- samples mixing

_MIXING_RULES: list[tuple[Callable[[nn.Module], bool], str]] = [
    (
        lambda m: isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training,
        "in train mode (batch statistics); call model.eval() before scoring",
    ),
    (
        lambda m: isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.track_running_stats,
        "with track_running_stats=False: it normalizes with batch statistics even in eval "
        "mode; use running statistics (track_running_stats=True) or GroupNorm/LayerNorm",
    ),
]


def mixing_reasons(model: nn.Module) -> list[str]:
    """One message per module known to mix the samples of a batch."""
    out = []
    for name, m in model.named_modules():
        for rule, why in _MIXING_RULES:
            if rule(m):
                out.append(f"module {name or type(m).__name__!r} is {type(m).__name__} {why}")
    return out


def check_per_sample(model: nn.Module) -> None:
    """Raise a ValueError if a module is known to mix the samples of a batch."""
    reasons = mixing_reasons(model)
    if reasons:
        raise ValueError(
            "per-sample gradients are undefined when samples interact in the forward pass: "
            + "; ".join(reasons)
        )


# ----------------------------------------------------------------------------- closed forms

# module type -> the base forward its closed form is written for
CLOSED_FORM_TYPES: dict[type[nn.Module], Callable] = {
    nn.Linear: nn.Linear.forward,
    nn.Conv1d: nn.Conv1d.forward,
    nn.Conv2d: nn.Conv2d.forward,
}


def closed_form_types() -> dict[type[nn.Module], Callable]:
    """``CLOSED_FORM_TYPES`` and the loaded transposed Linears (``targets.TRANSPOSED_LINEAR``:
    transformers' Conv1D, ``x @ W + b`` with ``W [in, out]``: the Linear's closed form,
    ``g_n = sum_t x_nt delta_nt^T``, transposed)."""
    return {**CLOSED_FORM_TYPES, **{t: t.forward for t in transposed_linear_types()}}


_CLOSED_FORM_RULES: list[tuple[Callable[[nn.Module, str], bool], str]] = [
    (lambda m, a: not isinstance(m, tuple(closed_form_types())),
     "no closed form for this layer type"),
    (lambda m, a: type(m).forward is not next(
        f for t, f in closed_form_types().items() if isinstance(m, t)), "custom forward"),
    (lambda m, a: a not in ("weight", "bias"), "not the layer's weight or bias"),
]  # fmt: skip


def closed_form_reason(m: nn.Module, attr: str) -> str | None:
    """Why parameter ``attr`` of ``m`` has no closed-form per-sample gradient (None: it has,
    subject to the per-call proofs: ``probe`` and the batch-gradient check)."""
    for rule, why in _CLOSED_FORM_RULES:
        if rule(m, attr):
            return why
    return None


def _rows_differ(a: Tensor, b: Tensor) -> tuple[bool, bool]:
    """(row 1 unchanged, row 0 changed) between two [2, ...] tensors, up to rounding."""
    a, b = a.detach(), b.detach()
    scale = float(torch.maximum(a.abs().max(), b.abs().max())) + 1e-30
    tol = 1e3 * torch.finfo(a.dtype).eps * scale if a.is_floating_point() else 0.0
    same1 = float((a[1] - b[1]).abs().max()) <= tol if a[1].numel() else True
    moved0 = float((a[0] - b[0]).abs().max()) > 100 * tol + 1e-300 if a[0].numel() else False
    return same1, moved0


def probe(model: nn.Module, x: Tensor | Batch, modules: Iterable[nn.Module]) -> set[nn.Module]:
    """The layers among ``modules`` whose every call took inputs and gave outputs with the
    sample axis on dim 0 (module docstring). Raises a ValueError when the model's output for
    one sample depends on another sample. With one sample, leading size 1 is proof enough.
    ``x``: a ``model_io.Batch`` (every per-sample tensor is perturbed) or an input tensor."""
    modules = list(modules)
    x = x if isinstance(x, Batch) else Batch.of((x, None))
    if len(x) < 2:
        return set(modules)
    if x.same_sample(0, 1):  # the perturbation needs two different samples
        other = next((i for i in range(2, len(x)) if not x.same_sample(i, 0)), None)
        if other is None:
            return set()
        x = x[[0, other]]
    xa, xb = x[:2], x[[1, 1]]
    seen: dict[nn.Module, list[list[Tensor]]] = {m: [[], []] for m in modules}
    run = [0]

    def hook(m, inputs, out):
        seen[m][run[0]].append((inputs[0], out))

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        with torch.no_grad():
            outs = []
            for r, xr in enumerate((xa, xb)):
                run[0] = r
                outs.append(forward(model, xr))
    finally:
        for h in handles:
            h.remove()
    oa, ob = outs
    if oa.dim() == 0 or len(oa) != 2 or oa.shape != ob.shape or not _rows_differ(oa, ob)[0]:
        raise ValueError(
            "the model's output for one sample changes when another sample of the batch changes "
            "(or the output does not carry the batch on dim 0): samples interact in the forward "
            "pass (BatchNorm on batch statistics, attention or pooling across dim 0, a "
            "batch-dependent layer) or the model is random (dropout in train mode: call "
            "model.eval()). Per-sample quantities are undefined for such a model"
        )
    return {m for m, (a, b) in seen.items() if a and len(a) == len(b) and all(
        _per_sample(ia, ib, must_move=True) and _per_sample(oa, ob, must_move=False)
        for (ia, oa), (ib, ob) in zip(a, b, strict=True)
    )}  # fmt: skip


def require_sample_axis(
    model: nn.Module, x: Tensor | Batch, layers: dict[nn.Module, str], message: str
) -> None:
    """``probe`` for criteria that have no generic path: raise ``message.format(name=...)``
    for the first layer (named ``layers[module]``) whose sample axis is not proven."""
    proven = probe(model, x, layers)
    for m, name in layers.items():
        if m not in proven:
            raise ValueError(message.format(name=repr(name)))


def rows_reach_own_losses(
    losses: Tensor, acts: list[Tensor], grads: list[Tensor | None], seed: int = 0
) -> list[bool]:
    """Per activation ``a`` (leading size B, in the graph of the per-sample losses ``[B]``):
    whether ``dl_j/da_n = 0`` for every ``j != n`` on this batch, so that row n of the gradient
    of ``sum_n l_n`` (``grads``, already taken with the graph retained) is sample n's own
    ``dl_n/da_n``. One more backward: with random weights ``r_n`` in [1, 2), the gradient of
    ``sum_n r_n l_n`` must equal ``r_n`` times row n of ``grads`` (a cross term would add
    ``(r_j - r_n) dl_j/da_n``), up to rounding. This proves what ``probe`` cannot where a
    layer's rows do not move with the samples (a constant row: a bias behind a dead ReLU);
    an activation without leading size B is not proven."""
    B = len(losses)
    ok = [a.dim() > 0 and len(a) == B for a in acts]
    live = [i for i, a in enumerate(acts) if ok[i] and a.requires_grad]
    if B < 2 or not live:
        return ok
    gen = torch.Generator().manual_seed(seed)
    r = (1 + torch.rand(B, generator=gen, dtype=torch.float64)).to(losses)
    weighted = torch.autograd.grad(
        (losses * r).sum(), [acts[i] for i in live], allow_unused=True, retain_graph=True
    )
    for i, gr in zip(live, weighted, strict=True):
        g1 = grads[i]
        if g1 is None and gr is None:
            continue
        g1 = torch.zeros_like(acts[i]) if g1 is None else g1.detach()
        gr = torch.zeros_like(acts[i]) if gr is None else gr.detach()
        want = g1 * r.view(-1, *[1] * (g1.dim() - 1))
        scale = float(want.abs().max()) + float(gr.abs().max()) + 1e-300
        ok[i] = float((gr - want).abs().max()) <= 1e3 * torch.finfo(g1.dtype).eps * scale
    return ok


def _per_sample(u: Tensor, v: Tensor, *, must_move: bool) -> bool:
    """``u, v``: a layer's input (or output) in the two probe runs. Sample-indexed on dim 0:
    leading size 2, row 1 unchanged, and (for inputs) row 0 moved with sample 0."""
    if u.dim() == 0 or len(u) != 2 or u.shape != v.shape:
        return False
    same1, moved0 = _rows_differ(u, v)
    return same1 and (moved0 or not must_move)


# ----------------------------------------------------------------------------- kernels


@contextlib.contextmanager
def reference_kernels() -> Iterator[None]:
    """Attention on PyTorch's math kernel, restored on exit: the fused scaled-dot-product
    attention kernels have no double backward ("derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented") and no vmap
    batching rule (a slow fallback, with a warning per call), both of which the second-order
    and generic per-sample paths need."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


# ----------------------------------------------------------------------------- BackPACK

_BACKPACK_LAYERS = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ReLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU,
    nn.ELU, nn.SELU, nn.LogSigmoid, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d,
    nn.AvgPool2d, nn.AvgPool3d, nn.Flatten, nn.Dropout, nn.ZeroPad2d,
)  # fmt: skip

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_AVG = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)

_BACKPACK_MODULE_RULES: list[tuple[Callable[[nn.Module], bool], str]] = [
    (lambda m: type(m) not in _BACKPACK_LAYERS, "has no BackPACK second-order rule"),
    (lambda m: isinstance(m, _CONV) and m.padding_mode != "zeros",
     "pads with padding_mode != 'zeros' (BackPACK ignores it)"),
    (lambda m: isinstance(m, _CONV) and isinstance(m.padding, str),
     "uses string padding ('same'/'valid'), which BackPACK cannot unfold"),
    (lambda m: isinstance(m, _AVG) and not m.count_include_pad,
     "is average pooling with count_include_pad=False"),
    (lambda m: isinstance(m, _AVG) and getattr(m, "divisor_override", None) is not None,
     "is average pooling with divisor_override"),
    (lambda m: getattr(m, "inplace", False), "runs in place"),
]  # fmt: skip


def _backpack_loss_module(loss_fn, out: Tensor):
    """(sum-reduced BackPACK loss module, factor turning its curvature into the sum of the
    per-sample losses' curvature), or (None, reason)."""
    ce = {default_loss, torch.nn.functional.cross_entropy}
    positions = out[0].numel() // out.shape[1] if out.dim() > 2 else 1
    if loss_fn in ce or (type(loss_fn) is nn.CrossEntropyLoss and loss_fn.weight is None):
        if getattr(loss_fn, "label_smoothing", 0.0):
            return None, "BackPACK has no label smoothing"
        mean = getattr(loss_fn, "reduction", "mean") == "mean"
        # per-sample mean over L positions: 1/L of BackPACK's sum over them
        return nn.CrossEntropyLoss(reduction="sum"), 1.0 / positions if mean else 1.0
    if loss_fn is torch.nn.functional.mse_loss or (
        type(loss_fn) is nn.MSELoss and loss_fn.reduction in ("mean", "sum")
    ):
        mean = getattr(loss_fn, "reduction", "mean") == "mean"
        return nn.MSELoss(reduction="sum"), 1.0 / out[0].numel() if mean else 1.0
    return None, f"BackPACK supports cross-entropy and MSE losses, not {loss_fn!r}"


def backpack_reason(model: nn.Module, loss_fn, batches=None) -> str | None:
    """Why BackPACK cannot compute exact second-order diagonals here (None: it can): it needs
    backpack-for-pytorch, an ``nn.Sequential`` of layers it supports (a custom ``forward`` with
    functional ops would silently be skipped), each module and parameter used once, and
    cross-entropy or MSE; with ``batches``, no target equal to the loss's ignore index."""
    try:
        import backpack  # noqa: F401
    except ImportError:
        return "backpack-for-pytorch is not installed (pip install backpack-for-pytorch)"
    loss_fn = default_loss if loss_fn is None else loss_fn
    if type(model) is not nn.Sequential:
        return f"BackPACK needs an nn.Sequential model; the model is a {type(model).__name__}"
    seen_modules, seen_params = set(), set()
    for name, m in model.named_modules(remove_duplicate=False):
        if m is model:
            continue
        if id(m) in seen_modules:
            return f"module {name!r} is registered twice (BackPACK would count it once)"
        seen_modules.add(id(m))
        for rule, why in _BACKPACK_MODULE_RULES:
            if rule(m):
                return f"layer {name!r} ({type(m).__name__}) {why}"
        for p in m.parameters(recurse=False):
            if id(p) in seen_params:
                return f"a parameter of {name!r} is shared with another layer"
            seen_params.add(id(p))
    mod, why = _backpack_loss_module(loss_fn, torch.zeros(1, 2))
    if mod is None:
        return why
    ignore = getattr(loss_fn, "ignore_index", -100)
    if isinstance(mod, nn.CrossEntropyLoss) and batches is not None:
        targets = [Batch.of(b).targets for b in batches]
        if any(bool((y == ignore).any()) for y in targets if not y.is_floating_point()):
            return f"targets hold the ignore index {ignore}, which BackPACK does not skip"
    return None
