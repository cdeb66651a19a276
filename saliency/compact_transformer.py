"""Physical removal of a transformer's removed heads, MLP neurons and blocks (LLM-Pruner style).

What is removed. A unit of `saliency.structures` (an attention head, a KV group with its query
heads under GQA, an MLP neuron) whose out-projection columns are all exactly zero contributes
exactly zero to its branch's output, whatever its in rows compute (``removed_units``): its
in-projection rows and biases and its out-projection columns are sliced away, and the attention
module's head-count attributes follow (``num_heads``, ``num_attention_heads``,
``num_key_value_heads``, ``all_head_size``, GPT-2's ``split_size``; the head width and, since
whole KV groups go, ``num_key_value_groups`` are unchanged). A unit cut unevenly (some of its
out columns nonzero) is kept, which is exact. A branch whose every unit is removed, in a block
that stays, keeps one (zero) unit: ``view(..., -1, head_dim)`` cannot read zero heads.

Blocks. A block whose every unit is removed, with zero (or no) out-projection biases, adds
exactly zero to the residual stream of a pre-norm model (LLaMA, GPT-2): it is deleted from its
``ModuleList``, the ``layer_idx`` of the kept blocks' modules (the KV cache's index) renumbered,
``config.num_hidden_layers`` and ``config.layer_types`` (if any) shortened. That the block is
the identity is checked on the call, not assumed from the class: its output must equal its input
bit for bit on ``example``. A post-norm block (BERT: ``LayerNorm(x + 0)`` is not ``x``) fails
that check and is kept, its units removed. GPT-2 with ``scale_attn_by_inverse_layer_idx``
keeps its blocks: a renumbered layer would be rebuilt with another attention scale.

Config. When every kept layer has the same widths and a model built from the config with them
(``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, ``intermediate_size`` /
``n_inner``, whichever the config has) has exactly the compacted layout (parameter shapes and
head attributes, checked on the meta device), the config says so and plain
``from_pretrained`` reloads the model: LLaMA-family models removed uniformly (``head_dim`` is a
config field; LlamaConfig also needs ``hidden_size % num_attention_heads == 0``), GPT-2 and
BERT with only MLP neurons or blocks removed. Otherwise (widths differing per layer, or GPT-2 /
BERT heads: their head width is ``hidden_size / num_attention_heads``, so a config cannot hold
fewer heads of the same width) the width fields keep their values and the per-layer widths go
to ``config.saliency_layer_widths``; ``load_compacted`` builds the model from the config,
slices each layer to its recorded widths and loads the weights; plain ``from_pretrained``
refuses the checkpoint (size mismatch) rather than loading it wrongly.

Every result is checked (``check``): the compacted model's outputs equal the masked model's on
``example`` in eval mode (1e-9 relative in float64, 1e-4 in float32; a float32 check that fails
is repeated on float64 CPU copies, since a model near collapse amplifies round-off: SmolLM2 at
50% by magnitude differs by 3e-4 in float32 and by 0 in float64), else `CompactError`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from saliency.apply import attached_masks, remove
from saliency.compact import CompactError
from saliency.model_io import Batch, model_output
from saliency.structures import Structure, UnitGroup, block_io, find_structure, removed_units
from saliency.targets import is_transposed_linear, parameter_aliases

log = logging.getLogger(__name__)

WIDTHS_KEY = "saliency_layer_widths"

# attention-module attributes that count heads: value from (query heads h, KV heads hk, head
# width d). Those a module does not have are skipped; the head width and h / hk do not change.
_HEAD_ATTRS = {
    "num_heads": lambda h, hk, d: h,  # GPT-2
    "num_attention_heads": lambda h, hk, d: h,  # BERT
    "num_key_value_heads": lambda h, hk, d: hk,
    "all_head_size": lambda h, hk, d: h * d,  # BERT
    "split_size": lambda h, hk, d: h * d,  # GPT-2: c_attn's output is split in three of these
}
_MLP_FIELDS = ("intermediate_size", "n_inner")  # the config's MLP width, first one it has
# module attributes that must agree between the compacted model and one built from its config
_LAYOUT_ATTRS = (*_HEAD_ATTRS, "num_key_value_groups", "head_dim", "attention_head_size",
                 "scaling", "intermediate_size", "layer_idx")  # fmt: skip


def _raw(example):
    return {"input_ids": example} if isinstance(example, Tensor) else example


@torch.no_grad()
def _eval_output(model: nn.Module, example) -> Tensor:
    was = {m: m.training for m in model.modules()}
    model.eval()
    try:
        return model_output(Batch.of(_raw(example)).call(model))
    finally:
        for m, t in was.items():
            m.training = t


def _check_same(reference: Tensor, got: Tensor) -> None:
    if reference.shape != got.shape:
        raise CompactError(f"the compacted model's output has shape {tuple(got.shape)}, the "
                           f"masked model's {tuple(reference.shape)}")  # fmt: skip
    tol = 1e-9 if reference.dtype == torch.float64 else 1e-4
    err = float((reference - got).abs().max()) if reference.numel() else 0.0
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    if err > tol * max(scale, 1.0):
        raise CompactError(
            f"the compacted model's outputs differ from the masked model's by {err:.3g} (max abs, "
            f"outputs up to {scale:.3g}, tolerance {tol:g} relative): a structure whose units are "
            "not the model's, or an attention / MLP attribute that compaction did not update; "
            "nothing was returned"
        )


def _check_structure(model: nn.Module, structure: Structure) -> None:
    """Refuse a structure that does not index this model's parameters, naming the first misfit."""
    params = dict(model.named_parameters())
    for g in structure.groups:
        for name, (dim, ix) in g.slices.items():
            if name not in params or int(ix.max()) >= params[name].shape[dim]:
                shape = tuple(params[name].shape) if name in params else "no such parameter"
                raise ValueError(
                    f"structure does not fit the model: {name!r} ({shape}) for units indexing "
                    f"dim {dim} up to {int(ix.max())}; pass the structure find_structure found "
                    "on this model, or None"
                )
    for b in range(len(structure.blocks)):
        kinds = [g.kind for g in structure.of_block(b)]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"block {structure.blocks[b]!r} has branches {kinds}: "
                             "compact_transformer handles one attention and one MLP per block "
                             "(no cross-attention)")  # fmt: skip


