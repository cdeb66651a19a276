"""Structured pruning of transformers: attention heads, MLP neurons, whole blocks.

``saliency.prune(model, crit, sparsity, data=..., granularity=G)`` with ``G`` one of

- ``"head"``: attention heads (KV groups with their query heads under GQA),
- ``"neuron"``: MLP intermediate neurons,
- ``"width"``: both, in one budget counted in parameters,
- ``"depth"``: whole blocks (``sparsity`` = fraction of the blocks),

on the units of ``saliency.structures`` (``structure=`` to pass them, else found on the first
batch). ``sparsity`` is the fraction of the parameters the units own (their in rows and biases
and out columns). The names differ from allocate's ``channel`` (one tensor's output rows) and
``block`` (``h x w`` tiles), which keep their meaning on transformers.

Scores of units. Any element criterion works: its scores of a unit's weights reduced by the
criterion's ``channel_reduce`` (L2 by default: magnitude gives the unit's L2 norm). A criterion
may score units itself (``unit_scores``: FLAP, structured OBS) and blocks (``block_scores``:
Block Influence), remove units with its own solver (``solve_units``: structured OBS with its
joint update) and compensate removed units (``compensate``: FLAP's bias).

Allocation. ``scope="layer"``: the same widths in every block (``round(s n)`` of the heads,
then the MLP neurons that bring each block to ``s`` of its parameters under "width"), the
cheapest units of each branch going: the compacted model has one width per kind and loads in
plain ``transformers``. ``scope="global"``: one budget over the model, units cheapest first by
cost per parameter (an element criterion's ``l2`` score is squared first: mean square per
parameter), or by the criterion's own comparable score when it says so (``per_parameter =
False``: FLAP's standardized scores); per-block widths need ``saliency.load_compacted``. Each
branch keeps at least one unit, so no layer is emptied (``"depth"`` removes whole blocks).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from saliency.model_io import iter_batches, model_device
from saliency.structures import Structure, block_io, find_structure, unit_masks

GRANULARITIES = ("head", "neuron", "width", "depth")
_KINDS = {"head": ("head",), "neuron": ("neuron",), "width": ("head", "neuron")}


def is_structured(granularity) -> bool:
    return isinstance(granularity, str) and granularity in GRANULARITIES


def check_structured(sparsity, scope: str, granularity: str) -> None:
    if (
        not isinstance(sparsity, (int, float))
        or isinstance(sparsity, bool)
        or not 0 <= sparsity < 1
    ):
        raise ValueError(f"granularity {granularity!r} needs a sparsity in [0, 1) (the fraction "
                         f"of the units' parameters, or of the blocks); got {sparsity!r}")  # fmt: skip
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global'; got {scope!r}")
    if granularity == "depth" and scope != "global":
        raise ValueError("granularity 'depth' removes whole blocks from one ranking: scope must "
                         "be 'global'")  # fmt: skip


def _first_batch(data):
    return next(iter(iter_batches(data, 1)))


_REDUCE = {
    "sum": lambda s: s.sum(1),
    "mean": lambda s: s.mean(1),
    "max": lambda s: s.amax(1),
    "l2": lambda s: s.square().sum(1).sqrt(),
}


def element_unit_scores(structure: Structure, scores: Mapping[str, Tensor], reduce: str, groups):
    """``{group index: [n]}``: each unit's element scores (over its weights) reduced."""
    out = {}
    for gi in groups:
        g, parts = structure.groups[gi], []
        for p, (dim, ix) in g.slices.items():
            if p in scores:
                s = scores[p].detach().movedim(dim, 0)[ix.reshape(-1).to(scores[p].device)]
                parts.append(s.reshape(g.n, -1).double().cpu())
        s = torch.cat(parts, 1)
        out[gi] = _REDUCE[reduce](s)
    return out


def _costs(structure, scores: Mapping[int, Tensor], per_parameter: bool, squared: bool):
    out = {}
    for gi, s in scores.items():
        c = s.square() if squared else s
        out[gi] = c / structure.params_per_unit(structure.groups[gi]) if per_parameter else c
    return out


