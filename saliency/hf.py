"""Save and load pruned Hugging Face ``transformers`` models, masks included.

``save_pretrained(model, directory)`` writes the model with ``model.save_pretrained`` (plain
``transformers`` reloads it: `saliency.attach` keeps masks in non-persistent buffers, so the
saved parameter names are the model's own) with every pruned entry zero, and the masks beside
the weights in ``saliency_masks.pt`` (`Masks.save`). ``load_pretrained`` reloads both and
attaches the masks, so pruning or fine-tuning can go on. ``transformers`` is imported only here,
inside the functions (the ``hf`` extra).
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from saliency.apply import attach, attached_masks
from saliency.masks import Masks
from saliency.targets import parameter_aliases

MASKS_FILE = "saliency_masks.pt"


def save_pretrained(
    model: nn.Module, directory: str | os.PathLike, masks: Masks | None = None, **kwargs
) -> Path:
    """`model.save_pretrained(directory, **kwargs)` with the pruned entries of `masks` (default:
    the attached ones) zeroed in `model` first (in place: a no-op where attached masks hold),
    and the masks written to `directory/saliency_masks.pt`. A tied weight is one tensor with
    one mask under its `named_parameters()` name; transformers saves it once and re-ties it on
    load. Without masks, only the model is written. Returns the directory."""
    if not hasattr(model, "save_pretrained"):
        raise TypeError(
            f"save_pretrained needs a transformers model (with .save_pretrained); got "
            f"{type(model).__name__}: use saliency.save_checkpoint for other models"
        )
    masks = masks if masks is not None else attached_masks(model)
    out = Path(directory)
    if masks is not None:
        masks.apply(model)  # checks names and shapes, and bakes the zeros into the weights
    model.save_pretrained(out, **kwargs)
    if masks is not None:
        masks.save(out / MASKS_FILE)
    return out


def load_masks(directory: str | os.PathLike, *, model: nn.Module | None = None) -> Masks:
    """The masks `save_pretrained` wrote to `directory`; with `model`, checked against it."""
    path = Path(directory) / MASKS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {directory} holds no saliency masks (saved without masks, or "
            "not by saliency.save_pretrained)"
        )
    masks = Masks.load(path)
    if model is not None:
        masks.check_compatible(dict(model.named_parameters()), aliases=parameter_aliases(model))
    return masks


def model_class_of(config, directory: str | os.PathLike):
    """The transformers class named first in ``config.architectures``."""
    import transformers

    names = config.architectures or []
    if not names or not hasattr(transformers, names[0]):
        raise ValueError(
            f"the config in {directory} names no transformers class in `architectures` "
            f"({names}); pass model_class, e.g. transformers.AutoModelForCausalLM"
        )
    return getattr(transformers, names[0])


def load_pretrained(
    directory: str | os.PathLike, model_class=None, *, attach_masks: bool = True, **kwargs
) -> tuple[nn.Module, Masks | None]:
    """(model, masks) from a `save_pretrained` directory: `model_class.from_pretrained(directory,
    **kwargs)` (default: the class named first in its config's `architectures`), and its masks
    (None if it has none), attached to the model unless `attach_masks=False`. A model that
    `compact_transformer` left with per-layer widths loads through `load_compacted` (`kwargs`:
    its `dtype` only)."""
    import transformers

    from saliency.compact_transformer import has_layer_widths, load_compacted

    if model_class is None:
        model_class = model_class_of(transformers.AutoConfig.from_pretrained(directory), directory)
    if has_layer_widths(directory):  # compacted, widths differing per layer
        model = load_compacted(directory, model_class, **kwargs)
    else:
        model = model_class.from_pretrained(directory, **kwargs)
    if not (Path(directory) / MASKS_FILE).is_file():
        return model, None
    masks = load_masks(directory, model=model)
    if attach_masks:
        attach(model, masks)
    return model, masks
