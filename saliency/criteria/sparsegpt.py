"""SparseGPT (Frantar & Alistarh 2023): layer-wise OBS in one column sweep with lazy blocks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from saliency import layerwise, solvers
from saliency.criteria import register_criterion


@register_criterion
@dataclass(frozen=True)
class SparseGPT:
    """SparseGPT: layer-wise reconstruction min ||WX - W'X||^2, masks per column block (Frantar & Alistarh 2023).

    A layer-wise solver (``saliency.layerwise``): ``saliency.prune(model, "sparsegpt", 0.5,
    data=calib, scope="layer")`` captures each layer's inputs after the layers before it are
    pruned, builds ``H = 2 X^T X / n`` from ``n_samples`` calibration samples, damps it by
    ``damp * mean(diag H)`` (the paper's 1%; 0: undamped) and sweeps the columns with the
    Cholesky factor of ``H^-1``, choosing the mask of each block of ``block_size`` columns
    (the paper's 128) by ``w^2 / [chol(H^-1)]_jj^2`` (N:M: per group of M). See
    ``saliency.solvers.sparsegpt``. ``score`` alone gives the layer-wise OBS saliency
    ``w^2 / (2 [H^-1]_qq)`` of the dense model (no propagation, no update).
    """

    name: ClassVar[str] = "sparsegpt"
    diag_only: ClassVar[bool] = False

    damp: float = 0.01
    n_samples: int | None = 128
    block_size: int = 128

    def __post_init__(self) -> None:
        layerwise.check_hparams(self)

    def solve_layer(self, W, H, pattern, alive=None):
        return solvers.sparsegpt(W, H, pattern, alive, damp=self.damp, block_size=self.block_size)

    def score(self, model, params, data, loss_fn=None):
        return layerwise.obs_scores(self, model, params, data)