def _out_bias_zero(model: nn.Module, g: UnitGroup) -> bool:
    b = getattr(model.get_submodule(g.output), "bias", None)
    return b is None or not bool(b.detach().any())


def _block_list(model: nn.Module, structure: Structure) -> nn.ModuleList | None:
    """The ModuleList holding exactly the structure's blocks, in order, or None."""
    parent = {n.rpartition(".")[0] for n in structure.blocks}
    if len(parent) != 1:
        return None
    holder = model.get_submodule(parent.pop())
    names = [n.rpartition(".")[2] for n in structure.blocks]
    if not isinstance(holder, nn.ModuleList) or names != [str(i) for i in range(len(holder))]:
        return None
    return holder


def _identity_blocks(model, structure: Structure, removed, example) -> set[int]:
    """The blocks with every unit removed, zero out biases, whose output equals their input bit
    for bit on ``example`` (module docstring); the others are kept, with a log line."""
    gone = {b: True for b in range(len(structure.blocks))}
    for gi, g in enumerate(structure.groups):
        gone[g.block] &= len(removed[gi]) == g.n and _out_bias_zero(model, g)
    full = {b for b, all_gone in gone.items() if all_gone}
    if not full:
        return set()
    cfg = getattr(model, "config", None)
    n_layers = getattr(cfg, "num_hidden_layers", None)
    why = None
    if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
        why = "the attention scale depends on layer_idx (scale_attn_by_inverse_layer_idx)"
    elif _block_list(model, structure) is None or n_layers != len(structure.blocks):
        why = "the blocks are not the whole layer list counted by config.num_hidden_layers"
    if why:
        log.info(
            "compact_transformer: %d block(s) with every unit removed kept: %s", len(full), why
        )
        return set()
    same: dict[int, bool] = {}

    def hook(b):
        def record(_m, args, kwargs, out):
            x, y = block_io(args, kwargs, out)
            same[b] = isinstance(x, Tensor) and isinstance(y, Tensor) and torch.equal(x, y)

        return record

    blocks = [model.get_submodule(structure.blocks[b]) for b in sorted(full)]
    handles = [m.register_forward_hook(hook(b), with_kwargs=True)
               for b, m in zip(sorted(full), blocks, strict=True)]  # fmt: skip
    try:
        _eval_output(model, example)
    finally:
        for h in handles:
            h.remove()
    kept = sorted(b for b in full if not same.get(b, False))
    if kept:
        log.info("compact_transformer: block(s) %s have every unit removed but are not the "
                 "identity (post-norm: a LayerNorm after the residual sum, as in BERT): kept, "
                 "one zero unit per branch", [structure.blocks[b] for b in kept])  # fmt: skip
    return full - set(kept)


