"""Second derivatives through piecewise-linear activations that torch cannot differentiate twice.

GraSP's Hessian-gradient product, the exact Hessian and Hutchinson's estimator backpropagate
through the backward pass. Some activations have no double backward in torch ("derivative for
aten::hardsigmoid_backward is not implemented"). They are piecewise linear, so their second
derivative is zero almost everywhere: the same function written with ops that do have a
double backward (``clamp``) gives the same values, first derivatives (off a null set) and
second derivatives (zero). `twice_differentiable` swaps those modules' ``forward`` for the
duration of a scoring pass and restores them; a functional call it cannot swap is refused with
an error naming the op and the way out.

One rule per activation (torch 2.13: Hardswish, ReLU6 and Hardtanh already have a double
backward; only Hardsigmoid lacks it).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


def _hardsigmoid(x: Tensor) -> Tensor:
    return torch.clamp(x / 6 + 0.5, 0.0, 1.0)  # relu6(x + 3) / 6 as clamp: twice differentiable


# module type -> its twice-differentiable equivalent (same values, zero curvature)
SMOOTH: dict[type[nn.Module], Callable[[Tensor], Tensor]] = {
    nn.Hardsigmoid: _hardsigmoid,  # aten::hardsigmoid_backward has no derivative
}

_MISSING = re.compile(r"derivative for (aten::\w+) is not implemented")


@contextmanager
def twice_differentiable(model: nn.Module) -> Iterator[None]:
    """Within the block, the modules of `SMOOTH` in `model` run their twice-differentiable
    equivalent (instance ``forward``, removed on exit). A missing double backward raised
    inside the block becomes a ValueError naming the op, the model's modules of that kind and
    the way out."""
    swapped = []
    for m in model.modules():
        f = SMOOTH.get(type(m))
        if f is not None and "forward" not in vars(m):
            m.forward = f
            swapped.append(m)
    try:
        yield
    except RuntimeError as err:
        found = _MISSING.search(str(err))
        if found is None:
            raise
        op = found.group(1)
        kind = op.removeprefix("aten::").removesuffix("_backward").replace("_", "")
        where = [n for n, m in model.named_modules() if type(m).__name__.lower() == kind]
        raise ValueError(
            f"second derivatives need a double backward through {op}, which torch does not "
            f"have ({'modules ' + ', '.join(map(repr, where)) if where else 'a functional call in the model forward'}). "
            f"Modules of type {', '.join(t.__name__ for t in SMOOTH)} are handled; write the "
            "activation as an nn.Module of those types or with clamp (its second derivative "
            "is 0 almost everywhere), or use a first-order criterion (snip, obd, magnitude)"
        ) from err
    finally:
        for m in swapped:
            del m.forward
