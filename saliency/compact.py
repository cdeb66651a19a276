"""Physical removal of pruned channels: a smaller model with the same outputs.

What is removed. A unit of tied channels (`saliency.channels`) is removed when it is *dead*:
every parameter it owns is zero over its entries (the rows of every convolution / Linear whose
output it is, their biases, the BatchNorm weight and bias after them). Its output is then
exactly zero everywhere (conv -> 0, BatchNorm -> 0 * x + 0, ReLU(0) = 0, a sum of zeros), so
dropping it, and the matching input channels (columns) of every layer that reads it, leaves the
outputs unchanged. `saliency.prune(..., granularity="channel", groups=...)` zeroes and keeps
zero exactly these parameters. A unit cut unevenly (some member rows kept) or whose bias or
BatchNorm is not zero is not dead: it is kept, which is exact, and a warning says how many.

Every result is checked: the compacted model must reproduce the original outputs on
`example_inputs` in eval mode (to 1e-4 relative in float32, 1e-9 in float64), or a
`CompactError` is raised; an activation with f(0) != 0 (sigmoid gates) is caught there.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from saliency.apply import attached_masks, remove
from saliency.channels import channel_groups, dependency_graph

log = logging.getLogger(__name__)


class CompactError(ValueError):
    """The compacted model would not reproduce the original one's outputs."""


def _call(model: nn.Module, example_inputs):
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def _units_with(model: nn.Module, groups, zero: bool, weights_only: bool) -> torch.Tensor:
    """Ids of the units that have, in some owned parameter (or only the Linear / Conv weights),
    an entry that is zero (`zero`) or nonzero."""
    params = dict(model.named_parameters())
    found = set()
    for name, ids in groups.owned.items():
        if weights_only and name not in groups.weights:
            continue
        p = params[name].detach()
        rows = p.reshape(len(ids), -1) != 0
        hit = ~rows.any(1) if zero else rows.any(1)
        found.update(ids[hit.cpu()].tolist())
    return torch.tensor(sorted(found), dtype=torch.long)


def dead_units(model: nn.Module, groups) -> torch.Tensor:
    """Ids of the units all of whose owned parameters are zero (see the module docstring), less
    those that reach the model's output. Units with some zero weight rows that are not dead
    (cut unevenly, or a nonzero bias / BatchNorm shift) are kept, with a warning."""
    every = torch.cat([u for _, u in groups.dg_units]).unique()
    dead = every[~torch.isin(every, _units_with(model, groups, zero=False, weights_only=False))]
    partial = _units_with(model, groups, zero=True, weights_only=True)
    partial = partial[~torch.isin(partial, dead)]
    if len(partial):
        log.warning(
            "compact: %d channel unit(s) have zero weight rows but are not dead (cut unevenly "
            "across the layers tied to them, or a nonzero bias or BatchNorm shift makes their "
            "output a constant): kept. Prune with groups=saliency.channel_groups(...) so that "
            "units are pruned whole and their biases and BatchNorm zeroed",
            len(partial),
        )
    return dead[~torch.isin(dead, groups.outputs)]  # the model's outputs keep their shape


def _check_same(reference, got, what: str) -> None:
    if not isinstance(reference, torch.Tensor) or not isinstance(got, torch.Tensor):
        raise CompactError(f"compact checks tensor outputs; {what} returned {type(got).__name__}")
    if reference.shape != got.shape:
        raise CompactError(
            f"the compacted model's output has shape {tuple(got.shape)}, the original's "
            f"{tuple(reference.shape)}: a layout the dependency graph did not follow"
        )
    tol = 1e-9 if reference.dtype == torch.float64 else 1e-4
    err = float((reference - got).abs().max()) if reference.numel() else 0.0
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    if err > tol * max(scale, 1.0):
        raise CompactError(
            f"the compacted model's outputs differ from the original's by {err:.3g} (max abs, "
            f"outputs up to {scale:.3g}): a removed channel was not dead (an activation with "
            "f(0) != 0, an op the dependency graph does not follow); nothing was returned"
        )


@torch.no_grad()
def _outputs(model, example_inputs):
    was = {m: m.training for m in model.modules()}
    model.eval()
    try:
        return _call(model, example_inputs)
    finally:
        for m, t in was.items():
            m.training = t


def compact(model: nn.Module, example_inputs, *, check: bool = True) -> nn.Module:
    """A copy of `model` with its dead channels removed (module docstring); `model` is untouched.

    `example_inputs` is a tensor (or a tuple of a forward's arguments) used to trace the graph
    and to check that the outputs are unchanged (`check`, eval mode). Masks attached to `model`
    are baked into the copy, which is a plain module (no hooks, no masks): `torch.save` it
    whole, since its layer shapes no longer match the original's `state_dict`.
    Needs the optional torch-pruning package (`pip install "saliency[compact]"`).
    """
    new = copy.deepcopy(model)
    if attached_masks(new) is not None:
        remove(new)
    graph = dependency_graph(new, example_inputs)
    groups = channel_groups(new, example_inputs, params={}, graph=graph)
    dead = dead_units(new, groups)
    removed = kept_last = 0
    for root, units in groups.dg_units:
        drop = torch.isin(units, dead).nonzero().flatten().tolist()
        if len(drop) == len(units):  # a layer with no channel left cannot exist: keep one
            drop, kept_last = drop[1:], kept_last + 1
        if drop:
            graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels,
                                    drop).prune()  # fmt: skip
            removed += len(drop)
    if kept_last:
        log.warning(
            "compact: %d layer(s) had every channel dead; one zero channel kept each", kept_last
        )
    owned = torch.cat([u for _, u in groups.dg_units]).unique()
    log.info("compact: removed %d channel(s) of %d units (%d dead)", removed, len(owned), len(dead))
    if check:
        _check_same(_outputs(model, example_inputs), _outputs(new, example_inputs), "compact")
    return new