def _set_param(module: nn.Module, attr: str, value: Tensor, like: nn.Parameter) -> None:
    setattr(module, attr, nn.Parameter(value, requires_grad=like.requires_grad))


def _fix_features(m: nn.Module) -> None:
    """Linear ``in/out_features`` or Conv1D ``nx/nf`` from the (sliced) weight."""
    w = m.weight
    if is_transposed_linear(m):
        for attr, n in (("nx", w.shape[0]), ("nf", w.shape[1])):
            if hasattr(m, attr):
                setattr(m, attr, n)
    elif isinstance(m, nn.Linear):
        m.out_features, m.in_features = w.shape


def _shrink(model: nn.Module, g: UnitGroup, keep: Tensor, head_dim: int) -> None:
    """Keep units ``keep`` of group ``g``: slice its parameters (entries in their original
    order, which keeps GPT-2's fused [q | k | v] layout) and update the module attributes."""
    for name, (dim, ix) in g.slices.items():
        mod_name, _, attr = name.rpartition(".")
        m = model.get_submodule(mod_name)
        p = getattr(m, attr)
        idx = ix[keep].reshape(-1).sort().values.to(p.device)
        _set_param(m, attr, p.detach().index_select(dim, idx).clone(), p)
    for name in (*g.inputs, g.output):
        _fix_features(model.get_submodule(name))
    owner = model.get_submodule(g.inputs[0].rpartition(".")[0])
    n = len(keep)
    if g.kind == "head":
        for attr, f in _HEAD_ATTRS.items():
            if isinstance(vars(owner).get(attr), int):
                setattr(owner, attr, f(n * g.queries_per_unit, n, head_dim))
    elif isinstance(vars(owner).get("intermediate_size"), int):
        owner.intermediate_size = n


def _drop_blocks(model: nn.Module, structure: Structure, drop: set[int]) -> None:
    """Delete blocks ``drop``; renumber ``layer_idx``; shorten the per-layer config."""
    if not drop:
        return
    holder = _block_list(model, structure)
    for b in sorted(drop, reverse=True):
        del holder[b]
    for i, block in enumerate(holder):
        for m in block.modules():
            if isinstance(vars(m).get("layer_idx"), int):
                m.layer_idx = i
    cfg = model.config
    types = getattr(cfg, "layer_types", None)
    cfg.num_hidden_layers = len(holder)
    if isinstance(types, (list, tuple)) and len(types) == len(structure.blocks):
        cfg.layer_types = [t for b, t in enumerate(types) if b not in drop]


def _widths(structure: Structure, kept: dict[int, int], blocks: list[int]) -> list[dict]:
    """Per kept block, in config words: query heads, KV heads, MLP width."""
    out: dict[int, dict] = {b: {} for b in blocks}
    for gi, g in enumerate(structure.groups):
        if g.block not in out:
            continue
        n = kept[gi]
        if g.kind == "head":
            out[g.block] |= {
                "num_attention_heads": n * g.queries_per_unit,
                "num_key_value_heads": n,
            }
        else:
            out[g.block]["intermediate_size"] = n
    return list(out.values())


def _layout(model: nn.Module) -> dict:
    """Parameter shapes and head / width attributes: what a config must reproduce."""
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    attrs = {f"{n}.{a}": vars(m)[a] for n, m in model.named_modules()
             for a in _LAYOUT_ATTRS if a in vars(m)}  # fmt: skip
    return shapes | attrs


