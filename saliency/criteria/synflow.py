"""SynFlow: iterative synaptic flow pruning, data-free (Tanaka, Kunin, Yamins & Ganguli 2020)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from saliency.criteria import Scores, register_criterion
from saliency.criteria.base import forward, iter_batches, model_device


@register_criterion
@dataclass(frozen=True)
class SynFlow:
    """Synaptic saliency |w * dR/dw| with R = 1^T f_|w|(1) (Tanaka et al. 2020, NeurIPS).

    The network is linearized by replacing every parameter and buffer by its absolute value
    (the paper's code: ``param.abs_()`` over the whole ``state_dict``, BatchNorm included, in
    eval mode), an all-ones input of one example is passed through it, ``R`` is the sum of the
    outputs, and the score of a weight is ``|w * dR/dw|``. No data and no labels are used
    (``data`` only supplies the input shape when ``input_shape`` is not given).

    Scores are meant to be applied iteratively: ``schedule(sparsity)`` returns the paper's
    exponential schedule, densities ``d^(r/R)`` for r = 1..``rounds`` with ``d = 1 - sparsity``,
    and ``saliency.prune`` re-scores between rounds; weights pruned in earlier rounds are zero
    in the model and score zero. This is what avoids layer collapse.

    The computation runs on a deep copy of the model, in float64 by default (``double``; the
    products of |w| over many layers overflow float32), so the model's weights, their signs,
    buffers, mode, ``.grad`` and hooks are left exactly as they were. Memory: one extra copy
    of the model. Channel granularity sums a channel's scores (``channel_reduce = "sum"``):
    the synaptic flow through that neuron or filter.
    """

    name: ClassVar[str] = "synflow"
    channel_reduce: ClassVar[str] = "sum"

    rounds: int = 100
    input_shape: tuple[int, ...] | None = None
    double: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"rounds must be a positive int; got {self.rounds!r}")
        if self.input_shape is not None:
            shape = self.input_shape
            if not isinstance(shape, (tuple, list)) or not all(
                isinstance(s, int) and s > 0 for s in shape
            ):
                raise ValueError(
                    f"input_shape must be a sequence of positive ints (one example's shape, "
                    f"no batch dimension); got {shape!r}"
                )
            object.__setattr__(self, "input_shape", tuple(shape))

    def schedule(self, sparsity: float | None) -> list[float]:
        """Sparsities of the successive rounds: 1 - d^(r/R), r = 1..R, d = 1 - sparsity."""
        if sparsity is None or sparsity <= 0 or self.rounds == 1:
            return [sparsity]
        d = 1.0 - sparsity
        return [1.0 - d ** (r / self.rounds) for r in range(1, self.rounds)] + [sparsity]

    def _shape(self, data) -> tuple[int, ...]:
        if self.input_shape is not None:
            return self.input_shape
        if data is None:
            raise ValueError(
                "synflow is data-free but needs the input shape: pass input_shape=(C, H, W) "
                "(one example, no batch dimension) or data=<batches> to read it from"
            )
        x = next(iter_batches(data, 1)).inputs
        if not isinstance(x, Tensor) or not x.is_floating_point():
            what = f"{x.dtype} inputs (token ids?)" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"synflow feeds an all-ones input, so it needs one real-valued input tensor; the "
                f"data holds {what}. Use another criterion for such models"
            )
        return tuple(x.shape[1:])

    def score(self, model, params, data=None, loss_fn=None) -> Scores:
        shape = self._shape(data)
        names = {id(p): n for n, p in model.named_parameters()}
        unknown = [n for n, p in params.items() if id(p) not in names]
        if unknown:
            raise ValueError(f"synflow: {unknown[:5]} are not parameters of the model")
        lin = copy.deepcopy(model)
        try:
            lin.eval()
            if self.double:
                lin.double()
            with torch.no_grad():
                for t in lin.state_dict().values():
                    if t.is_floating_point():
                        t.abs_()
            lin_params = dict(lin.named_parameters())
            for p in lin.parameters():
                p.requires_grad_(False)
                p.grad = None
            targets = [lin_params[names[id(p)]] for p in params.values()]
            for t in targets:
                t.requires_grad_(True)
            dtype = torch.float64 if self.double else next(iter(params.values())).dtype
            x = torch.ones(1, *shape, dtype=dtype, device=model_device(model))
            R = forward(lin, x).sum()
            grads = torch.autograd.grad(R, targets, allow_unused=True)
        finally:
            del lin
        scores = Scores()
        for (n, p), t, g in zip(params.items(), targets, grads, strict=True):
            s = torch.zeros_like(p, dtype=torch.float32) if g is None else (g * t).detach().abs()
            if not torch.isfinite(s).all():
                raise ValueError(
                    f"synflow scores of {n!r} overflowed; keep double=True or prune fewer layers"
                )
            scores[n] = s  # float64 with `double`: products of |w| may exceed float32's range
        scores.cost.samples = 0
        scores.cost.backward_passes = 1
        return scores
