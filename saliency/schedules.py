"""Sparsity schedules: how sparse the model should be at a given training step or round.

- `OneShot`: the target at once.
- `Geometric`: lottery-ticket style iterative pruning; each round removes `fraction` of the
  weights still remaining, s_r = 1 - (1 - fraction)^r, until the target.
- `PolynomialDecay`: Zhu & Gupta 2017 ("To prune, or not to prune"), as tfmot's
  `PolynomialDecay`: s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))^p for t0 <= t <= t1,
  re-pruned every `frequency` steps.
- `ConstantSparsity`: tfmot's `ConstantSparsity`: the target from `begin_step`, re-applied every
  `frequency` steps until `end_step` (-1: forever).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from saliency.allocate import check_sparsity


def _check_steps(begin_step: int, end_step: int, frequency: int, *, open_end: bool) -> None:
    if frequency < 1:
        raise ValueError(f"frequency must be >= 1; got {frequency}")
    if begin_step < 0:
        raise ValueError(f"begin_step must be >= 0; got {begin_step}")
    if not (open_end and end_step == -1) and end_step < begin_step:
        raise ValueError(
            f"end_step ({end_step}) must be >= begin_step ({begin_step})"
            + (" or -1" if open_end else "")
        )


@dataclass(frozen=True)
class OneShot:
    """Prune to `target_sparsity` once, at `step` (0 by default)."""

    target_sparsity: float
    step: int = 0

    def __post_init__(self) -> None:
        check_sparsity(self.target_sparsity, "target_sparsity")

    def sparsity_at(self, step: int) -> float:
        return self.target_sparsity if step >= self.step else 0.0

    def should_prune(self, step: int) -> bool:
        return step == self.step

    def rounds(self) -> list[float]:
        return [self.target_sparsity]


@dataclass(frozen=True)
class Geometric:
    """Iterative pruning: every round prunes `fraction` of the remaining weights (20% in
    Frankle & Carbin 2019) until `target_sparsity`; one round every `frequency` steps."""

    target_sparsity: float
    fraction: float = 0.2
    begin_step: int = 0
    frequency: int = 1

    def __post_init__(self) -> None:
        check_sparsity(self.target_sparsity, "target_sparsity")
        if not 0.0 < self.fraction < 1.0:
            raise ValueError(
                f"fraction (of remaining weights pruned per round) must be in (0, 1); got {self.fraction}"
            )
        _check_steps(self.begin_step, self.begin_step, self.frequency, open_end=False)

    def rounds(self) -> list[float]:
        """Sparsity after each round; the last is exactly the target."""
        if self.target_sparsity == 0.0:
            return [0.0]
        n = math.ceil(math.log(1.0 - self.target_sparsity) / math.log(1.0 - self.fraction) - 1e-9)
        out = [1.0 - (1.0 - self.fraction) ** r for r in range(1, max(n, 1))]
        return out + [self.target_sparsity]

    def sparsity_at(self, step: int) -> float:
        if step < self.begin_step:
            return 0.0
        r = (step - self.begin_step) // self.frequency
        rounds = self.rounds()
        return rounds[min(r, len(rounds) - 1)]

    def should_prune(self, step: int) -> bool:
        r, rem = divmod(step - self.begin_step, self.frequency)
        return step >= self.begin_step and rem == 0 and r < len(self.rounds())


@dataclass(frozen=True)
class PolynomialDecay:
    """Gradual pruning of Zhu & Gupta 2017, defaults as tfmot's `PolynomialDecay`."""

    initial_sparsity: float
    final_sparsity: float
    begin_step: int
    end_step: int
    power: float = 3.0
    frequency: int = 100

    def __post_init__(self) -> None:
        check_sparsity(self.initial_sparsity, "initial_sparsity")
        check_sparsity(self.final_sparsity, "final_sparsity")
        _check_steps(self.begin_step, self.end_step, self.frequency, open_end=False)

    def sparsity_at(self, step: int) -> float:
        if step < self.begin_step:
            return 0.0
        span = max(self.end_step - self.begin_step, 1)
        progress = min(max((step - self.begin_step) / span, 0.0), 1.0)
        s_i, s_f = self.initial_sparsity, self.final_sparsity
        return s_f + (s_i - s_f) * (1.0 - progress) ** self.power

    def should_prune(self, step: int) -> bool:
        # as tfmot: every `frequency` steps inside [begin, end], and once at end_step
        in_range = self.begin_step <= step <= self.end_step
        return in_range and (
            (step - self.begin_step) % self.frequency == 0 or step == self.end_step
        )


@dataclass(frozen=True)
class ConstantSparsity:
    """tfmot's `ConstantSparsity`: `target_sparsity` from `begin_step`, every `frequency` steps."""

    target_sparsity: float
    begin_step: int = 0
    end_step: int = -1
    frequency: int = 100

    def __post_init__(self) -> None:
        check_sparsity(self.target_sparsity, "target_sparsity")
        _check_steps(self.begin_step, self.end_step, self.frequency, open_end=True)

    def sparsity_at(self, step: int) -> float:
        return self.target_sparsity if step >= self.begin_step else 0.0

    def should_prune(self, step: int) -> bool:
        in_range = step >= self.begin_step and (self.end_step == -1 or step <= self.end_step)
        return in_range and (step - self.begin_step) % self.frequency == 0


Schedule = OneShot | Geometric | PolynomialDecay | ConstantSparsity