def allocate_units(structure: Structure, costs: Mapping[int, Tensor], sparsity: float,
                   scope: str) -> dict[int, Tensor]:  # fmt: skip
    """``{group: unit ids to remove}``, the cheapest of each group (ties in unit order), each
    group keeping one unit. ``scope="layer"``: the same counts in every block
    (``layer_counts``); ``"global"``: the cheapest units over the model until ``sparsity`` of
    its units' parameters are removed (to the nearest unit)."""
    if scope == "layer":
        counts = layer_counts(structure, sorted(costs), sparsity)
        return {gi: torch.sort(costs[gi], stable=True).indices[: counts[gi]].sort().values
                for gi in costs}  # fmt: skip
    size = {gi: structure.params_per_unit(structure.groups[gi]) for gi in costs}
    budget = sparsity * sum(size[gi] * structure.groups[gi].n for gi in costs)
    cand = sorted((float(c), gi, u) for gi in costs for u, c in enumerate(costs[gi].tolist()))
    left = {gi: structure.groups[gi].n for gi in costs}
    removed, done = {gi: [] for gi in costs}, 0.0
    for _, gi, u in cand:
        if done + size[gi] / 2 <= budget and left[gi] > 1:
            removed[gi].append(u)
            left[gi] -= 1
            done += size[gi]
    return {gi: torch.tensor(sorted(r), dtype=torch.long) for gi, r in removed.items()}


def layer_counts(structure: Structure, groups, sparsity: float) -> dict[int, int]:
    """Units to remove per group so that every block loses ``sparsity`` of its units'
    parameters with the same widths everywhere (a uniform model: plain transformers loads it):
    ``round(s n)`` of the heads, then as many neurons as bring the block's removed parameters
    nearest to ``s`` of them; each group keeps one unit."""
    out = {}
    for b in sorted({structure.groups[gi].block for gi in groups}):
        mine = [gi for gi in groups if structure.groups[gi].block == b]
        total = sum(structure.params_per_unit(structure.groups[gi]) * structure.groups[gi].n
                    for gi in mine)  # fmt: skip
        done = 0
        for gi in sorted(mine, key=lambda gi: structure.groups[gi].kind != "head"):  # heads first
            g, size = structure.groups[gi], structure.params_per_unit(structure.groups[gi])
            last = gi == max(mine, key=lambda gi: structure.groups[gi].kind != "head")
            want = (sparsity * total - done) / size if last else sparsity * g.n
            out[gi] = min(max(round(want), 0), g.n - 1)
            done += out[gi] * size
    return out


def block_influence(model: nn.Module, structure: Structure, data, n_samples) -> Tensor:
    """``[B]``: Block Influence ``1 - E_tokens cos(x_in, x_out)`` of each block (ShortGPT, Men
    et al. 2024), over the unpadded tokens of the calibration batches, on the model as is."""
    mods = dict(model.named_modules())
    total = torch.zeros(len(structure.blocks), dtype=torch.float64)
    count = torch.zeros(len(structure.blocks), dtype=torch.float64)
    mask: list[Tensor | None] = [None]

    def hook(i):
        def h(_m, args, kwargs, out):
            x, y = block_io(args, kwargs, out)
            cos = torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1)
            keep = mask[0] if mask[0] is not None else torch.ones_like(cos, dtype=torch.bool)
            total[i] += cos[keep.to(cos.device)].sum().cpu()
            count[i] += keep.sum().cpu()

        return h

    hooks = [mods[b].register_forward_hook(hook(i), with_kwargs=True)
             for i, b in enumerate(structure.blocks)]  # fmt: skip
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            for batch in iter_batches(data, n_samples, device=model_device(model)):
                mask[0] = batch.token_mask
                batch.call(model)
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.train(mode)
    return 1 - total / count.clamp_min(1)


def depth_removal(structure: Structure, block_scores: Tensor, sparsity: float) -> dict[int, Tensor]:
    """Every unit of the ``round(sparsity * B)`` lowest-scored blocks (ties: the later block)."""
    k = round(sparsity * len(structure.blocks))
    order = sorted(range(len(block_scores)), key=lambda i: (float(block_scores[i]), -i))
    gone = set(order[:k])
    return {gi: (torch.arange(g.n) if g.block in gone else torch.zeros(0, dtype=torch.long))
            for gi, g in enumerate(structure.groups)}  # fmt: skip


def _block_masks(structure, params, removed, gone_blocks) -> dict[str, Tensor]:
    """The out projections' biases of removed blocks: zero, so that the block is an identity."""
    out = {}
    for g in structure.groups:
        b = f"{g.output}.bias"
        if g.block in gone_blocks and b in params:
            out[b] = torch.zeros_like(params[b], dtype=torch.bool)
    return out


