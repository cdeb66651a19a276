"""Channel groups: which output channels of a model must be pruned together, and what else each
channel owns (its bias, the BatchNorm after it).

A residual addition ties the output channels of every convolution whose output is added; a
depthwise convolution ties its input and output channels; BatchNorm follows its convolution.
The dependency graph comes from Torch-Pruning (`torch_pruning.DependencyGraph`, DepGraph: Fang
et al. 2023), which traces the model with autograd and handles additions, concatenation,
splits, flatten before a Linear head and depthwise convolutions: a well-kept library instead of
our own tracer. It is an optional dependency (`pip install "saliency[compact]"`).

One layout DepGraph cannot trace is the parameter-free "option A" shortcut of CIFAR ResNets
(subsample and zero-pad channels): a pad of the channel dim is not an op it maps. Models write
that shortcut as a `ChannelPad` module, which DepGraph then treats as a layer with its own input
and output channels, and `channel_groups` ties output channel j to the input channel it copies,
so that a unit spans both stages (pruning stage-2 channel j alone would leave the copy of the
stage-1 channel flowing into it).

A *unit* is one set of tied channels: pruning a unit zeroes every member's rows. `ChannelGroups`
maps each prunable target to the unit id of each of its output channels (`allocate(...,
groups=...)` prunes units whole), and holds the other parameters each unit owns (biases,
BatchNorm weight and bias) so that a pruned channel's output is exactly zero, not a constant.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saliency.masks import Masks
from saliency.targets import is_transposed_linear, prunable_parameters

log = logging.getLogger(__name__)

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class ChannelPad(nn.Module):
    """Parameter-free shortcut ``out[:, j] = x[:, source[j], ::stride, ::stride]`` (zero where
    ``source[j] < 0``): the option-A shortcut of He et al. 2016 (subsample, zero-pad channels),
    as a module so that channel groups and `compact` can follow it."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        if c_out < c_in:
            raise ValueError(f"ChannelPad pads channels: c_out ({c_out}) must be >= c_in ({c_in})")
        lo = (c_out - c_in) // 2
        source = torch.full((c_out,), -1, dtype=torch.long)
        source[lo : lo + c_in] = torch.arange(c_in)
        self.in_channels, self.stride = c_in, stride
        self.register_buffer("source", source, persistent=False)  # no state_dict change

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        # one extra zero channel at index in_channels; index_select keeps vmap/torch.func working
        zero_pad = (0, 0) * (x.dim() - 2) + (0, 1)
        idx = torch.where(self.source < 0, self.in_channels, self.source)
        return F.pad(x, zero_pad).index_select(1, idx)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {len(self.source)}, stride={self.stride}"


def _pad_pruner():
    import torch_pruning as tp

    class ChannelPadPruner(tp.pruner.function.BasePruningFunc):
        """Input and output channels pruned separately (no intra-layer dependency): a removed
        input channel is a dead (zero) channel, so its copies become zero channels."""

        TARGET_MODULES = (ChannelPad,)

        def prune_out_channels(self, layer, idxs):
            keep = [j for j in range(len(layer.source)) if j not in set(idxs)]
            layer.source = layer.source[keep]
            return layer

        def prune_in_channels(self, layer, idxs):
            gone = set(idxs)
            new = torch.full((layer.in_channels,), -1, dtype=torch.long)
            kept = [i for i in range(layer.in_channels) if i not in gone]
            new[kept] = torch.arange(len(kept))
            src = layer.source
            layer.source = torch.where(src < 0, -1, new.to(src.device)[src.clamp(min=0)])
            layer.in_channels = len(kept)
            return layer

        def get_out_channels(self, layer):
            return len(layer.source)

        def get_in_channels(self, layer):
            return layer.in_channels

    return ChannelPadPruner()


