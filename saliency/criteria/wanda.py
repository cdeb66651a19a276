"""Wanda (Sun et al. 2024): |W_ij| ||X_j||_2 per output row, no weight update."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from saliency import capture, layerwise, solvers
from saliency.criteria import register_criterion


@register_criterion
@dataclass(frozen=True)
class Wanda:
    """Wanda: prune the lowest |W_ij| ||X_j||_2 within each output row, no update (Sun et al. 2024).

    A layer-wise solver (``saliency.layerwise``): each layer's input norms ``||X_j||_2`` come
    from ``n_samples`` calibration samples after the layers before it are pruned (the paper's
    sequential procedure); each output row loses the same number of weights (exact count per
    layer), or N:M per group. ``score`` alone gives ``|W_ij| ||X_j||_2`` on the dense model.
    """

    name: ClassVar[str] = "wanda"
    diag_only: ClassVar[bool] = True

    n_samples: int | None = 128

    def __post_init__(self) -> None:
        layerwise.check_hparams(self)

    def solve_layer(self, W, H_diag, pattern, alive=None):
        return solvers.wanda(W, H_diag.sqrt(), pattern, alive)

    def score(self, model, params, data, loss_fn=None):
        stats = layerwise.dense_stats(model, params, data, n_samples=self.n_samples, diag_only=True)
        modules = capture.layer_modules(model, params)
        out = {}
        for n, st in stats.items():
            s = solvers.wanda_scores(capture.weight_matrix(modules[n]).cpu(), st.H)
            out[n] = capture.from_matrix(modules[n], s.float()).to(params[n].device).contiguous()
        return out
