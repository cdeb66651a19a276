"""SNIP connection sensitivity |g * w| (Lee, Ajanthan & Torr 2019), and the gradient helpers
the other gradient criteria (taylor_weight, grasp) share."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from saliency import distributed
from saliency.criteria import Scores, register_criterion
from saliency.criteria.base import (
    LossFn,
    batch_loss,
    iter_batches,
    model_device,
    preserve_model_state,
)


def check_counts(n_samples: int | None, n_batches: int | None) -> None:
    for what, v in (("n_samples", n_samples), ("n_batches", n_batches)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{what} must be a positive int or None (all the data); got {v!r}")


@contextlib.contextmanager
def scoring_mode(
    model: nn.Module, params: Mapping[str, Tensor], *, eval_mode: bool
) -> Iterator[None]:
    """Put `model` in eval (`eval_mode`) or train mode with `params` requiring grad, and restore
    on exit, also on error: training mode, `.grad`, `requires_grad` and every buffer
    (`preserve_model_state`)."""
    with preserve_model_state(model):
        model.train(not eval_mode)
        for p in params.values():
            p.requires_grad_(True)
        yield


def batch_gradients(
    model: nn.Module,
    params: Mapping[str, Tensor],
    data: Iterable | None,
    loss_fn: LossFn | None,
    *,
    n_samples: int | None,
    n_batches: int | None,
    temperature: float = 1.0,
    create_graph: bool = False,
) -> Iterator[tuple[int, dict[str, Tensor]]]:
    """Yield (batch size, {name: dL_b/dw}) for every batch read, L_b = loss_fn(f(x) / T, y)
    (``model_io.batch_loss``: without loss_fn, a Hugging Face model's own loss of its labels).

    Stops after `n_samples` samples or `n_batches` batches, whichever comes first (None: no
    limit). Gradients come from `torch.autograd.grad`, so no `.grad` is touched; parameters the
    loss does not reach get a zero gradient.
    """
    names = list(params)
    tensors = [params[n] for n in names]
    device = model_device(model)
    for i, batch in enumerate(iter_batches(data, n_samples, device=device)):
        if n_batches is not None and i >= n_batches:
            return
        loss = batch_loss(model, batch, loss_fn, temperature=temperature)
        grads = torch.autograd.grad(loss, tensors, allow_unused=True, create_graph=create_graph)
        yield (
            len(batch),
            {
                n: torch.zeros_like(t) if g is None else g
                for n, t, g in zip(names, tensors, grads, strict=True)
            },
        )


def mean_gradient(
    model, params, data, loss_fn, *, n_samples, n_batches, temperature: float = 1.0
) -> tuple[dict[str, Tensor], int, int]:
    """The loss gradient averaged over the samples read (batches weighted by their size):
    ({name: g}, samples, batches)."""
    total: dict[str, Tensor] = {
        n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()
    }
    samples = batches = 0
    for b, grads in batch_gradients(
        model, params, data, loss_fn, n_samples=n_samples, n_batches=n_batches,
        temperature=temperature,
    ):  # fmt: skip
        for n, g in grads.items():
            total[n] += b * g.double()
        samples, batches = samples + b, batches + 1
    total = distributed.all_reduce_dict(total)  # sums and counts over every rank's batches
    samples, batches = distributed.sum_counts(samples, batches)
    return {n: (t / samples).to(params[n].dtype) for n, t in total.items()}, samples, batches


@register_criterion
@dataclass(frozen=True)
class SNIP:
    """SNIP connection sensitivity |g * w| / sum |g * w| (Lee et al. 2019, ICLR).

    ``g = dL/dw`` is the mean loss gradient over ``n_samples`` samples (at most ``n_batches``
    batches; the paper uses one batch), the same as SNIP's gradient with respect to the
    connection gates c at c = 1. Scores are normalized to sum 1 over all scored parameters.
    Meant for pruning at initialization (then train), usable on trained models.

    Mode: ``eval_mode=False`` (default) scores in train mode as the reference implementations
    do at initialization (BatchNorm on batch statistics; dropout, if any, is active, so pass
    ``eval_mode=True`` for deterministic scores); running statistics are restored
    afterwards, as are the mode, ``.grad`` and ``requires_grad``. Channel scores (granularity
    "channel") sum the sensitivities of each output channel's weights.
    """

    name: ClassVar[str] = "snip"
    channel_reduce: ClassVar[str] = "sum"

    n_samples: int | None = 1024
    n_batches: int | None = None
    eval_mode: bool = False

    def __post_init__(self) -> None:
        check_counts(self.n_samples, self.n_batches)

    def score(self, model, params, data, loss_fn=None) -> Scores:
        with scoring_mode(model, params, eval_mode=self.eval_mode):
            g, samples, batches = mean_gradient(
                model, params, data, loss_fn, n_samples=self.n_samples, n_batches=self.n_batches
            )
        raw = {n: (g[n] * p.detach()).abs().float() for n, p in params.items()}
        total = sum(float(s.double().sum()) for s in raw.values())
        scores = Scores({n: s / total if total > 0 else s for n, s in raw.items()})
        scores.cost.samples = samples
        scores.cost.backward_passes = batches
        return scores
