"""First-order Taylor importance on weights (Molchanov, Mallya, Tyree, Frosio & Kautz 2019)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from saliency import distributed
from saliency.criteria import Scores, register_criterion
from saliency.criteria.snip import batch_gradients, check_counts, scoring_mode


@register_criterion
@dataclass(frozen=True)
class TaylorWeight:
    """First-order Taylor weight importance (g * w)^2 (Molchanov et al. 2019, CVPR).

    Removing weight ``w_m`` changes the loss by about ``-g_m w_m``; the paper's importance is
    ``I_m = (g_m w_m)^2`` with ``g`` the mini-batch gradient, averaged over mini-batches, and a
    channel's importance is the sum over its weights, ``I_S = sum_{m in S} (g_m w_m)^2``.

    Element scores are ``sqrt(mean_b (g_b w)^2)`` over the batches b read, i.e. ``|g * w|`` for
    a single batch: the same ranking as ``I_m``. Channel granularity reduces them by L2 (the
    default ``channel_reduce``), ``sqrt(sum_{m in S} mean_b (g_b w_m)^2) = sqrt(I_S)``, which
    ranks channels exactly as ``I_S`` does.

    ``eval_mode=True`` (default) scores with BatchNorm on running statistics and no dropout, so
    scores are deterministic; the mode, ``.grad``, ``requires_grad`` and buffers are restored.
    """

    name: ClassVar[str] = "taylor_weight"

    n_samples: int | None = 1024
    n_batches: int | None = None
    eval_mode: bool = True

    def __post_init__(self) -> None:
        check_counts(self.n_samples, self.n_batches)

    def score(self, model, params, data, loss_fn=None) -> Scores:
        total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
        samples = batches = 0
        with scoring_mode(model, params, eval_mode=self.eval_mode):
            for b, grads in batch_gradients(
                model, params, data, loss_fn, n_samples=self.n_samples, n_batches=self.n_batches
            ):
                for n, g in grads.items():
                    total[n] += (g.double() * params[n].detach().double()) ** 2
                samples, batches = samples + b, batches + 1
        total = distributed.all_reduce_dict(total)  # sums and counts over every rank's batches
        samples, batches = distributed.sum_counts(samples, batches)
        scores = Scores({n: (t / batches).sqrt().float() for n, t in total.items()})
        scores.cost.samples = samples
        scores.cost.backward_passes = batches
        return scores
