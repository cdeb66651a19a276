"""Checkpoints of pruned models: weights, masks and optimizer state in one file, in one call.

`saliency.attach` keeps masks in non-persistent buffers, so `model.state_dict()` is a plain
state_dict (it loads into an unpruned copy) and carries no masks: loading it into a fresh model
and training on would regrow the pruned weights. `save_checkpoint` stores the masks next to it,
and `load_checkpoint` attaches them again before the optimizer state is restored.

File layout (a plain dict, `torch.load(path, weights_only=True)` reads it):
    {"model": plain state_dict (pruned entries zero), "masks": {name: bool tensor} or None,
     "optimizer": optimizer.state_dict() or None, "extra": {...}}
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from saliency.apply import attach, attached_masks
from saliency.masks import Masks


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    masks: Masks | None = None,
    **extra: Any,
) -> Path:
    """Write `model`'s weights, its masks (the attached ones unless `masks` is given) and the
    optimizer state to `path`, atomically (a temporary file renamed into place). `extra`
    (epoch, step, ...) is stored as given. Returns the path."""
    masks = masks if masks is not None else attached_masks(model)
    state = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "masks": None if masks is None else masks.state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "extra": extra,
    }
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    map_location: str | torch.device | None = "cpu",
) -> dict[str, Any]:
    """Load a `save_checkpoint` file into `model` (and `optimizer`): weights, then the masks
    attached (so pruned weights stay zero through further training), then the optimizer state
    with its entries at pruned weights zeroed. Returns the `extra` dict.

    The optimizer must be built on `model`'s parameters (before or after this call: `attach`
    keeps parameter identity). A plain state_dict file (not a checkpoint) is refused, naming
    what to do instead."""
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or "model" not in state or "masks" not in state:
        raise ValueError(
            f"{path} is not a saliency checkpoint (expected keys 'model', 'masks', 'optimizer'); "
            "a plain state_dict loads with model.load_state_dict(torch.load(path))"
        )
    model.load_state_dict(state["model"])
    masks = None if state["masks"] is None else Masks.from_state_dict(state["masks"])
    if masks is not None:
        attach(model, masks)
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
        if masks is not None:
            attach(model, masks, optimizer=optimizer)  # no stale momentum at pruned entries
    return dict(state.get("extra") or {})
