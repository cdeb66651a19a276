"""GraSP: gradient signal preservation (Wang, Zhang & Grosse 2020)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from saliency import distributed, negligible
from saliency.activations import twice_differentiable
from saliency.criteria import Scores, register_criterion
from saliency.criteria.snip import batch_gradients, check_counts, mean_gradient, scoring_mode
from saliency.fastpaths import reference_kernels


@register_criterion
@dataclass(frozen=True)
class GraSP:
    """GraSP w * (H g) / |sum w * (H g)|, higher = keep (Wang et al. 2020, ICLR).

    GraSP keeps the gradient flow ``||g||^2`` of the network at initialization: removing
    weight ``w_q`` changes ``1/2 ||g||^2`` by about ``-w_q (H g)_q`` (first-order Taylor
    expansion of the gradient norm). The paper scores ``S = -w * (H g)`` and **removes the
    weights with the highest S**, those whose removal reduces the gradient flow least (or
    raises it most). Here higher = keep, so the score is ``-S = w * (H g)``: pruning the lowest
    ``w * (H g)`` removes exactly the weights the paper removes (the official code's division by
    ``|sum S|`` is a positive factor and keeps the ranking; it is applied too).

    ``g`` is the mean gradient of ``loss_fn(f(x) / T, y)`` with the paper's temperature
    ``T = temperature`` (200) over ``n_samples`` samples (at most ``n_batches`` batches), held
    fixed; ``H g`` is the Hessian-vector product of the same loss averaged over the same
    batches, restricted to the scored parameters, as in the official code. Scores are signed.
    Channel granularity sums them over each output channel (``channel_reduce = "sum"``):
    the first-order change of the gradient flow when the whole channel is removed.

    ``eval_mode=False`` (default) scores in train mode as the official code does at
    initialization (dropout, if any, is active: ``eval_mode=True`` for deterministic scores);
    mode, ``.grad``, ``requires_grad`` and buffers are restored afterwards. Hardsigmoid has
    no double backward in torch: it runs as its clamp equivalent while scoring
    (`saliency.activations`; zero curvature almost everywhere, as the original).
    """

    name: ClassVar[str] = "grasp"
    channel_reduce: ClassVar[str] = "sum"

    n_samples: int | None = 1024
    n_batches: int | None = None
    temperature: float = 200.0
    eval_mode: bool = False
    eps: float = 1e-10

    def __post_init__(self) -> None:
        check_counts(self.n_samples, self.n_batches)
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive; got {self.temperature!r}")

    def score(self, model, params, data, loss_fn=None) -> Scores:
        kw = {"n_samples": self.n_samples, "n_batches": self.n_batches}
        Hg = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
        with (
            scoring_mode(model, params, eval_mode=self.eval_mode),
            reference_kernels(),
            twice_differentiable(model),
        ):
            g, samples, batches = mean_gradient(
                model, params, data, loss_fn, temperature=self.temperature, **kw
            )
            for b, grads in batch_gradients(
                model, params, data, loss_fn, temperature=self.temperature, create_graph=True, **kw
            ):
                z = sum((grads[n] * g[n].detach()).sum() for n in params)
                # d/dw (g_b . g) = H_b g with g held fixed
                hv = torch.autograd.grad(z, list(params.values()), allow_unused=True)
                for n, h in zip(params, hv, strict=True):
                    if h is not None:
                        Hg[n] += b * h.double()
        Hg = distributed.all_reduce_dict(Hg)  # samples is already the total over ranks
        # round-off Hg (a key bias the softmax ignores): exactly 0 on every machine
        Hg = negligible.zero_negligible(Hg, negligible.SECOND_DERIVATIVES)
        raw = {n: p.detach().double() * Hg[n] / samples for n, p in params.items()}
        norm = abs(sum(float(s.sum()) for s in raw.values())) + self.eps
        scores = Scores({n: (s / norm).float() for n, s in raw.items()})
        scores.cost.samples = samples  # each read twice: for g, then for H g
        scores.cost.backward_passes = 3 * batches  # one gradient, then gradient + its derivative
        return scores
