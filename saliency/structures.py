"""The removable units of a transformer, found from its data flow: heads, MLP neurons, blocks.

A transformer block holds two residual branches, each an *in* group of projections that read
one tensor (q/k/v, or GPT-2's fused ``c_attn``; gate/up, or ``c_fc`` / BERT's
``intermediate.dense``) and one *out* projection that writes the branch (``o_proj``,
``c_proj``, ``attention.output.dense``; ``down_proj``, ``mlp.c_proj``, ``output.dense``). A unit
owns some rows of every in projection and the matching input columns of the out projection:

- ``head``: an attention head (q/k/v rows ``h*d:(h+1)*d``, ``o_proj`` columns the same), or
  under grouped-query attention a KV group with its ``H/H_kv`` query heads (removing a query
  head alone would leave the groups unequal, which ``repeat_kv`` cannot express);
- ``neuron``: an MLP intermediate channel (row ``c`` of gate/up, column ``c`` of down).

Found on a probe forward, not from class names: hooks record the order in which the block's
Linear / Conv1D layers run and which tensor each reads; consecutive layers reading one tensor
form an in group, and an in group followed by a single layer whose input width is the in
group's output width is a branch. A branch is attention when its in group has three layers
(q, k, v: the query one is the one as wide as the out projection's input) or one layer three
times as wide (GPT-2's fused q/k/v); an MLP when its one or two layers are all as wide as the
out projection's input. The head width comes from the model's config (``head_dim``, or
``hidden_size / num_attention_heads``). A unit's output is exactly zero when its out columns
are, whatever its in rows and biases compute; that is what ``removed_units`` tests and what
``saliency.compact_transformer`` removes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from saliency.blocks import candidates
from saliency.model_io import Batch
from saliency.targets import is_transposed_linear

Kind = Literal["head", "neuron"]


@dataclass(frozen=True)
class UnitGroup:
    """The ``n`` units of one branch of one block: ``slices[param] = (dim, index [n, k])``
    names the entries of each parameter that a unit owns (in rows, their biases, out columns)."""

    block: int
    kind: Kind
    n: int
    inputs: tuple[str, ...]
    output: str
    slices: Mapping[str, tuple[int, Tensor]]
    queries_per_unit: int = 0  # query heads per unit (head groups); 0 for neurons

    @property
    def columns(self) -> Tensor:
        """``[n, k]``: the out projection's input columns of each unit."""
        return self.slices[f"{self.output}.weight"][1]


@dataclass(frozen=True)
class Structure:
    """``blocks``: the repeated blocks' module names; ``groups``: each block's branches;
    ``sizes``: the number of entries of a unit across the dims it does not index, per
    parameter (``params_per_unit`` = sum over its slices of ``k * size``)."""

    blocks: tuple[str, ...]
    groups: tuple[UnitGroup, ...]
    head_dim: int
    sizes: Mapping[str, int]

    def params_per_unit(self, g: UnitGroup) -> int:
        return sum(ix.shape[1] * self.sizes[p] for p, (_, ix) in g.slices.items())

    def of_block(self, i: int) -> list[UnitGroup]:
        return [g for g in self.groups if g.block == i]


