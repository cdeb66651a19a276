"""Calibration capture for layer-wise solvers: each layer's weight as a matrix and its inputs as rows.

A layer ``y = W x`` is seen as ``W [out, d]`` acting on input rows ``x [d]``:

- Linear, whatever its leading dims (``[..., in]``): ``W`` as is; every position is a row.
  transformers' Conv1D (``x @ W + b``, ``W [in, out]``): the same with ``W.T``.
- Conv2d (groups 1, zero padding), through ``unfold``: ``W [out, in, kh, kw]`` is viewed as
  ``[out, kh*kw*in]`` (input channels fastest, so that N:M groups of consecutive input channels
  at one kernel position are consecutive columns, as ``allocate``'s "N:M"), every output pixel
  a row of the matching patch.

``H = 2 X^T X / n`` (n rows) is accumulated in float64 by a forward pre-hook, never holding
``X``; rows of padded tokens (``Batch.token_mask``: ``attention_mask == 0``, ``labels == -100``)
are left out; ``diag_only`` keeps ``sum x_j^2`` (Wanda needs only ``||X_j||_2``). Anything else (a
MultiheadAttention's packed ``in_proj_weight``, whose inputs never reach a hook, transposed or
grouped convolutions, Conv1d/3d, tied weights) is refused naming the tensor and the way out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saliency.model_io import Batch
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


def input_rows(module: nn.Module, x: Tensor, token_mask: Tensor | None = None) -> Tensor:
    """The layer's input as rows ``[n, d]`` matching ``weight_matrix`` (``W x`` per row).
    ``token_mask [B, T]`` (``Batch.token_mask``, False at padding) drops the rows of padded
    tokens from a Linear's ``[B, T, d]`` input (or ``[B*T, d]``); other inputs keep every row."""
    if isinstance(module, nn.Linear) or is_transposed_linear(module):
        if token_mask is not None and x.shape[:-1] == token_mask.shape:
            return x[token_mask]
        if (
            token_mask is not None
            and x.dim() == 2
            and len(x) == token_mask.numel() > len(token_mask)
        ):
            return x[token_mask.reshape(-1)]
        return x.reshape(-1, x.shape[-1])
    if x.dim() == 3:  # unbatched [C, H, W]
        x = x.unsqueeze(0)
    cols = F.unfold(x, module.kernel_size, module.dilation, _padding(module), module.stride)
    kk = module.kernel_size[0] * module.kernel_size[1]
    cols = cols.view(x.shape[0], x.shape[1], kk, -1)  # [N, C, kh*kw, L]
    return cols.permute(0, 3, 2, 1).reshape(-1, kk * x.shape[1])


class Stats:
    """Running ``sum x x^T`` (or ``sum x^2``), ``sum x`` and row count of one layer's inputs,
    in float64."""

    def __init__(self, d: int, diag_only: bool) -> None:
        self.diag_only, self.n = diag_only, 0
        self.sum = torch.zeros(d if diag_only else (d, d), dtype=torch.float64)
        self.total = torch.zeros(d, dtype=torch.float64)

    def add(self, rows: Tensor) -> None:
        rows = rows.detach().to(torch.float64).cpu()
        self.sum += rows.square().sum(0) if self.diag_only else rows.T @ rows
        self.total += rows.sum(0)
        self.n += rows.shape[0]

    @property
    def mean(self) -> Tensor:
        """``E[x]`` over the captured rows (FLAP's bias compensation)."""
        if self.n == 0:
            raise ValueError("no calibration rows were captured")
        return self.total / self.n

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
    """Hooks accumulating ``Stats`` of each module's input rows, without the padded tokens of
    the batch being run. Yields ``(stats, run)``: ``run(model, batch)`` forwards one
    ``model_io.Batch`` (or a block's cached inputs, ``saliency.blocks.Cached``: anything with
    ``call(module)`` and ``token_mask``; no grad); ``calls[name]``: how many times the module runs per forward,
    and once all have run that often, the forward is cut short (``_Stop``)."""
    stats = {n: Stats(weight_matrix(m).shape[1], diag_only) for n, m in modules.items()}
    seen = dict.fromkeys(modules, 0)
    mask: list[Tensor | None] = [None]  # the token mask of the batch being run

    def hook(name):
        def fn(module, args):
            stats[name].add(input_rows(module, args[0], mask[0]))
            seen[name] += 1
            if all(seen[k] >= calls.get(k, 1) for k in seen):
                raise _Stop

        return fn

    def run(model: nn.Module, batch: Batch) -> None:
        for k in seen:
            seen[k] = 0
        mask[0] = batch.token_mask
        with contextlib.suppress(_Stop), torch.no_grad():
            batch.call(model)

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        yield stats, run
    finally:
        for h in handles:
            h.remove()


def call_order(
    model: nn.Module, modules: Mapping[str, nn.Module], batch: Batch
) -> list[tuple[str, Tensor]]:
    """(name, input tensor) of every call of the modules during one forward of ``batch`` (the
    inputs are held, so that "the same tensor" is decided by identity, never by a recycled id)."""
    log: list[tuple[str, Tensor]] = []
    handles = [
        m.register_forward_pre_hook(lambda _m, a, n=n: log.append((n, a[0])))
        for n, m in modules.items()
    ]
    try:
        with torch.no_grad():
            batch.call(model)
    finally:
        for h in handles:
            h.remove()
    return log
