"""Layer collapse is never silent: emptied layers, outputs cut from the inputs, all-zero scores.

Tanaka et al. (2020) call it layer collapse when pruning removes every weight of a layer, so
that no signal crosses it: the output stops depending on the input and no fine-tuning with the
masks attached can bring it back. It happens by default at initialisation, where a
zero-initialised tensor (a residual block's last BatchNorm gamma, a classifier head) makes
every gradient upstream of it exactly 0, and with global scopes on models whose layers differ
in scale (depthwise convolutions). `saliency.prune` warns, naming the layers.

Default: no weight is kept back. At element granularity one surviving weight per layer does
not reconnect the network (the survivors of consecutive layers need not share a channel), so
a guard would hide the collapse rather than prevent it; the warning says what happened, and
`max_layer_sparsity` (or SynFlow's iterative schedule) is the way to prevent it. At channel
granularity the guard `min_layer_channels=1` stays on: there one kept channel per layer does
keep a path.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from saliency.masks import Masks
from saliency.model_io import Batch, forward, iter_batches, model_device


class LayerCollapseWarning(UserWarning):
    """Pruning emptied a layer, or the model's output no longer depends on its input."""


class ZeroScoreWarning(UserWarning):
    """A criterion scored every weight of a live layer exactly 0 (their order is then random)."""


def warn_zero_scores(scores: Mapping[str, Tensor], params: Mapping[str, Tensor], crit) -> None:
    """Warn about layers whose weights are not all zero but whose scores all are: the
    criterion cannot rank them (upstream of a zero-initialised tensor, gradients are 0)."""
    zero = [n for n, s in scores.items() if not s.any() and params[n].detach().any()]
    if zero:
        name = getattr(crit, "name", type(crit).__name__)
        warnings.warn(
            f"criterion {name!r} scored every weight of {_names(zero)} exactly 0 (the gradients "
            "reaching them are 0: downstream of a zero-initialised BatchNorm gamma or "
            "classifier head, or behind ReLUs that are off for every sample); allocation orders them at random (tie_seed), so these layers "
            "are pruned blindly. Use a data-free or magnitude criterion, or re-initialise the "
            "zeroed tensors before scoring",
            ZeroScoreWarning,
            stacklevel=3,
        )


def emptied(masks: Mapping[str, Tensor]) -> list[str]:
    """Names of the tensors whose every entry is pruned."""
    return [n for n, m in masks.items() if m.numel() and not m.any()]


@torch.no_grad()
def input_disconnected(model: nn.Module, data: Iterable | None, seed: int = 0) -> bool | None:
    """Whether the output is exactly the same for a batch of real-valued inputs and a perturbed
    copy (every path from input to output cut); None when it cannot be checked cheaply (no data,
    inputs that are not one floating tensor, e.g. token ids; a one-pass iterator)."""
    if data is None or iter(data) is data:  # a one-pass iterator is the criterion's to read
        return None
    batch = next(iter_batches(data, 2, device=model_device(model)))
    x = batch.inputs
    if not isinstance(x, Tensor) or not x.is_floating_point():
        return None
    gen = torch.Generator(device=x.device).manual_seed(seed)
    noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    x2 = x + noise * (x.std() if x.numel() > 1 else 1.0) + noise.abs().mean()
    was_training = model.training
    model.eval()
    try:
        a, b = forward(model, Batch(x)), forward(model, Batch(x2))
    finally:
        model.train(was_training)
    return torch.equal(a, b)


def check_collapse(
    model: nn.Module, masks: Masks, data: Iterable | None, was_connected: bool
) -> None:
    """Warn (`LayerCollapseWarning`) naming the emptied layers, and if the output no longer
    changes with the input though it did before pruning (`was_connected`; a model whose head is
    zero-initialised ignores its input already, and pruning is not to blame)."""
    gone = emptied(masks)
    cut = was_connected and input_disconnected(model, data)
    if not gone and not cut:
        return
    what = [f"pruning emptied {len(gone)} layer(s): {_names(gone)}"] if gone else []
    if cut:
        what.append("the model's output no longer depends on its input (every path is cut)")
    warnings.warn(
        "layer collapse: " + "; ".join(what) + ". Pass max_layer_sparsity=<fraction below 1> "
        "to cap every layer, use scope='layer', or an iterative criterion (synflow); "
        "Masks.table() marks emptied layers",
        LayerCollapseWarning,
        stacklevel=3,
    )


def _names(names: list[str], most: int = 8) -> str:
    shown = ", ".join(map(repr, names[:most]))
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")
