from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from saliency.criteria import Scores, register_criterion


@register_criterion
@dataclass(frozen=True)
class Random:
    """Uniform random scores from an explicit seed: the baseline every criterion must beat."""

    name: ClassVar[str] = "random"
    seed: int = 0

    def score(self, model, params, data=None, loss_fn=None) -> Scores:
        g = torch.Generator().manual_seed(self.seed)
        # drawn on the CPU in name order so a seed gives the same scores on every device
        return Scores(
            {n: torch.rand(p.shape, generator=g).to(p.device) for n, p in sorted(params.items())}
        )
