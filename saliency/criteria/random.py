from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from saliency.criteria import Scores, register_criterion


def _mixed(seed: int) -> int:
    """A 63-bit seed derived from `seed` (numpy's SeedSequence hashing), unrelated to it."""
    return int(np.random.SeedSequence([seed, 0x5A11E]).generate_state(1, np.uint64)[0] >> 1)


@register_criterion
@dataclass(frozen=True)
class Random:
    """Uniform random scores from an explicit seed: the baseline every criterion must beat.

    The generator is seeded with a mix of `seed`, not `seed` itself: `torch.manual_seed(0)`
    followed by a default initialization draws the same uniform stream, and random scores
    would then be an affine copy of the initial weights (random pruning = magnitude-like).
    """

    name: ClassVar[str] = "random"
    seed: int = 0

    def score(self, model, params, data=None, loss_fn=None) -> Scores:
        g = torch.Generator().manual_seed(_mixed(self.seed))
        # drawn on the CPU in name order so a seed gives the same scores on every device
        return Scores(
            {n: torch.rand(p.shape, generator=g).to(p.device) for n, p in sorted(params.items())}
        )