def dependency_graph(model: nn.Module, example_inputs):
    """Torch-Pruning's DependencyGraph of `model` (traced once on `example_inputs`), with the
    `ChannelPad` rule; the model's training mode is restored (tracing sets eval)."""
    try:
        import torch_pruning as tp
    except ImportError:  # an optional dependency: say how to get it
        raise ImportError(
            "channel groups and compact need the optional torch-pruning package: "
            'pip install "saliency[compact]" (or pip install --no-deps torch-pruning)'
        ) from None
    conv1d = [n for n, m in model.named_modules() if is_transposed_linear(m)]
    if conv1d:  # DepGraph has no rule for it: it would slice its [in, out] weight along dim 0
        raise ValueError(
            f"channel groups and compact cannot follow transformers' Conv1D layers ({conv1d[:3]}"
            f"{' ...' if len(conv1d) > 3 else ''}): Torch-Pruning's dependency graph does not "
            "know their [in, out] weight layout; prune such models without groups= (channel, "
            "element, block or N:M granularity) and keep the pruned shapes"
        )
    was_training = {m: m.training for m in model.modules()}
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=example_inputs,
                customized_pruners={ChannelPad: _pad_pruner()}, verbose=False,
            )  # fmt: skip
    finally:
        for m, t in was_training.items():
            m.training = t


def _out_params(module: nn.Module, mod_name: str) -> tuple[list[str], list[str]]:
    """(weights, others): the parameters whose entries along dim 0 are the module's output
    channels, by layer type (anything else that holds parameters is refused, never guessed)."""
    join = (lambda a: f"{mod_name}.{a}") if mod_name else (lambda a: a)
    if isinstance(module, (*_CONV, nn.Linear)):
        if isinstance(module, _CONV) and 1 < module.groups != module.out_channels:
            raise ValueError(
                f"{mod_name!r} is a grouped convolution (groups={module.groups}, not depthwise): "
                "removing channels would change its group sizes; channel groups support dense "
                "and depthwise convolutions"
            )
        return [join("weight")], [join("bias")] if module.bias is not None else []
    if isinstance(module, _NORM):
        return [], [join(a) for a in ("weight", "bias") if getattr(module, a) is not None]
    if isinstance(module, ChannelPad) or not any(True for _ in module.parameters(recurse=False)):
        return [], []
    raise ValueError(
        f"{mod_name!r} ({type(module).__name__}) holds parameters in a channel group, and "
        "compact does not know which of its entries belong to a channel; supported: Linear, "
        "Conv1d/2d/3d (dense or depthwise), BatchNorm, ChannelPad"
    )


class ChannelGroups(Mapping[str, Tensor]):
    """{target name: LongTensor [out channels] of unit ids}: equal ids are tied channels.

    `owned` maps every parameter a unit owns (Linear / Conv weight rows, biases, BatchNorm
    weight and bias) to the unit id of each entry along dim 0; `weights` names the Linear / Conv
    weights among them. `dg_units` lists, per DepGraph group, (root module, unit id of each root
    channel): what `compact` prunes. `outputs` are the units that reach the model's output (the
    classes of a head): `compact` never removes them.
    """

    def __init__(self, units, owned, weights, dg_units, outputs):
        self._units, self.owned, self.weights = units, owned, weights
        self.dg_units, self.outputs = dg_units, outputs

    def __getitem__(self, name: str) -> Tensor:
        return self._units[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._units)

    def __len__(self) -> int:
        return len(self._units)

    def __repr__(self) -> str:
        n = len(torch.cat(list(self._units.values())).unique())
        return f"ChannelGroups({len(self)} tensors, {n} units)"

    def pruned_units(self, masks: Mapping[str, Tensor]) -> Tensor:
        """Ids of the units whose rows `masks` prunes in every Linear / Conv weight that has
        them; a unit cut unevenly, or with rows in a weight `masks` does not name (not a
        target), is not pruned."""
        alive = set()
        for name in self.weights:
            ids = self.owned[name]
            if name in masks:
                alive.update(ids[masks[name].reshape(len(ids), -1).any(1).cpu()].tolist())
            else:
                alive.update(ids.tolist())
        every = torch.cat([self.owned[n] for n in self.weights]).unique()
        return every[~torch.isin(every, torch.tensor(sorted(alive), dtype=torch.long))]

    def owned_masks(self, masks: Mapping[str, Tensor], model: nn.Module) -> Masks:
        """Keep-masks of the parameters the pruned units own besides the targets (biases,
        BatchNorm weight and bias): zeroing them makes a pruned channel's output exactly zero.
        `saliency.prune(..., groups=...)` applies and attaches them with the target masks."""
        dead = self.pruned_units(masks)
        params = dict(model.named_parameters())
        out = {}
        for name, ids in self.owned.items():
            if name in masks or name not in params:
                continue
            keep = ~torch.isin(ids, dead)
            out[name] = keep.view(-1, *[1] * (params[name].dim() - 1)).expand(params[name].shape)
        return Masks(out) if out else None


