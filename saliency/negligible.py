"""Curvature that is zero up to round-off, recognised the same way on every machine.

A weight whose gradient is zero analytically (an attention key bias: the softmax removes a
constant added to every logit of a row; a branch that never reaches the loss; an input that is
always zero on the calibration data) has a curvature made only of round-off: about 1e-32 of
the rest in float64 and 1e-15 in float32, with values that depend on the BLAS build. Inverting
it (or ranking by it) gives answers that change from one processor to the next.

The rule, one place for every curvature (WoodFisher blocks, K-FAC factors, the exact Hessian,
OBD's diagonals, the layer-wise ``H = X^T X``):

    entry q is negligible  <=>  |c_q| <= rtol * scale,

``c_q`` the curvature's diagonal entry (for an indefinite Hessian: the largest entry of its
row), ``scale`` the mean ``|diagonal|`` over all alive weights of all targets of the call (per
layer for the layer-wise ``H``, whose units are its own). The tolerance depends on how round-off
enters, never on the dtype or the machine:

- ``SQUARES = 1e-10`` for curvatures that are means of squares (empirical and true Fisher, GGN,
  K-FAC factors, ``X^T X``): a gradient that is zero up to float32 round-off (1e-7 of the
  others) gives 1e-14 of the mean, and the smallest genuine Fisher diagonal seen on the
  architecture zoo is 3e-4 of it;
- ``SECOND_DERIVATIVES = 1e-5`` for curvatures linear in second derivatives (the exact
  Hessian, Hutchinson's estimate, Hessian-vector products), where float32 round-off is 1e-7.

Removing such a weight costs nothing to second order, so its
saliency is exactly 0 and it is decoupled from the inverse (row and column zeroed, as a pruned
weight): the OBS update moves no other weight for it.

Damping relative to a tensor's own mean ``lambda = damp * mean`` gets the floor
``damp * SQUARES * scale``, so that a tensor whose curvature is nearly all round-off can never
set a damping of round-off size.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

SQUARES = 1e-10
SECOND_DERIVATIVES = 1e-5


def scale(diagonals: Iterable[Tensor], alive: Iterable[Tensor] | None = None) -> float:
    """Mean ``|diagonal|`` over every (alive) entry of all the given curvature diagonals."""
    diagonals = list(diagonals)
    alive = [None] * len(diagonals) if alive is None else list(alive)
    total, count = 0.0, 0
    for d, a in zip(diagonals, alive, strict=True):
        a = torch.ones_like(d, dtype=torch.bool) if a is None else a.bool().to(d.device)
        total += float((d.abs().double() * a).sum())
        count += int(a.sum())
    return total / max(count, 1)


def negligible(values: Tensor, scale: float, rtol: float = SQUARES) -> Tensor:
    """True where ``|values| <= rtol * scale`` (all True when ``scale`` is 0)."""
    return values.abs() <= rtol * scale


def floored(mean: Tensor | float, scale: float) -> Tensor | float:
    """A tensor's (or block's) mean curvature for relative damping, floored at
    ``SQUARES * scale``."""
    floor = SQUARES * scale
    if isinstance(mean, Tensor):
        return mean.clamp(min=floor)
    return max(mean, floor)


def zero_negligible(diagonals: dict[str, Tensor], rtol: float = SQUARES) -> dict[str, Tensor]:
    """Curvature diagonals (or Hessian-vector products) with the entries negligible against the
    mean over all of them set to exactly 0."""
    s = scale(diagonals.values())
    return {
        n: torch.where(negligible(d, s, rtol), torch.zeros_like(d), d) for n, d in diagonals.items()
    }
