from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from saliency.criteria import Scores, register_criterion


@register_criterion
@dataclass(frozen=True)
class Magnitude:
    """Weight magnitude |w| (Han et al. 2015); data-free."""

    name: ClassVar[str] = "magnitude"

    def score(self, model, params, data=None, loss_fn=None) -> Scores:
        return Scores({n: p.detach().abs().float().clone() for n, p in params.items()})
