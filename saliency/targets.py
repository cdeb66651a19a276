"""Which parameters are prunable: by default the weights of every Linear, (transposed) Conv,
MultiheadAttention and Hugging Face `Conv1D`, less a language model's output head.

Everything downstream is keyed by a tensor's canonical name: the qualified name
`model.named_parameters()` gives it (`"features.0.weight"`). A tensor held by several modules (an
embedding tied to the output head, `head.weight = emb.weight`; a layer registered twice) has
several qualified names but one canonical name, the first one, and is one target under it: its
mask is enforced once and every use sees the zeros.
"""

from __future__ import annotations

import fnmatch
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence

from torch import nn

# module type -> its weight attributes, where they are not just "weight". MultiheadAttention keeps
# its q/k/v projections as raw Parameters: one packed [3E, E] `in_proj_weight`, or three separate
# ones when kdim / vdim differ (the unused ones are None). Its `out_proj` is a Linear, found as one.
WEIGHT_ATTRS: dict[type[nn.Module], tuple[str, ...]] = {
    nn.MultiheadAttention: ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"),
}

# module type -> the dim of its weight along which output channels (neurons, filters) run, where
# it is not dim 0. Linear and Conv weights are [out, in/groups, *k]; ConvTranspose weights are
# [in, out/groups, *k], so output channel g * (out/groups) + j is column j of group g's rows.
CHANNEL_DIM: dict[type[nn.Module], int] = {
    nn.modules.conv._ConvTransposeNd: 1,
}

# Layer types defined outside torch, found by module path and class name, never imported: a model
# holding one has imported its package already. transformers' Conv1D (GPT-2, GPT-J style) is a
# Linear whose weight is stored [in, out] (forward x @ W + b): its output channels run along dim 1,
# and every layout-aware step (allocate's blocks and N:M, closed-form per-sample gradients, K-FAC,
# the layer-wise capture) treats it as the nn.Linear with weight W.T.
TRANSPOSED_LINEAR: tuple[tuple[str, str], ...] = (("transformers.pytorch_utils", "Conv1D"),)


def transposed_linear_types() -> tuple[type[nn.Module], ...]:
    """The `TRANSPOSED_LINEAR` classes whose package is loaded (none if it is not)."""
    found = (getattr(sys.modules.get(mod), cls, None) for mod, cls in TRANSPOSED_LINEAR)
    return tuple(t for t in found if isinstance(t, type))


def is_transposed_linear(module: nn.Module) -> bool:
    """Is `module` a Linear with its weight stored [in, out] (transformers' Conv1D)?"""
    return isinstance(module, transposed_linear_types())


DEFAULT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.MultiheadAttention,
)


def default_types() -> tuple[type[nn.Module], ...]:
    """`DEFAULT_TYPES` and the loaded `TRANSPOSED_LINEAR` classes."""
    return DEFAULT_TYPES + transposed_linear_types()


def output_head(model: nn.Module) -> nn.Module | None:
    """A language model's output head: what `model.get_output_embeddings()` returns (the Hugging
    Face convention: `lm_head`, often tied to the token embedding), or None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Module) else None


def _as_list(x: str | Iterable[str] | None) -> list[str]:
    if x is None:
        return []
    return [x] if isinstance(x, str) else list(x)


def _lookup(table: Mapping[type, object], module: nn.Module, default):
    return next((v for t, v in table.items() if isinstance(module, t)), default)


def _each_use(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Parameter]]:
    """(qualified name, module, attribute, parameter) of every use, in module order (modules
    registered twice are visited under each of their names)."""
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for attr, p in module._parameters.items():
            if p is not None:
                yield (f"{mod_name}.{attr}" if mod_name else attr), module, attr, p


def parameter_uses(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """Every (qualified name, module, attribute) holding each parameter, by tensor id."""
    uses: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for full, module, attr, p in _each_use(model):
        uses.setdefault(id(p), []).append((full, module, attr))
    return uses


def parameter_aliases(model: nn.Module) -> dict[str, str]:
    """{other qualified name: canonical name} of the tensors that have several names (tied)."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    return {
        full: canonical[key]
        for key, uses in parameter_uses(model).items()
        for full, _, _ in uses
        if key in canonical and full != canonical[key]
    }


