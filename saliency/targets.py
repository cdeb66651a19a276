"""Which parameters are prunable: by default the `weight` of every Linear and (transposed) Conv.

Everything downstream is keyed by the qualified name from `model.named_parameters()`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

from torch import nn

DEFAULT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


def _as_list(x: str | Iterable[str] | None) -> list[str]:
    if x is None:
        return []
    return [x] if isinstance(x, str) else list(x)


def prunable_parameters(
    model: nn.Module,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    types: Sequence[type[nn.Module]] = DEFAULT_TYPES,
    exclude_types: Sequence[type[nn.Module]] = (),
    keep_output_dense: bool = False,
) -> dict[str, nn.Parameter]:
    """Prunable parameters of `model` as {qualified name: Parameter}, in model order.

    `include` / `exclude` are fnmatch patterns on qualified names ("features.*", "*.weight");
    `include` replaces the type-based default (any parameter matching it is a target), and
    `exclude` is applied last. `types` replaces the default module types; `exclude_types`
    removes modules of those types (e.g. `(nn.Conv1d,)`), whatever matched them.
    `keep_output_dense` leaves the last prunable layer in registration order dense (the output
    layer of sequential models; for other models exclude the head by name). Raises ValueError
    when nothing is prunable.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    inc, exc = _as_list(include), _as_list(exclude)
    types, skip_types = tuple(types), tuple(exclude_types)
    chosen: dict[str, nn.Parameter] = {}
    seen: set[int] = set()  # a parameter shared by two modules is one target, under its first name
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if inc:
                keep = any(fnmatch.fnmatchcase(full, pat) for pat in inc)
            else:
                keep = isinstance(module, types) and p_name == "weight"
            if (
                keep
                and not isinstance(module, skip_types)
                and id(p) not in seen
                and not any(fnmatch.fnmatchcase(full, pat) for pat in exc)
            ):
                chosen[full] = p
                seen.add(id(p))
    if keep_output_dense and chosen:
        chosen.pop(next(reversed(chosen)))
    if not chosen:
        raise ValueError(
            f"nothing to prune in {type(model).__name__}: no parameter matched "
            f"(include={inc or None}, exclude={exc or None}, "
            f"types={[t.__name__ for t in types]}, "
            f"exclude_types={[t.__name__ for t in skip_types]}, keep_output_dense={keep_output_dense}); "
            "by default the weights of Linear and Conv layers are prunable"
        )
    return chosen
