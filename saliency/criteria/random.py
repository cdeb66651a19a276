"""Random scores: the baseline every criterion must beat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch

from saliency.allocate import group_index
from saliency.criteria import Scores, register_criterion
from saliency.targets import channel_layout


def _mixed(seed: int) -> int:
    """A 63-bit seed derived from `seed` (numpy's SeedSequence hashing), unrelated to it."""
    return int(np.random.SeedSequence([seed, 0x5A11E]).generate_state(1, np.uint64)[0] >> 1)


@register_criterion
@dataclass(frozen=True)
class Random:
    """Uniform random scores from an explicit seed: the baseline every criterion must beat.

    ``per="element"`` draws one uniform per weight. ``per="channel"`` draws one per output
    channel, shared by its weights: the random baseline for channel granularity. (A reduction
    of per-weight draws is not uniform across channels of different sizes: the L2 norm of 100
    draws is smaller than that of 784, so global channel pruning would take the small layers,
    output classes included, first.) `saliency.prune` and sweeps set ``per`` from the
    granularity unless it is given.

    The generator is seeded with a mix of `seed`, not `seed` itself: `torch.manual_seed(0)`
    followed by a default initialization draws the same uniform stream, and random scores
    would then be an affine copy of the initial weights (random pruning = magnitude-like).
    """

    name: ClassVar[str] = "random"
    channel_reduce: ClassVar[str] = "mean"  # gives back the per-channel draw exactly
    seed: int = 0
    per: Literal["element", "channel"] = "element"

    def __post_init__(self) -> None:
        if self.per not in ("element", "channel"):
            raise ValueError(f"per must be 'element' or 'channel'; got {self.per!r}")

    def score(self, model, params, data=None, loss_fn=None) -> Scores:
        g = torch.Generator().manual_seed(_mixed(self.seed))
        layout = channel_layout(model, params) if self.per == "channel" else {}
        out = {}
        # drawn on the CPU in name order so a seed gives the same scores on every device
        for n, p in sorted(params.items()):
            if self.per == "element" or p.dim() == 0:
                s = torch.rand(p.shape, generator=g)
            else:  # one draw per output channel, wherever it runs (ConvTranspose: dim 1)
                ids = group_index(p.shape, "channel", None, "cpu", layout.get(n, (0, 1)))
                s = torch.rand(int(ids.max()) + 1, generator=g)[ids]
            out[n] = s.to(p.device)
        return Scores(out)
