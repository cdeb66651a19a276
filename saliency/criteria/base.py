"""What every criterion shares: the `Scores` it returns, its `Cost`, and helpers to read data.

A criterion is a frozen dataclass with a class-level `name` and a method
`score(model, params, data, loss_fn) -> Scores`. Scores are float tensors shaped like the
parameters they score, **higher = keep**. Criteria never mutate the model, its `.grad`, its
training mode or its hooks; `preserve_model_state` restores what they touch.

Optional hooks a criterion may define (the pruning loop looks for them):
- `schedule(sparsity) -> list[float]`: intermediate sparsities to reach `sparsity` in several
  score/allocate rounds (SynFlow's 100 exponential rounds, OBS recomputation). Default: one round.
- `apply_update(model, params, masks, scores) -> None`: weight compensation applied in place after
  allocation (OBS). It may use what `score` stored in `scores.extra`.
- `channel_reduce: ClassVar[str]`: how element scores are reduced to a channel score when the
  user asks for channel granularity without naming a reduction ("l2" by default).
- `loss_units: ClassVar[bool]`: True when a score is a predicted loss increase (OBD, OBS), so
  the sum of pruned scores predicts the measured loss change.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from saliency.model_io import (  # noqa: F401  (re-exported: criteria read data through these)
    Batch,
    LossFn,
    batch_loss,
    default_loss,
    forward,
    iter_batches,
    model_device,
    per_sample_losses,
    resolve_loss,
    scalar_loss,
)


@dataclass
class Cost:
    """What one scoring pass cost: wall seconds, samples read, backward passes, peak memory."""

    seconds: float = 0.0
    samples: int = 0
    backward_passes: int | None = None
    peak_memory_bytes: int | None = None
    forwards: dict[str, int] | None = None  # layer-wise solvers: {"prefix": n, "block": n} calls

    def add(self, other: Cost) -> Cost:
        """Accumulate `other` (one more scoring pass) into this cost, in place; returns self.
        Backward passes stay None once a pass did not count them; peak memory is the maximum."""
        self.seconds += other.seconds
        self.samples += other.samples or 0
        bp, obp = self.backward_passes, other.backward_passes
        self.backward_passes = None if bp is None or obp is None else bp + obp
        peaks = [m for m in (self.peak_memory_bytes, other.peak_memory_bytes) if m is not None]
        self.peak_memory_bytes = max(peaks) if peaks else None
        if other.forwards is not None:
            mine = self.forwards or {}
            self.forwards = {k: mine.get(k, 0) + other.forwards.get(k, 0)
                             for k in {*mine, *other.forwards}}  # fmt: skip
        return self

    def as_dict(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "samples": self.samples,
            "backward_passes": self.backward_passes,
            "peak_memory_bytes": self.peak_memory_bytes,
        }


class Scores(dict):
    """`dict[name, Tensor]` of scores (higher = keep), plus the `cost` of computing them and
    an `extra` dict where a criterion keeps what its `apply_update` needs (OBS inverse blocks)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cost = Cost()
        self.extra: dict[str, Any] = {}


@runtime_checkable
class Criterion(Protocol):
    name: str

    def score(
        self,
        model: nn.Module,
        params: dict[str, nn.Parameter],
        data: Iterable | None,
        loss_fn: LossFn,
    ) -> dict[str, Tensor]: ...


@contextlib.contextmanager
def preserve_model_state(model: nn.Module) -> Iterator[None]:
    """Restore training mode, `.grad`, `requires_grad` of every parameter and every buffer
    (BatchNorm running statistics, which a train-mode forward updates) on exit, so a criterion
    can run forward and backward freely without leaving traces on the model."""
    modes = {m: m.training for m in model.modules()}
    saved = [(p, p.grad, p.requires_grad) for p in model.parameters()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        for p, _, _ in saved:
            p.grad = None
        yield
    finally:
        for m, mode in modes.items():
            m.train(mode)
        for p, grad, req in saved:
            p.grad = grad
            p.requires_grad_(req)
        with torch.no_grad():
            for b, value in buffers:
                b.copy_(value)