def prunable_parameters(
    model: nn.Module,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    types: Sequence[type[nn.Module]] | None = None,
    exclude_types: Sequence[type[nn.Module]] = (),
    keep_output_dense: bool = False,
    include_head: bool = False,
) -> dict[str, nn.Parameter]:
    """Prunable parameters of `model` as {canonical name: Parameter}, in model order.

    By default the weights (`WEIGHT_ATTRS`, else `weight`) of modules of `types` (default:
    `default_types()`), less a language model's output head (`output_head`: `lm_head`) and the
    embedding tied to it, which pruning papers and tools leave dense (SparseGPT, Wanda, OBC
    prune the blocks' projections; pruning a tied head prunes the token embedding with it);
    `include_head=True` keeps them. `include` /
    `exclude` are fnmatch patterns on qualified names ("features.*", "*.weight"); `include`
    replaces the type-based default (any parameter matching it is a target, the head too), and
    `exclude` is applied last. `types` replaces the default module types; `exclude_types` removes modules of
    those types (e.g. `(nn.Conv1d,)`), whatever matched them. `keep_output_dense` leaves the last
    prunable layer in registration order dense (the output layer of sequential models; for other
    models exclude the head by name). Raises ValueError when nothing is prunable.

    A tensor shared by several modules is one target keyed by its name in
    `model.named_parameters()` (the first): with `head.weight = emb.weight`, the head's weight is
    the target "emb.weight". Patterns and types are tested on every name and module holding it:
    it is a target if any use selects it, and left dense if any use is excluded (exclusion wins:
    `exclude="head.*"` keeps a tied head dense, and with it the embedding it shares).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    inc, exc = _as_list(include), _as_list(exclude)
    types = default_types() if types is None else tuple(types)
    skip_types = tuple(exclude_types)
    head = None if include_head or inc else output_head(model)
    canonical = {id(p): (n, p) for n, p in model.named_parameters()}
    # tensor ids in the order of their first selecting use (for a tied LM, the head's place, so
    # that keep_output_dense still means the output layer), and those any use excludes
    selected: dict[int, None] = {}
    excluded: set[int] = set()
    for full, module, attr, p in _each_use(model):
        if isinstance(module, skip_types) or any(fnmatch.fnmatchcase(full, pat) for pat in exc):
            excluded.add(id(p))
        if module is head:  # with the embedding it may share: exclusion wins
            excluded.add(id(p))
        if inc:
            hit = any(fnmatch.fnmatchcase(full, pat) for pat in inc)
        else:
            hit = isinstance(module, types) and attr in _lookup(WEIGHT_ATTRS, module, ("weight",))
        if hit:
            selected.setdefault(id(p))
    chosen = dict(canonical[k] for k in selected if k not in excluded)
    if keep_output_dense and chosen:
        chosen.pop(next(reversed(chosen)))
    if not chosen:
        raise ValueError(
            f"nothing to prune in {type(model).__name__}: no parameter matched "
            f"(include={inc or None}, exclude={exc or None}, "
            f"types={[t.__name__ for t in types]}, "
            f"exclude_types={[t.__name__ for t in skip_types]}, keep_output_dense={keep_output_dense}, "
            f"include_head={include_head}); by default the weights of Linear, Conv, "
            "MultiheadAttention and transformers' Conv1D layers are prunable, less an LM's head"
        )
    return chosen


def _channel_dim(module: nn.Module) -> int:
    return 1 if is_transposed_linear(module) else _lookup(CHANNEL_DIM, module, 0)


def channel_layout(
    model: nn.Module, params: Mapping[str, nn.Parameter]
) -> dict[str, tuple[int, int]]:
    """{name: (dim, groups)} for the targets whose output channels do not run along dim 0.

    `allocate(..., channel_layout=...)` groups such a weight's elements by output channel: along
    `dim` 1 in `groups` blocks of dim 0's rows (ConvTranspose), or along dim 1 of an [in, out]
    matrix (transformers' Conv1D: (1, 1), which allocate also reads as "blocks and N:M on the
    transpose"). Tensors not named keep dim 0.
    A tensor used by modules that disagree on the layout is refused: no channel is defined.
    """
    uses = parameter_uses(model)
    out: dict[str, tuple[int, int]] = {}
    for name, p in params.items():
        if id(p) not in uses:
            raise ValueError(f"params[{name!r}] is not a parameter of {type(model).__name__}")
        layouts = {
            (_channel_dim(m), getattr(m, "groups", 1)) if attr == "weight" else (0, 1)
            for _, m, attr in uses[id(p)]
        }
        layouts = {(d, g if d else 1) for d, g in layouts}
        if len(layouts) > 1:
            raise ValueError(
                f"{name!r} is shared by modules whose output channels lie along different dims "
                f"(dim, groups) {sorted(layouts)}: channel granularity is undefined for it; "
                "exclude it from the targets or use another granularity"
            )
        (layout,) = layouts
        if layout != (0, 1):
            out[name] = layout
    return out