def _config_fields(cfg, widths: list[dict], head_dim: int) -> dict | None:
    """The config fields that state ``widths`` when every layer agrees, else None."""
    if not widths:
        return {}
    if any(w != widths[0] for w in widths):
        return None
    w, fields = widths[0], {}
    if "num_attention_heads" in w:
        fields["num_attention_heads"] = w["num_attention_heads"]
        for key, value in (
            ("num_key_value_heads", w["num_key_value_heads"]),
            ("head_dim", head_dim),
        ):
            if hasattr(cfg, key):
                fields[key] = value
    if "intermediate_size" in w:
        key = next((k for k in _MLP_FIELDS if hasattr(cfg, k)), None)
        if key is None:
            return None
        fields[key] = w["intermediate_size"]
    return fields


def _expresses(model: nn.Module, cfg) -> bool:
    """Does ``type(model)(cfg)`` have exactly ``model``'s layout? Built on the meta device."""
    try:
        if hasattr(cfg, "validate"):
            cfg.validate()
        with torch.device("meta"):
            ref = type(model)(cfg)
    except Exception as e:  # any refusal of the config means it cannot state these widths
        log.debug("compact_transformer: the config cannot state the widths: %s", e)
        return False
    return _layout(ref) == _layout(model)


def _write_config(model: nn.Module, widths: list[dict], head_dim: int) -> bool:
    """Uniform widths into the config fields when a model built from them is this one (True),
    else the per-layer widths into ``config.saliency_layer_widths`` (module docstring)."""
    cfg = model.config
    if hasattr(cfg, WIDTHS_KEY):  # from an earlier compaction
        delattr(cfg, WIDTHS_KEY)
    fields = _config_fields(cfg, widths, head_dim)
    if fields is not None:
        trial = copy.deepcopy(cfg)
        for k, v in fields.items():
            setattr(trial, k, v)
        if _expresses(model, trial):
            for k, v in fields.items():
                setattr(cfg, k, v)
            return True
    setattr(cfg, WIDTHS_KEY, widths)
    return False


def compact_transformer(
    model: nn.Module, example, structure: Structure | None = None, *, check: bool = True
) -> nn.Module:
    """A copy of the Hugging Face transformer ``model`` (LLaMA family, GPT-2, BERT) with its
    removed heads, MLP neurons and identity blocks physically removed and its config rewritten
    (module docstring); ``model`` is untouched, as with `saliency.compact`.

    ``example``: a batch (input ids, or a mapping of model keyword arguments) on which the
    structure is found, blocks are proven identities, and the outputs are checked (``check``).
    Masks attached to ``model`` are baked into the copy, which is a plain model: save it with
    ``save_pretrained``; reload it with ``from_pretrained`` where its config states its widths,
    else with `load_compacted`. ``structure``: `find_structure`'s result on ``model``.
    """
    new = copy.deepcopy(model)
    if attached_masks(new) is not None:
        remove(new)
    structure = structure if structure is not None else find_structure(new, example)
    _check_structure(new, structure)
    removed = removed_units(new, structure)
    drop = _identity_blocks(new, structure, removed, example)
    kept, refilled = {}, 0
    for gi, g in enumerate(structure.groups):
        keep = torch.ones(g.n, dtype=torch.bool)
        keep[removed[gi]] = False
        if not keep.any():
            keep[removed[gi][0]], refilled = True, refilled + (g.block not in drop)
        kept[gi] = int(keep.sum())
        if g.block not in drop and kept[gi] < g.n:
            _shrink(new, g, keep.nonzero().flatten(), structure.head_dim)
    _drop_blocks(new, structure, drop)
    blocks = [b for b in range(len(structure.blocks)) if b not in drop]
    plain = _write_config(new, _widths(structure, kept, blocks), structure.head_dim)
    gone = {"head": 0, "neuron": 0}
    for gi, g in enumerate(structure.groups):
        gone[g.kind] += 0 if g.block in drop else g.n - kept[gi]
    where = "the config states the widths" if plain else f"per-layer widths in config.{WIDTHS_KEY}"
    log.info("compact_transformer: removed %d head unit(s), %d neuron(s), %d block(s); %s",
             gone["head"], gone["neuron"], len(drop), where)  # fmt: skip
    if refilled:
        log.info("compact_transformer: %d branch(es) of kept blocks had every unit removed: one "
                 "zero unit kept each", refilled)  # fmt: skip
    if check:
        _check(model, new, example)
    return new