def check_identity(model: nn.Module, structure: Structure, masks, example) -> None:
    """Refuse ``"depth"`` on blocks that do not become identities once emptied (post-norm blocks,
    as BERT's, normalize the residual sum): their removal would not be exact."""
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in masks}
    mods = dict(model.named_modules())
    worst = {}

    def hook(name):
        def h(_m, args, kwargs, out):
            x, y = block_io(args, kwargs, out)
            worst[name] = float((y - x).abs().max() / x.abs().max().clamp_min(1e-30))

        return h

    gone = {structure.blocks[g.block] for g in structure.groups if f"{g.output}.weight" in masks
            and not masks[f"{g.output}.weight"].any()}  # fmt: skip
    hooks = [mods[b].register_forward_hook(hook(b), with_kwargs=True) for b in gone]
    try:
        with torch.no_grad():
            for n, k in masks.items():
                params[n].mul_(k.to(params[n].dtype))
            example.call(model)
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for n, t in saved.items():
                params[n].copy_(t)
    bad = sorted(b for b, e in worst.items() if e > 1e-5)
    if bad:
        raise ValueError(f"granularity 'depth': blocks {bad} are not identities once their heads "
                         f"and neurons are removed (post-norm blocks, as BERT's, normalize the "
                         f"residual sum), so removing them would change the outputs; prune their "
                         f"heads and neurons instead (granularity 'width')")  # fmt: skip


def prune_structured(model: nn.Module, crit, sparsity: float, data, *, scope: str,
                     granularity: str, score_elements: Callable, structure: Structure | None = None) -> tuple[dict[str, Tensor], dict[int, Tensor]]:  # fmt: skip
    """Choose and remove units (module docstring); returns ``(masks, removed)`` with ``masks``
    over the units' weights and biases (not attached) and ``removed = {group: unit ids}``.
    ``score_elements(params) -> Scores`` scores weights with an element criterion."""
    check_structured(sparsity, scope, granularity)
    example = _first_batch(data)
    structure = structure or find_structure(model, example)
    params = dict(model.named_parameters())
    if granularity == "depth":
        if callable(getattr(crit, "block_scores", None)):
            bs = crit.block_scores(model, structure, data)
        else:
            bs = _element_block_scores(model, crit, structure, data, score_elements)
        removed = depth_removal(structure, torch.as_tensor(bs), sparsity)
        gone = {structure.groups[gi].block for gi, r in removed.items() if len(r)}
        masks = unit_masks(structure, params, removed) | _block_masks(
            structure, params, removed, gone
        )
        check_identity(model, structure, masks, example)
        return masks, removed
    groups = [gi for gi, g in enumerate(structure.groups) if g.kind in _KINDS[granularity]]
    own = callable(getattr(crit, "unit_scores", None))
    scores = _unit_scores(model, crit, structure, data, score_elements, groups)
    reduce = getattr(crit, "channel_reduce", "l2")
    per_param = getattr(crit, "per_parameter", True)
    costs = _costs(structure, scores, per_param, squared=not own and reduce == "l2")
    removed = allocate_units(structure, costs, sparsity, scope)
    if callable(getattr(crit, "solve_units", None)):
        removed = crit.solve_units(
            model, structure, data, {gi: len(r) for gi, r in removed.items()}
        )
    elif callable(getattr(crit, "compensate", None)):
        crit.compensate(model, structure, data, removed)
        params = dict(model.named_parameters())
    return unit_masks(structure, params, removed), removed


def _unit_scores(model, crit, structure, data, score_elements, groups):
    groups = range(len(structure.groups)) if groups is None else groups
    if callable(getattr(crit, "unit_scores", None)):
        got = crit.unit_scores(model, structure, data)
        return {gi: got[gi] for gi in groups}
    params = dict(model.named_parameters())
    weights = {p: params[p] for gi in groups for p in structure.groups[gi].slices
               if p.endswith("weight")}  # fmt: skip
    scores = score_elements(weights)
    return element_unit_scores(structure, scores, getattr(crit, "channel_reduce", "l2"), groups)


def _element_block_scores(model, crit, structure, data, score_elements) -> Tensor:
    """A block's score from its units' scores, combined as the reduction says (L2: root of the
    sum of squares; otherwise, and for a criterion's own unit scores, the sum)."""
    u = _unit_scores(model, crit, structure, data, score_elements, None)
    own = callable(getattr(crit, "unit_scores", None))  # its own unit scores: summed
    l2 = not own and getattr(crit, "channel_reduce", "l2") == "l2"
    out = torch.zeros(len(structure.blocks), dtype=torch.float64)
    for gi, g in enumerate(structure.groups):
        out[g.block] += u[gi].square().sum() if l2 else u[gi].sum()
    return out.sqrt() if l2 else out
