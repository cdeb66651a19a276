"""OBC / ExactOBS (Frantar & Alistarh 2022): greedy exact layer-wise OBS, row by row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from saliency import layerwise, solvers
from saliency.criteria import register_criterion


@register_criterion
@dataclass(frozen=True)
class OBC:
    """OBC / ExactOBS: greedy exact OBS per output row on min ||WX - W'X||^2 (Frantar & Alistarh 2022).

    A layer-wise solver (``saliency.layerwise``), like ``sparsegpt`` but exact: each row removes
    ``argmin w_q^2 / [H^-1]_qq`` and updates the rest and ``H^-1`` (rank-1 downdate), one weight
    at a time; unstructured counts per row are chosen within the layer from the greedy loss
    increments. ``damp`` is relative to ``mean(diag H)`` (0: undamped, then each row equals the
    least-squares refit on its own mask). Cost ``O(rows d^3)`` per layer, two passes when
    unstructured: for small layers and as SparseGPT's reference. ``score`` alone gives the
    layer-wise OBS saliency ``w^2 / (2 [H^-1]_qq)`` of the dense model.
    """

    name: ClassVar[str] = "obc"
    diag_only: ClassVar[bool] = False

    damp: float = 0.01
    n_samples: int | None = 128

    def __post_init__(self) -> None:
        layerwise.check_hparams(self)

    def solve_layer(self, W, H, pattern, alive=None):
        return solvers.obc(W, H, pattern, alive, damp=self.damp)

    def score(self, model, params, data, loss_fn=None):
        return layerwise.obs_scores(self, model, params, data)
