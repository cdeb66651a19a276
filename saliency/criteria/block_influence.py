"""Block Influence (ShortGPT, Men et al. 2024): remove the blocks that change their input least."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from saliency.criteria import register_criterion
from saliency.structured import block_influence


@register_criterion
@dataclass(frozen=True)
class BlockInfluence:
    """Block Influence BI_i = 1 - E_tokens cos(x_i, x_{i+1}) of each block (Men et al. 2024).

    A block whose output points where its input did (BI near 0) does little to the residual
    stream; ShortGPT removes the blocks of lowest BI, measured on calibration text with the
    dense model. Blocks only: ``saliency.prune(model, "block_influence", 0.25, data=calib,
    granularity="depth")`` removes a quarter of the blocks (``saliency.structured``).
    """

    name: ClassVar[str] = "block_influence"
    granularities: ClassVar[tuple[str, ...]] = ("depth",)
    n_samples: int | None = 128

    def block_scores(self, model, structure, data):
        return block_influence(model, structure, data, self.n_samples)

    def score(self, model, params, data, loss_fn=None):
        raise ValueError("block_influence scores whole transformer blocks: use granularity='depth' "
                         "(saliency.prune(model, 'block_influence', sparsity, data=..., "
                         "granularity='depth'))")  # fmt: skip
