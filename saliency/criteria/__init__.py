"""Criterion registry: one name per criterion, the same string in the API, CLI, records and figures.

Register with the decorator (`@register_criterion`), or from another package through the
entry-point group `saliency.criteria` (the entry point names a criterion class).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
from typing import Any

from saliency.criteria.base import Cost, Criterion, Scores, default_loss, iter_batches

__all__ = [
    "Cost",
    "Criterion",
    "Scores",
    "available_criteria",
    "default_loss",
    "describe_criteria",
    "for_granularity",
    "get_criterion",
    "iter_batches",
    "register_criterion",
]

log = logging.getLogger(__name__)
_REGISTRY: dict[str, type] = {}
_ENTRY_POINTS_LOADED = False


def register_criterion(
    cls: type | None = None, *, name: str | None = None, overwrite: bool = False
):
    """Class decorator registering a criterion under `cls.name` (or `name`).

    Registering a taken name is an error unless `overwrite=True`.
    """

    def wrap(c: type) -> type:
        key = name or getattr(c, "name", None)
        if not isinstance(key, str) or not key:
            raise TypeError(f"criterion class {c.__name__} needs a string class attribute `name`")
        if not callable(getattr(c, "score", None)):
            raise TypeError(
                f"criterion class {c.__name__} needs a method score(model, params, data, loss_fn)"
            )
        if key in _REGISTRY and _REGISTRY[key] is not c and not overwrite:
            raise ValueError(
                f"criterion name {key!r} is already registered by {_REGISTRY[key].__qualname__}; "
                "pass overwrite=True to replace it"
            )
        _REGISTRY[key] = c
        return c

    return wrap(cls) if cls is not None else wrap


def _load_builtins_and_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    import saliency.criteria.builtin  # noqa: F401  (registers the built-in criteria)

    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in importlib.metadata.entry_points(group="saliency.criteria"):
        try:
            cls = ep.load()
            if ep.name not in _REGISTRY:
                register_criterion(cls, name=ep.name)
        except Exception:  # a broken plug-in must not break the library
            log.exception("could not load criterion entry point %r", ep.name)


_ELEMENT_LIKE = ("element", "channel", "block")  # allocate's granularities (and N:M)


def available_criteria(granularity: str | None = None) -> list[str]:
    """Sorted names of every registered criterion; with ``granularity``, of those that can prune
    at it (a criterion's ``granularities`` ClassVar, when it has one, lists the only ones it
    supports: Block Influence scores whole blocks, ``("depth",)``)."""
    _load_builtins_and_entry_points()
    if granularity is None:
        return sorted(_REGISTRY)
    g = "element" if granularity in _ELEMENT_LIKE or ":" in granularity else granularity
    return sorted(n for n, c in _REGISTRY.items() if g in getattr(c, "granularities", (g,)))


def describe_criteria() -> dict[str, str]:
    """Name -> first line of the criterion's docstring."""
    _load_builtins_and_entry_points()
    return {
        k: (c.__doc__ or "").strip().splitlines()[0] if c.__doc__ else ""
        for k, c in sorted(_REGISTRY.items())
    }


def for_granularity(criterion: str | Criterion, hparams: dict[str, Any], granularity: str) -> dict:
    """`hparams` with ``per`` set from the allocation `granularity` ("channel" or "element") for a
    named criterion that has a ``per`` field the caller left unset (random draws per channel)."""
    if not isinstance(criterion, str) or "per" in hparams:
        return hparams
    _load_builtins_and_entry_points()
    cls = _REGISTRY.get(criterion)
    if cls is not None and dataclasses.is_dataclass(cls):
        if "per" in {f.name for f in dataclasses.fields(cls)}:
            return {**hparams, "per": "channel" if granularity == "channel" else "element"}
    return hparams


def get_criterion(criterion: str | Criterion, **hparams: Any) -> Criterion:
    """Build a criterion from its registered name and hyperparameters, or pass an instance through."""
    if not isinstance(criterion, str):
        if hparams:
            raise TypeError(
                "hyperparameters can only be given with a criterion name, not an instance"
            )
        if not callable(getattr(criterion, "score", None)):
            raise TypeError(
                f"criterion must be a registered name or have a score() method; got {criterion!r}"
            )
        return criterion
    _load_builtins_and_entry_points()
    if criterion not in _REGISTRY:
        raise ValueError(
            f"unknown criterion {criterion!r}; available: {', '.join(sorted(_REGISTRY))}"
        )
    cls = _REGISTRY[criterion]
    if dataclasses.is_dataclass(cls):
        fields = {f.name for f in dataclasses.fields(cls) if f.init}
        bad = sorted(set(hparams) - fields)
        if bad:
            raise TypeError(
                f"criterion {criterion!r} has no hyperparameter(s) {', '.join(bad)}; "
                f"accepted: {', '.join(sorted(fields)) or 'none'}"
            )
    return cls(**hparams)