def channel_groups(
    model: nn.Module, example_inputs, *, params: Mapping[str, Tensor] | None = None, graph=None
) -> ChannelGroups:
    """The tied output channels of `model` (module docstring), traced on `example_inputs`.

    `params` (default `prunable_parameters(model)`) are the targets the units are reported for.
    Raises ValueError for layouts that cannot be removed exactly (grouped convolutions, layers
    with parameters of unknown channel layout in a group).
    """
    params = dict(params) if params is not None else prunable_parameters(model)
    DG = graph if graph is not None else dependency_graph(model, example_inputs)
    names = {m: n for n, m in model.named_modules()}
    parent: dict[tuple[int, int], tuple[int, int]] = {}

    def find(a):
        while parent.setdefault(a, a) != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    owned_at: dict[str, dict[int, tuple[int, int]]] = {}  # param -> {entry: (group, root ch)}
    pad_in: dict[nn.Module, dict[int, tuple[int, int]]] = {}
    pad_out: dict[nn.Module, dict[int, tuple[int, int]]] = {}
    roots, at_output, weights = [], set(), set()
    root_types = (*_CONV, nn.Linear)
    for g, group in enumerate(DG.get_all_groups(root_module_types=root_types)):
        root = group[0].dep.target.module
        roots.append(root)
        # channels that reach the model's output (a node with no consumer) are never removed
        if any(not i.dep.target.outputs and DG.is_out_channel_pruning_fn(i.dep.handler)
               for i in group):  # fmt: skip
            at_output.add(g)
        for item in group:
            module = item.dep.target.module
            if module not in names:  # DepGraph's own op nodes (add, relu, cat) and bare tensors
                continue
            out_side = DG.is_out_channel_pruning_fn(item.dep.handler)
            for idx, r in zip(item.idxs, item.root_idxs, strict=True):
                find((g, r))
                if isinstance(module, ChannelPad):
                    (pad_out if out_side else pad_in).setdefault(module, {})[idx] = (g, r)
                elif out_side:
                    w, others = _out_params(module, names[module])
                    weights.update(w)
                    for name in (*w, *others):
                        owned_at.setdefault(name, {})[idx] = (g, r)
    for pad, outs in pad_out.items():  # output channel j carries input channel source[j]
        for j, node in outs.items():
            i = int(pad.source[j])
            if i >= 0 and i in pad_in.get(pad, {}):
                parent[find(node)] = find(pad_in[pad][i])
    ids: dict[tuple[int, int], int] = {}
    unit = {}
    for key in parent:
        unit[key] = ids.setdefault(find(key), len(ids))
    all_params = dict(model.named_parameters())
    owned = {}
    for name, entries in owned_at.items():
        n = all_params[name].shape[0]
        if sorted(entries) != list(range(n)):
            raise ValueError(f"the channel groups cover only some output channels of {name!r}")
        owned[name] = torch.tensor([unit[entries[c]] for c in range(n)], dtype=torch.long)
    missing = [n for n in params if n not in owned]
    if missing:
        raise ValueError(
            f"targets {missing[:5]} are not in any channel group of the traced graph (not run "
            "on example_inputs, or not the weight of a Linear / Conv layer): channel groups "
            "cover Linear and Conv1d/2d/3d weights"
        )
    units = {n: owned[n] for n in params}
    dg_units, outputs = [], set()
    for g, root in enumerate(roots):
        ids_g = torch.tensor([unit[(g, r)] for r in range(DG.get_out_channels(root))])
        dg_units.append((root, ids_g))
        if g in at_output:
            outputs.update(ids_g.tolist())
    outputs = torch.tensor(sorted(outputs), dtype=torch.long)
    return ChannelGroups(units, owned, sorted(weights), dg_units, outputs)