def _check(model: nn.Module, new: nn.Module, example) -> None:
    """The outputs agree; where a low-precision check fails, it is repeated in float64 on CPU
    copies (a model near collapse amplifies float32 round-off past 1e-4: the structure is what
    is checked, and there the float64 outputs agree to 1e-9)."""
    try:
        _check_same(_eval_output(model, example), _eval_output(new, example))
    except CompactError:
        if next(model.parameters()).dtype == torch.float64:
            raise
        wide = [copy.deepcopy(m).to("cpu", torch.float64) for m in (model, new)]
        _check_same(*(_eval_output(m, example) for m in wide))
        log.info("compact_transformer: float32 outputs differ past 1e-4 (round-off amplified); "
                 "float64 copies agree")  # fmt: skip


def _saved_state(directory: Path) -> dict[str, Tensor]:
    """The tensors of a ``save_pretrained`` directory (safetensors, sharded or not)."""
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    missing = [f for f in files if not (directory / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory} lacks {missing}: load_compacted reads the "
                                "safetensors files that save_pretrained writes")  # fmt: skip
    state: dict[str, Tensor] = {}
    for f in files:
        state |= load_file(directory / f)
    return state


def reshape_to_widths(model: nn.Module, widths: list[dict]) -> None:
    """Slice each layer of a model built from its config to its recorded ``widths``."""
    probe = torch.zeros(1, 2, dtype=torch.long)
    structure = find_structure(model, probe)
    if len(widths) != len(structure.blocks):
        raise ValueError(f"config.{WIDTHS_KEY} lists {len(widths)} layers; the model built from "
                         f"the config has {len(structure.blocks)}")  # fmt: skip
    for g in structure.groups:
        key = "num_key_value_heads" if g.kind == "head" else "intermediate_size"
        n = widths[g.block].get(key)
        if not isinstance(n, int) or not 1 <= n <= g.n:
            raise ValueError(f"config.{WIDTHS_KEY}[{g.block}][{key!r}] = {n!r}; accepted: an "
                             f"integer from 1 to {g.n} (the config's width)")  # fmt: skip
        if n < g.n:
            _shrink(model, g, torch.arange(n), structure.head_dim)


def has_layer_widths(directory: str | os.PathLike) -> bool:
    """Does the config saved in ``directory`` record per-layer widths (needs `load_compacted`)?"""
    path = Path(directory) / "config.json"
    return path.is_file() and bool(json.loads(path.read_text()).get(WIDTHS_KEY))


def load_compacted(
    directory: str | os.PathLike, model_class=None, *, dtype: torch.dtype | None = None
) -> nn.Module:
    """The model `compact_transformer` made and ``save_pretrained`` wrote to ``directory``.

    Widths stated by the config: ``model_class.from_pretrained(directory)``. Per-layer widths
    (``config.saliency_layer_widths``): the model is built from the config (full widths, random
    weights), each layer sliced to its widths, then the saved tensors loaded into it, in their
    saved dtype (or ``dtype``). ``model_class``: default, the class the config's
    ``architectures`` names. Returned in eval mode, as ``from_pretrained`` does."""
    import transformers

    from saliency.hf import model_class_of

    directory = Path(directory)
    config = transformers.AutoConfig.from_pretrained(directory)
    model_class = model_class or model_class_of(config, directory)
    widths = getattr(config, WIDTHS_KEY, None)
    if not widths:
        extra = {"dtype": dtype} if dtype is not None else {}
        return model_class.from_pretrained(directory, **extra)
    model = (getattr(model_class, "from_config", None) or model_class)(config)  # Auto* or a class
    reshape_to_widths(model, widths)
    state = _saved_state(directory)
    floating = [t.dtype for t in state.values() if t.is_floating_point()]
    if floating:
        model.to(floating[0])
    got = model.load_state_dict(state, strict=False)
    tied = parameter_aliases(model)
    missing = [k for k in got.missing_keys if k not in tied]
    if missing or got.unexpected_keys:
        raise ValueError(f"the weights in {directory} do not fit the model built from its config "
                         f"and {WIDTHS_KEY}: missing {missing[:5]}, unexpected "
                         f"{got.unexpected_keys[:5]}")  # fmt: skip
    if dtype is not None:
        model.to(dtype)
    return model.eval()
