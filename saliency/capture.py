"""Calibration capture for layer-wise solvers: each layer's weight as a matrix and its inputs as rows.

A layer ``y = W x`` is seen as ``W [out, d]`` acting on input rows ``x [d]``:

- Linear, whatever its leading dims (``[..., in]``): ``W`` as is; every position is a row.
  transformers' Conv1D (``x @ W + b``, ``W [in, out]``): the same with ``W.T``.
- Conv2d (groups 1, zero padding), through ``unfold``: ``W [out, in, kh, kw]`` is viewed as
  ``[out, kh*kw*in]`` (input channels fastest, so that N:M groups of consecutive input channels
  at one kernel position are consecutive columns, as ``allocate``'s "N:M"), every output pixel
  a row of the matching patch.

``H = 2 X^T X / n`` (n rows) is accumulated in float64 by a forward pre-hook, never holding
``X``; ``diag_only`` keeps ``sum x_j^2`` (Wanda needs only ``||X_j||_2``). Anything else (a
MultiheadAttention's packed ``in_proj_weight``, whose inputs never reach a hook, transposed or
grouped convolutions, Conv1d/3d, tied weights) is refused naming the tensor and the way out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saliency.targets import is_transposed_linear, parameter_uses

WAY_OUT = (
    "exclude it from the targets (prunable_parameters(model, exclude=[...]) or params=) and prune "
    "it with a score-based criterion; write attention with nn.Linear projections to prune them "
    "layer-wise"
)


def layer_modules(model: nn.Module, params: Mapping[str, Tensor]) -> dict[str, nn.Module]:
    """{parameter name: the Linear / Conv1D / Conv2d whose ``weight`` it is}; refuses any other
    layout."""
    uses = parameter_uses(model)
    out = {}
    for name, p in params.items():
        holders = uses.get(id(p), [])
        if len(holders) != 1:
            why = "is used by several modules (tied)" if holders else "is not in the model"
            raise ValueError(f"layer-wise pruning cannot handle {name!r}: it {why}; {WAY_OUT}")
        _, module, attr = holders[0]
        ok = attr == "weight" and type(module) in (nn.Linear, nn.Conv2d)
        ok = ok or attr == "weight" and is_transposed_linear(module)
        ok = ok or attr == "weight" and type(module).__name__ == "NonDynamicallyQuantizableLinear"
        if ok and isinstance(module, nn.Conv2d):
            ok = module.groups == 1 and module.padding_mode == "zeros"
            ok = ok and not (module.padding == "same" and any(d * (k - 1) % 2 for d, k in
                                                                 zip(module.dilation, module.kernel_size, strict=True)))  # fmt: skip
        if not ok:
            raise ValueError(
                f"layer-wise pruning handles the weights of nn.Linear, transformers' Conv1D and "
                f"nn.Conv2d (groups=1, zero padding); {name!r} is {attr!r} of {type(module).__name__}: {WAY_OUT}"
            )
        out[name] = module
    return out


def as_matrix(module: nn.Module, t: Tensor) -> Tensor:
    """A tensor shaped like the module's weight (a mask) as ``[out, d]``, as ``weight_matrix``."""
    if is_transposed_linear(module):
        return t.T
    return t if t.dim() == 2 else t.movedim(1, -1).reshape(t.shape[0], -1)


def weight_matrix(module: nn.Module) -> Tensor:
    """The weight as ``[out, d]`` (Conv2d: columns ordered (kh, kw, in); Conv1D: ``W.T``)."""
    return as_matrix(module, module.weight.detach())


def from_matrix(module: nn.Module, M: Tensor) -> Tensor:
    """Inverse of ``weight_matrix``: a ``[out, d]`` tensor back in the weight's own shape."""
    shape = module.weight.shape
    if is_transposed_linear(module):
        return M.T
    if len(shape) == 2:
        return M.reshape(shape)
    return M.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1)


def _padding(module: nn.Conv2d) -> tuple[int, int]:
    if module.padding == "valid":
        return (0, 0)
    if module.padding == "same":
        return tuple(
            d * (k - 1) // 2 for d, k in zip(module.dilation, module.kernel_size, strict=True)
        )
    return module.padding


def input_rows(module: nn.Module, x: Tensor) -> Tensor:
    """The layer's input as rows ``[n, d]`` matching ``weight_matrix`` (``W x`` per row)."""
    if isinstance(module, nn.Linear) or is_transposed_linear(module):
        return x.reshape(-1, x.shape[-1])
    if x.dim() == 3:  # unbatched [C, H, W]
        x = x.unsqueeze(0)
    cols = F.unfold(x, module.kernel_size, module.dilation, _padding(module), module.stride)
    kk = module.kernel_size[0] * module.kernel_size[1]
    cols = cols.view(x.shape[0], x.shape[1], kk, -1)  # [N, C, kh*kw, L]
    return cols.permute(0, 3, 2, 1).reshape(-1, kk * x.shape[1])


class Stats:
    """Running ``sum x x^T`` (or ``sum x^2``) and row count of one layer's inputs, in float64."""

    def __init__(self, d: int, diag_only: bool) -> None:
        self.diag_only, self.n = diag_only, 0
        self.sum = torch.zeros(d if diag_only else (d, d), dtype=torch.float64)

    def add(self, rows: Tensor) -> None:
        rows = rows.detach().to(torch.float64).cpu()
        self.sum += rows.square().sum(0) if self.diag_only else rows.T @ rows
        self.n += rows.shape[0]

    @property
    def H(self) -> Tensor:
        """``2 X^T X / n`` (its diagonal with ``diag_only``)."""
        if self.n == 0:
            raise ValueError("no calibration rows were captured")
        return 2 * self.sum / self.n


class _Stop(Exception):
    """Raised by a hook once every layer of interest has seen its input (saves the rest)."""


@contextlib.contextmanager
def capturing(modules: Mapping[str, nn.Module], *, diag_only: bool, calls: Mapping[str, int]):
    """Hooks accumulating ``Stats`` of each module's input. ``calls[name]``: how many times the
    module runs per forward; once all have run that often, the forward is cut short (``_Stop``)."""
    stats = {n: Stats(weight_matrix(m).shape[1], diag_only) for n, m in modules.items()}
    seen = dict.fromkeys(modules, 0)

    def hook(name):
        def fn(module, args):
            stats[name].add(input_rows(module, args[0]))
            seen[name] += 1
            if all(seen[k] >= calls.get(k, 1) for k in seen):
                raise _Stop

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        yield stats, seen
    finally:
        for h in handles:
            h.remove()


def run_until_stop(model: nn.Module, x: Tensor, seen: dict[str, int]) -> None:
    """Forward ``x`` (no grad), stopping early at ``_Stop``; resets the per-forward call counts."""
    for k in seen:
        seen[k] = 0
    with contextlib.suppress(_Stop), torch.no_grad():
        model(x)


def call_order(
    model: nn.Module, modules: Mapping[str, nn.Module], x: Tensor
) -> list[tuple[str, Tensor]]:
    """(name, input tensor) of every call of the modules during one forward of ``x`` (the inputs
    are held, so that "the same tensor" is decided by identity, never by a recycled id)."""
    log: list[tuple[str, Tensor]] = []
    handles = [
        m.register_forward_pre_hook(lambda _m, a, n=n: log.append((n, a[0])))
        for n, m in modules.items()
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return log