def _linear_like(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or is_transposed_linear(m)


def _widths(m: nn.Module) -> tuple[int, int]:
    """(in, out) features of a Linear or a Conv1D (weight ``[in, out]``)."""
    w = m.weight
    return (w.shape[0], w.shape[1]) if is_transposed_linear(m) else (w.shape[1], w.shape[0])


def head_dim_of(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    d = getattr(cfg, "head_dim", None)
    if d:
        return int(d)
    hidden, heads = getattr(cfg, "hidden_size", None), getattr(cfg, "num_attention_heads", None)
    if not (hidden and heads):
        raise ValueError("finding attention heads needs model.config with head_dim, or "
                         "hidden_size and num_attention_heads (a transformers model)")  # fmt: skip
    return int(hidden) // int(heads)


def _calls(blocks: list[nn.Module], run) -> list[list[tuple[str, int]]]:
    """Per block, [(layer name, id of the tensor it read)] in call order, for its Linear /
    Conv1D layers, from one forward (``run``). The tensors are held until the end so that no
    id is reused."""
    seen: list[list[tuple[str, Tensor]]] = [[] for _ in blocks]
    hooks = [m.register_forward_pre_hook(lambda _m, a, n=n, s=s: s.append((n, a[0])))
             for block, s in zip(blocks, seen, strict=True)
             for n, m in block.named_modules() if _linear_like(m)]  # fmt: skip
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return [[(n, id(t)) for n, t in s] for s in seen]


def _branches(calls: list[tuple[str, int]]) -> list[tuple[list[str], str]]:
    """[(in group, out layer)]: consecutive layers reading one tensor, then one layer alone."""
    groups: list[list[str]] = []
    last = None
    for name, src in calls:
        if src == last and groups:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = src
    out, i = [], 0
    while i + 1 < len(groups):
        if len(groups[i + 1]) == 1:
            out.append((groups[i], groups[i + 1][0]))
            i += 2
        else:
            i += 1
    return out


def _rows(m: nn.Module, prefix: str, index: Tensor) -> dict[str, tuple[int, Tensor]]:
    """The weight rows (output features) ``index`` of a layer and its bias entries."""
    s = {f"{prefix}.weight": (1 if is_transposed_linear(m) else 0, index)}
    if getattr(m, "bias", None) is not None:
        s[f"{prefix}.bias"] = (0, index)
    return s


def _blocks_unit_index(n: int, k: int, offset: int = 0) -> Tensor:
    return offset + torch.arange(n * k).reshape(n, k)


def _branch(b: int, prefix: str, ins: list[str], out: str, mods, d: int) -> UnitGroup | None:
    """The UnitGroup of one branch, or None when its shapes fit neither attention nor an MLP."""
    width = _widths(mods[out])[0]
    outs = [_widths(mods[n])[1] for n in ins]
    o = mods[out]
    cols = {f"{prefix}{out}.weight": (0 if is_transposed_linear(o) else 1, None)}
    if len(ins) == 1 and outs[0] == 3 * width and width % d == 0:  # fused q/k/v (GPT-2)
        n = width // d
        idx = torch.cat([_blocks_unit_index(n, d, j * width) for j in range(3)], 1)
        slices = _rows(mods[ins[0]], prefix + ins[0], idx)
        kind, per = "head", 1
    elif len(ins) == 3 and width % d == 0 and width in outs:  # q, k, v
        q = outs.index(width)
        kv = [w for j, w in enumerate(outs) if j != q]
        if kv[0] != kv[1] or kv[0] % d or width % kv[0]:
            return None
        n, per = kv[0] // d, width // kv[0]
        slices = {}
        for j, name in enumerate(ins):
            k = per * d if j == q else d
            slices |= _rows(mods[name], prefix + name, _blocks_unit_index(n, k))
        kind = "head"
    elif len(ins) in (1, 2) and all(w == width for w in outs):  # gate/up, c_fc
        n, per, kind = width, 0, "neuron"
        slices = {}
        for name in ins:
            slices |= _rows(mods[name], prefix + name, _blocks_unit_index(n, 1))
    else:
        return None
    dim = cols[f"{prefix}{out}.weight"][0]
    k = width // n
    slices[f"{prefix}{out}.weight"] = (dim, _blocks_unit_index(n, k))
    return UnitGroup(b, kind, n, tuple(prefix + i for i in ins), prefix + out, slices, per)


def find_structure(model: nn.Module, example) -> Structure:
    """The blocks, heads and MLP neurons of a transformer (module docstring), found on one
    forward of ``example`` (a batch as ``saliency.prune`` takes it: a dict of tensors, or
    ``(inputs, targets)``, or a tensor of input ids). Refuses a model without repeated blocks or with a branch it cannot
    read, naming it."""
    d = head_dim_of(model)
    mods_all = dict(model.named_modules())
    lin = {n: m for n, m in mods_all.items() if _linear_like(m)}
    found = candidates(model, lin, None)
    if not found:
        raise ValueError("no repeated blocks found (an nn.ModuleList of >= 2 modules of one class "
                         "holding Linear layers): structured transformer pruning needs them")  # fmt: skip
    raw = {"input_ids": example} if isinstance(example, Tensor) else example
    batch = Batch.of(raw)[:1]
    calls = _calls([m for _, m in found], lambda: batch.call(model))
    per_block = [_branches(c) for c in calls]
    groups, sizes = [], {}
    for b, (bname, block) in enumerate(found):
        mods = dict(block.named_modules())
        got = [_branch(b, f"{bname}.", ins, out, mods, d) for ins, out in per_block[b]]
        if not got or any(g is None for g in got):
            raise ValueError(f"block {bname!r}: cannot read its branches {per_block[b]} as "
                             f"attention (q/k/v then out) and MLP (in then out) with head "
                             f"width {d}")  # fmt: skip
        groups += got
    params = dict(model.named_parameters())
    for g in groups:
        for p, (dim, _) in g.slices.items():
            t = params[p]
            sizes[p] = t.numel() // t.shape[dim]
    return Structure(tuple(n for n, _ in found), tuple(groups), d, sizes)


def block_io(args, kwargs, out) -> tuple:
    """A block forward hook's ``(input hidden states, output hidden states)``: the first
    positional argument (or ``hidden_states=``), and the output or its first element."""
    x = args[0] if args else kwargs.get("hidden_states")
    y = out[0] if isinstance(out, (tuple, list)) else out
    return x, y


def unit_masks(structure: Structure, params: Mapping[str, Tensor],
               removed: Mapping[int, Tensor]) -> dict[str, Tensor]:  # fmt: skip
    """Keep-masks (True = keep) over the weights and biases of ``params`` that the units in
    ``removed`` (``{group index: unit ids}``) own; entries owned by no removed unit are kept."""
    masks = {n: torch.ones_like(params[n], dtype=torch.bool) for g in structure.groups
             for n in g.slices if n in params}  # fmt: skip
    for gi, ids in removed.items():
        g = structure.groups[gi]
        for n, (dim, ix) in g.slices.items():
            if n in masks and len(ids):
                masks[n].index_fill_(dim, ix[ids].reshape(-1).to(masks[n].device), False)
    return masks


def removed_units(model: nn.Module, structure: Structure) -> dict[int, Tensor]:
    """``{group index: ids}`` of the units whose out-projection columns are all exactly zero:
    their branch output is zero, so they can be removed (module docstring)."""
    params = dict(model.named_parameters())
    out = {}
    for gi, g in enumerate(structure.groups):
        dim, ix = g.slices[f"{g.output}.weight"]
        W = params[f"{g.output}.weight"].detach()
        cols = W.movedim(dim, 0)[ix.reshape(-1).to(W.device)].reshape(g.n, -1)
        out[gi] = torch.nonzero(~(cols != 0).any(1)).flatten().cpu()
    return out
