"""Scores -> masks: who gets pruned, globally or per layer, by element, channel, block or N:M.

Every granularity but N:M is handled the same way: each layer's elements are partitioned into
groups (an element, an output channel, an (h, w) block), each group gets one score reduced from
its elements' scores, and the lowest-scoring groups are pruned. Counts are exact: with groups of
equal size, round(sparsity * G) of the G groups (round(sparsity * N) elements for element
granularity, as `torch.nn.utils.prune`); with unequal groups (global channel scope, edge blocks),
the number of zeros closest to round(sparsity * N). Ties among equal scores are spread uniformly
at random over the tied entries, from a generator seeded by `tie_seed` (deterministic for a
given seed), never taken in layer order: a layer whose scores are all equal (all zero upstream
of a zero-initialised tensor, common at initialisation) would otherwise be the first to go, whole. Per-layer limits (`max_layer_sparsity`, and at
channel granularity the layer-collapse guard `min_layer_channels`) move the zeros a layer may not
take to the next-lowest groups of other layers, keeping the total where it can be reached.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from saliency.masks import Masks

log = logging.getLogger(__name__)

Scope = Literal["global", "layer"]
Reduce = Literal["l2", "sum", "mean", "max"]
SCOPES = ("global", "layer")
REDUCES = ("l2", "sum", "mean", "max")
POOLINGS = ("avg", "max")
_NM = re.compile(r"^(\d+):(\d+)$")


def check_sparsity(sparsity: float, what: str = "sparsity") -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"{what} must be a number in [0, 1); got {sparsity!r}")
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"{what} must be in [0, 1) (fraction of zeros); got {sparsity!r}")
    return float(sparsity)


def _check_scores(scores: Mapping[str, Tensor], current: Masks | None) -> None:
    if not isinstance(scores, Mapping) or not scores:
        raise TypeError("scores must be a non-empty mapping {parameter name: score tensor}")
    for n, s in scores.items():
        if not isinstance(s, Tensor):
            raise TypeError(f"score {n!r} must be a torch.Tensor; got {type(s).__name__}")
        # one fast read: NaN propagates through min / max, inf shows there
        if s.numel() and s.is_floating_point() and not all(map(math.isfinite, torch.aminmax(s))):
            bad = int((~torch.isfinite(s)).sum())
            raise ValueError(f"score {n!r} has {bad} NaN or inf entries; scores must be finite")
    if current is not None:
        if set(current) != set(scores):
            raise ValueError(
                f"current masks and scores name different tensors: only in masks "
                f"{sorted(set(current) - set(scores))[:5]}, only in scores {sorted(set(scores) - set(current))[:5]}"
            )
        for n, s in scores.items():
            if tuple(current[n].shape) != tuple(s.shape):
                raise ValueError(
                    f"current mask {n!r} has shape {tuple(current[n].shape)}, score has {tuple(s.shape)}"
                )


def _as_2d(shape: torch.Size) -> tuple[int, int]:
    """Weights viewed as [out, in * k * k] (tfmot's convention for blocks); 1-D as [n, 1]."""
    if len(shape) == 0:
        return 1, 1
    return shape[0], math.prod(shape[1:]) if len(shape) > 1 else 1


def group_index(
    shape: torch.Size,
    granularity: str,
    block: tuple[int, int] | None,
    device,
    layout: tuple[int, int] = (0, 1),
) -> Tensor:
    """Group id of every element, shaped like the parameter.

    For "channel", `layout = (dim, groups)` says where output channels run: dim 0 (Linear, Conv:
    [out, in/groups, *k]) or dim 1 in `groups` blocks of dim 0's rows (ConvTranspose:
    [in, out/groups, *k], output channel g * (out/groups) + j for row block g, column j).
    """
    numel = math.prod(shape)
    if granularity == "element":
        return torch.arange(numel, device=device).view(shape)
    if granularity == "channel":
        dim, groups = layout
        if dim == 0 or len(shape) < 2:
            out = shape[0] if len(shape) else 1
            return torch.arange(out, device=device).view(-1, *[1] * (len(shape) - 1)).expand(shape)
        rows, cols = shape[0], shape[1]
        group_of_row = torch.arange(rows, device=device) // (rows // groups)
        ids = group_of_row[:, None] * cols + torch.arange(cols, device=device)[None, :]
        return ids.view(rows, cols, *[1] * (len(shape) - 2)).expand(shape)
    if granularity == "block":
        h, w = block
        rows, cols = _as_2d(shape)
        r = torch.arange(rows, device=device) // h
        c = torch.arange(cols, device=device) // w
        blocks_per_row = -(-cols // w)  # edge blocks are smaller: the weight is padded, not refused
        return (r[:, None] * blocks_per_row + c[None, :]).reshape(shape)
    raise AssertionError(granularity)


def _reduce(s: Tensor, idx: Tensor, n_groups: int, how: str) -> Tensor:
    s, idx = s.reshape(-1).double(), idx.reshape(-1)
    if how == "max":
        return torch.full((n_groups,), -math.inf, dtype=s.dtype, device=s.device).scatter_reduce(
            0, idx, s, "amax"
        )
    if how == "l2":
        return (
            torch.zeros(n_groups, dtype=s.dtype, device=s.device).index_add_(0, idx, s * s).sqrt()
        )
    total = torch.zeros(n_groups, dtype=s.dtype, device=s.device).index_add_(0, idx, s)
    if how == "sum":
        return total
    count = torch.zeros(n_groups, dtype=s.dtype, device=s.device).index_add_(
        0, idx, torch.ones_like(s)
    )
    return total / count


def tie_order(key: Tensor, seed: int) -> Tensor:
    """Indices sorting `key` ascending, equal keys in a random order drawn from `seed`: ties are
    spread over the tied entries instead of falling on the first layers in model order."""
    perm = torch.randperm(len(key), generator=torch.Generator().manual_seed(seed))
    return perm[torch.sort(key[perm], stable=True).indices]


def lowest(keys: list[Tensor], k: int, seed: int) -> list[Tensor]:
    """Bool flags of the `k` lowest entries over all of `keys` (each flat, one dtype), ties at
    the threshold drawn uniformly from `seed`.

    A selection, not a sort: the k-th value is bracketed from a random sample of the entries,
    then found exactly among the few entries in the bracket, so the tensors are read a few
    times and never concatenated (global allocation over 25M weights in well under a second;
    a full sort took tens of seconds on two cores).
    """
    n = sum(len(x) for x in keys)
    if k <= 0 or k >= n:
        return [torch.full(x.shape, k > 0, dtype=torch.bool, device=x.device) for x in keys]
    gen = torch.Generator().manual_seed(seed)
    lo, hi = _bracket(keys, k, n, gen)
    band = [(x >= lo) & (x <= hi) for x in keys]
    below = sum(int(torch.count_nonzero(x < lo)) for x in keys)
    inside = sum(int(torch.count_nonzero(b)) for b in band)
    if not below < k <= below + inside:  # the sample missed (rare): bracket everything
        below, band = 0, [torch.ones_like(b) for b in band]
    cand = torch.cat([x[b].cpu() for x, b in zip(keys, band, strict=True)])
    t = float(torch.kthvalue(cand, k - below).values)
    pruned = [x < t for x in keys]
    tied = [(x == t).nonzero().squeeze(1) for x in keys]
    need = k - below - int(torch.count_nonzero(cand < t))  # entries below t: none above hi
    pick = torch.zeros(sum(len(i) for i in tied), dtype=torch.bool)
    pick[torch.randperm(len(pick), generator=gen)[:need]] = True
    for p, i, chosen in zip(pruned, tied, pick.split([len(i) for i in tied]), strict=True):
        p[i[chosen.to(i.device)]] = True
    return pruned


def _bracket(keys: list[Tensor], k: int, n: int, gen: torch.Generator) -> tuple[float, float]:
    """Values ``lo <= hi`` that hold the k-th lowest entry with overwhelming probability, from
    the order statistics of a random sample (+- 6 standard deviations of its rank)."""
    m = min(n, 1 << 16)
    sample = torch.cat([
        x[torch.randint(len(x), (max(1, round(m * len(x) / n)),), generator=gen).to(x.device)]
        .double().cpu()
        for x in keys if len(x)
    ]).sort().values  # fmt: skip
    q, size = k / n, len(sample)
    band = 6 * math.sqrt(size * q * (1 - q)) + 2
    a, b = int(q * size - band), int(q * size + band)
    lo = float(sample[a]) if a >= 0 else -math.inf
    hi = float(sample[b]) if b < size else math.inf
    return lo, hi


def _select(
    group_scores: Tensor,
    sizes: Tensor,
    pruned_before: Tensor,
    cap: Tensor,
    target: int,
    seed: int = 0,
) -> tuple[Tensor, int]:
    """Pruned flag per group: the lowest-scoring prefix whose zero count is closest to `target`,
    and the most zeros the per-layer limits let any prefix reach.

    Groups already entirely pruned go first; `cap` marks the groups per-layer limits let go;
    equal scores are ordered at random from `seed` (`tie_order`).
    """
    fully = pruned_before == sizes
    key = torch.where(fully, torch.full_like(group_scores, -math.inf), group_scores)
    if bool((sizes == 1).all()) and bool(cap.all()):  # elements, no limits: a selection
        return lowest([key], max(target, int(fully.sum())), seed)[0], len(key)
    order = tie_order(key, seed)
    order = order[cap[order] | fully[order]]
    gain = (sizes - pruned_before)[order]
    zeros = int(pruned_before.sum()) + torch.cat([gain.new_zeros(1), gain.cumsum(0)])
    # the prefix of length j leaves zeros[j] zeros; take the closest to target (ties: fewer)
    j = int(torch.argmin((zeros - target).abs()))
    j = max(j, int(fully[order].sum()))  # monotone: already-pruned groups stay pruned
    pruned = torch.zeros_like(fully)
    pruned[order[:j]] = True
    return pruned, int(zeros[-1])


def _nm_masks(scores, n: int, m: int, current: Masks | None) -> dict[str, Tensor]:
    """Keep the n highest scores of every m consecutive weights along the input dimension."""
    out = {}
    for name, s in scores.items():
        if s.dim() < 2 or s.shape[1] % m:
            raise ValueError(
                f"N:M pattern {n}:{m} needs the input dimension (dim 1) of {name!r} to be a multiple "
                f"of {m}; its shape is {tuple(s.shape)} (N:M refuses rather than pads)"
            )
        moved = s.movedim(1, -1)  # [out, *k, in]: groups run along input channels / features
        key = moved.reshape(-1, m).double()
        if current is not None:
            key = torch.where(current[name].movedim(1, -1).reshape(-1, m), key, -math.inf)
        order = torch.sort(key, dim=1, descending=True, stable=True).indices
        keep = torch.zeros_like(key, dtype=torch.bool).scatter_(1, order[:, :n], True)
        keep &= torch.isfinite(key)
        out[name] = keep.reshape(moved.shape).movedim(-1, 1).contiguous()
    return out


def check_allocation(
    sparsity: float | None,
    scope: str = "global",
    granularity: str = "element",
    reduce: str | None = None,
    block: tuple[int, int] | None = None,
    pooling: str = "avg",
) -> tuple[tuple[int, int] | None, str]:
    """Validate allocation settings before any work (scoring can be expensive).

    Returns ``((N, M) or None, group reduction)``; raises ValueError naming the bad value.
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; accepted: {', '.join(SCOPES)}")
    nm = _NM.match(granularity) if isinstance(granularity, str) else None
    if nm:
        n, m = int(nm.group(1)), int(nm.group(2))
        if not 0 < n <= m:
            raise ValueError(f"N:M pattern needs 0 < N <= M; got {granularity!r}")
        if sparsity is not None and abs(sparsity - (1 - n / m)) > 1e-9:
            raise ValueError(
                f"granularity {granularity!r} implies sparsity {1 - n / m:g}; got sparsity={sparsity!r} "
                "(pass None or the implied value)"
            )
        return (n, m), "none"
    if granularity not in ("element", "channel", "block"):
        raise ValueError(
            f"unknown granularity {granularity!r}; accepted: 'element', 'channel', 'block', or 'N:M' like '2:4'"
        )
    if sparsity is None:
        raise ValueError(f"granularity {granularity!r} needs a sparsity in [0, 1)")
    check_sparsity(sparsity)
    if granularity == "block":
        if block is None or len(block) != 2 or any(not isinstance(b, int) or b < 1 for b in block):
            raise ValueError(
                f"granularity 'block' needs block=(h, w) with positive ints; got {block!r}"
            )
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; accepted: {', '.join(POOLINGS)}")
        return None, "mean" if pooling == "avg" else "max"
    how = reduce or "l2"
    if how not in REDUCES:
        raise ValueError(f"unknown reduce {reduce!r}; accepted: {', '.join(REDUCES)}")
    return None, how


def _check_block_fits(scores: Mapping[str, Tensor], block: tuple[int, int]) -> None:
    """Edge blocks are padded (smaller), but a block larger than a whole tensor is refused:
    the tensor would be one group, pruned all or nothing."""
    for name, s in scores.items():
        rows, cols = _as_2d(s.shape)
        if block[0] > rows or block[1] > cols:
            raise ValueError(
                f"block {tuple(block)} is larger than {name!r} viewed as [out, in*k*k] = "
                f"[{rows}, {cols}]; blocks must fit in every target (edge blocks are padded, "
                "whole-tensor blocks are refused): use a smaller block or exclude that tensor"
            )


class _Layer(NamedTuple):
    """One tensor's groups: element -> group index (None for elements), group scores, group
    sizes, zeros already in force per group, which groups the per-layer limits let go (`cap`:
    max_layer_sparsity; `guard`: min_layer_channels), and the score tensor itself."""

    idx: Tensor | None
    scores: Tensor
    sizes: Tensor
    before: Tensor
    cap: Tensor
    guard: Tensor
    s: Tensor


def _lowest_first(g_scores: Tensor, alive: Tensor) -> Tensor:
    """Group indices in pruning order: dead groups first, then by score, ties by position."""
    key = torch.where(alive, g_scores, torch.full_like(g_scores, -math.inf))
    return torch.sort(key, stable=True).indices


def _layer(
    name: str,
    s: Tensor,
    *,
    granularity: str,
    how: str,
    block,
    layout: tuple[int, int],
    current: Masks | None,
    max_layer_sparsity: float | None,
    min_layer_channels: int,
) -> _Layer:
    if granularity == "element":
        idx, g_scores = None, s.reshape(-1).double()
        sizes = torch.ones(s.numel(), device=s.device)
    else:
        idx = group_index(s.shape, granularity, block, s.device, layout)
        n_groups = int(idx.max()) + 1 if s.numel() else 0
        g_scores = _reduce(s, idx, n_groups, how)
        sizes = torch.zeros(n_groups, device=s.device).index_add_(
            0, idx.reshape(-1), torch.ones(s.numel(), device=s.device)
        )
    before = torch.zeros_like(sizes)
    if current is not None:
        dead = (~current[name].to(s.device)).reshape(-1).float()
        before = dead if idx is None else before.index_add_(0, idx.reshape(-1), dead)
    gain = sizes - before
    order = _lowest_first(g_scores, gain > 0)
    cap = torch.ones_like(sizes, dtype=torch.bool)
    if max_layer_sparsity is not None:
        # the groups this layer may lose: dead ones first, then its lowest scores, while the
        # zeros (old and new) stay within the cap
        budget = max_layer_sparsity * s.numel() - float(before.sum()) + 1e-9
        cap = torch.zeros_like(cap)
        cap[order[gain[order].cumsum(0) <= budget]] = True
    guard = torch.ones_like(cap)
    if granularity == "channel" and min_layer_channels:
        # the highest-scoring live channels, the last to go in pruning order, are protected
        alive = int((gain > 0).sum())
        guard[order[len(order) - min(min_layer_channels, alive) :]] = False
    return _Layer(idx, g_scores, sizes.long(), before.long(), cap, guard, s)


def _check_channel_layout(layout: Mapping[str, tuple[int, int]], scores) -> None:
    for name, value in layout.items():
        if name not in scores:
            raise ValueError(f"channel_layout names unknown tensor {name!r}; known: {list(scores)}")
        shape = tuple(scores[name].shape)
        ok = isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value)
        dim, groups = value if ok else (None, None)
        if not ok or dim not in (0, 1) or groups < 1 or (dim == 1 and len(shape) < 2):
            raise ValueError(
                f"channel_layout[{name!r}] must be (dim, groups) with dim 0, or dim 1 on a tensor "
                f"of 2+ dims, and groups >= 1; got {value!r} for shape {shape}"
            )
        if dim == 1 and shape[0] % groups:
            raise ValueError(
                f"channel_layout[{name!r}] = {value!r}: dim 0 of shape {shape} does not split "
                f"into {groups} groups"
            )


def _tied_sets(groups: Mapping[str, Tensor], scores, layout) -> list[list[str]]:
    """The sets of tensors of `scores` that share unit ids in `groups` (connected components,
    two or more tensors each); refuses ids that do not fit their tensor."""
    named = [n for n in scores if n in groups]
    for n in named:
        ids, shape = groups[n], tuple(scores[n].shape)
        if not isinstance(ids, Tensor) or ids.dim() != 1 or ids.is_floating_point():
            raise ValueError(
                f"groups[{n!r}] must be a 1-D integer tensor of unit ids per output channel"
            )
        if layout.get(n, (0, 1)) != (0, 1) or not shape or len(ids) != shape[0]:
            raise ValueError(
                f"groups[{n!r}] has {len(ids)} unit ids but {n!r} (shape {shape}) has "
                f"{shape[0] if shape else 0} output channels along dim 0; channel groups tie "
                "output channels of Linear and Conv weights ([out, ...])"
            )
    parent = {n: n for n in named}

    def find(n):
        while parent[n] != n:
            n = parent[n]
        return n

    owner: dict[int, str] = {}
    for n in named:
        for uid in groups[n].unique().tolist():
            if uid in owner:
                parent[find(n)] = find(owner[uid])
            owner.setdefault(uid, n)
    sets: dict[str, list[str]] = {}
    for n in named:
        sets.setdefault(find(n), []).append(n)
    return [members for members in sets.values() if len(members) > 1]


def _merge(
    layers: dict[str, _Layer], groups, how: str, min_layer_channels: int
) -> tuple[_Layer, dict[str, Tensor]]:
    """One pseudo-layer whose groups are the units: member channel scores combined (l2 -> L2 of
    the members' L2s, max -> max, sum and mean -> sum: each member's channel score is its part
    of the unit's), sizes and zeros added; a unit may go if every member's cap allows it, and
    the guard protects each member's `min_layer_channels` highest-scoring live units (so it
    acts only when a member would keep fewer, as for a single tensor)."""
    names = list(layers)
    cat = torch.cat([groups[n].cpu().long() for n in names])
    uniq, inverse = torch.unique(cat, return_inverse=True)
    local = dict(zip(names, inverse.split([len(groups[n]) for n in names]), strict=True))
    u = len(uniq)

    def add(values):
        return torch.zeros(u, dtype=values.dtype).index_add_(0, inverse, values)

    def combine(values, op):
        start = torch.full((u,), -math.inf if op == "amax" else 1, dtype=values.dtype)
        return start.scatter_reduce(0, inverse, values, op)

    sc = torch.cat([layers[n].scores.cpu() for n in names])
    if how == "l2":
        g_scores = add(sc * sc).sqrt()
    elif how == "max":
        g_scores = combine(sc, "amax")
    else:
        g_scores = add(sc)
    sizes = add(torch.cat([layers[n].sizes.cpu() for n in names]))
    before = add(torch.cat([layers[n].before.cpu() for n in names]))
    cap = combine(torch.cat([layers[n].cap.cpu().long() for n in names]), "amin").bool()
    guard = torch.ones(u, dtype=torch.bool)
    for n in names if min_layer_channels else []:
        ids = local[n].unique()
        ids = ids[sizes[ids] > before[ids]]  # live units
        order = torch.sort(g_scores[ids], stable=True).indices
        guard[ids[order[len(ids) - min(min_layer_channels, len(ids)) :]]] = False
    return _Layer(None, g_scores, sizes, before, cap, guard, None), local


def allocate(
    scores: Mapping[str, Tensor],
    sparsity: float | None,
    *,
    scope: Scope = "global",
    granularity: str = "element",
    reduce: Reduce | None = None,
    block: tuple[int, int] | None = None,
    pooling: Literal["avg", "max"] = "avg",
    current: Masks | None = None,
    layer_sparsity: Mapping[str, float] | None = None,
    max_layer_sparsity: float | None = None,
    min_layer_channels: int = 1,
    channel_layout: Mapping[str, tuple[int, int]] | None = None,
    groups: Mapping[str, Tensor] | None = None,
    tie_seed: int = 0,
) -> Masks:
    """Masks pruning the lowest-scoring fraction `sparsity` of the target set (higher score = keep).

    scope: "global" ranks all tensors together; "layer" gives every tensor the same sparsity.
    granularity: "element"; "channel" (output neurons / filters, dim 0 unless `channel_layout`
    says otherwise; group score reduced by `reduce`, L2 by default so that magnitude matches
    `ln_structured(n=2, dim=0)`); "block" of `block=(h, w)` on weights viewed as [out, in*k*k],
    pooled by `pooling` ("avg" or "max", as tfmot's `block_pooling_type`; edge blocks are
    padded); or "N:M" like "2:4" (keep N of every M consecutive weights along the input
    dimension; `sparsity` must be None or 1 - N/M).
    current: masks already in force; their zeros stay zero and count toward the target.
    layer_sparsity: {name: sparsity} allocated per layer; the other tensors share `sparsity`.
    max_layer_sparsity: no tensor gets more than this fraction pruned (avoids layer collapse).
    min_layer_channels: at granularity "channel", every tensor keeps at least this many output
    channels (default 1): a layer with none left passes only its bias, and global channel
    pruning otherwise empties whole layers (layer collapse) without a word. The guard acts
    only when needed: if the unguarded allocation leaves every tensor that many channels, it
    is the result; otherwise a warning names the layers, their highest-scoring channels are
    kept, and the zeros they cannot take go to the next-lowest channels of the other tensors
    (global scope), so the total stays the closest reachable to the target; in layer scope,
    or when every tensor is at its limit, fewer zeros than asked are pruned. 0 turns it off.
    channel_layout: {name: (dim, groups)} for tensors whose output channels run along dim 1
    in `groups` blocks of dim 0 (ConvTranspose weights [in, out/groups, *k]: (1, groups)); a
    2-D tensor with (1, 1) is an [in, out] matrix (transformers' Conv1D) and every granularity
    works on its transpose, as for the equivalent nn.Linear (channels are its columns, blocks
    and N:M groups run as on W.T); `saliency.prune` derives it from the module types
    (`targets.channel_layout`).
    groups: at granularity "channel", {name: unit id per output channel} (`saliency.
    channel_groups(model, example_inputs)`): channels with equal ids across tensors (a residual
    addition's inputs, a depthwise convolution and the layer before it) are one unit, pruned
    together or not at all, with the score of its members' channel scores combined (`reduce`
    "l2": the L2 over the members; "sum" and "mean": the sum of the members' channel scores;
    "max": the max). The tied tensors form one layer for `scope="layer"`, for
    `min_layer_channels` and `max_layer_sparsity` (a unit may go only if every member allows
    it); `layer_sparsity` may not name them. Tensors it does not name are not tied.
    tie_seed: seeds the random order of equal scores (module docstring); the same seed gives
    the same masks.
    """
    _check_scores(scores, current)
    nm, how = check_allocation(sparsity, scope, granularity, reduce, block, pooling)
    layout = dict(channel_layout or {})
    _check_channel_layout(layout, scores)
    flip = [n for n, v in layout.items() if v == (1, 1) and scores[n].dim() == 2]
    if flip:  # [in, out] matrices (HF Conv1D): allocate on their [out, in] transpose
        t = lambda d: d and {n: v.T.contiguous() if n in flip else v for n, v in d.items()}
        keep = {n: v for n, v in layout.items() if n not in flip}
        masks = allocate(t(scores), sparsity, scope=scope, granularity=granularity, reduce=reduce,
                         block=block, pooling=pooling, current=t(current),
                         layer_sparsity=layer_sparsity, max_layer_sparsity=max_layer_sparsity,
                         min_layer_channels=min_layer_channels, channel_layout=keep,
                         groups=groups, tie_seed=tie_seed)  # fmt: skip
        return Masks(t(masks))
    if nm:
        return Masks(_nm_masks(scores, *nm, current))
    sparsity = float(sparsity)
    if granularity == "block":
        _check_block_fits(scores, block)
    if max_layer_sparsity is not None:
        max_layer_sparsity = check_sparsity(max_layer_sparsity, "max_layer_sparsity")
    if (
        isinstance(min_layer_channels, bool)
        or not isinstance(min_layer_channels, int)
        or min_layer_channels < 0
    ):
        raise ValueError(
            f"min_layer_channels must be an int >= 0 (0 turns the guard off); got {min_layer_channels!r}"
        )
    if isinstance(tie_seed, bool) or not isinstance(tie_seed, int):
        raise TypeError(
            f"tie_seed must be an int (seeds the order of equal scores); got {tie_seed!r}"
        )
    overrides = dict(layer_sparsity or {})
    unknown = sorted(set(overrides) - set(scores))
    if unknown:
        raise ValueError(f"layer_sparsity names unknown tensors {unknown}; known: {list(scores)}")
    tied_sets: list[list[str]] = []
    if groups is not None:
        if granularity != "channel":
            raise ValueError(
                f"groups tie output channels: they need granularity 'channel', not {granularity!r}"
            )
        tied_sets = _tied_sets(groups, scores, layout)
        tied = {n for members in tied_sets for n in members}
        if tied & set(overrides):
            raise ValueError(
                f"layer_sparsity names tensors tied by groups {sorted(set(tied) & set(overrides))}: "
                "tied tensors are pruned by unit, together"
            )

    if (
        granularity == "element"
        and scope == "global"
        and not overrides
        and max_layer_sparsity is None
    ):
        return _global_elements(scores, sparsity, current, tie_seed)
    layers = {
        name: _layer(
            name,
            s,
            granularity=granularity,
            how=how,
            block=block,
            layout=layout.get(name, (0, 1)),
            current=current,
            max_layer_sparsity=max_layer_sparsity,
            min_layer_channels=min_layer_channels,
        )
        for name, s in scores.items()
    }
    members: dict[str, dict[str, Tensor]] = {}  # pseudo-layer -> {tensor: unit per channel}
    for names in tied_sets:
        key = f"<tied: {names[0]} and {len(names) - 1} more>"
        layers[key], members[key] = _merge(
            {n: layers.pop(n) for n in names}, groups, how, min_layer_channels
        )

    def select(names: list[str], target_sparsity: float) -> dict[str, Tensor]:
        cat = [layers[n] for n in names]
        sizes = torch.cat([t.sizes.cpu() for t in cat])
        if bool((sizes == sizes[0]).all()):  # equal groups: count in groups, as ln_structured
            target = round(target_sparsity * len(sizes)) * int(sizes[0])
        else:
            target = round(target_sparsity * int(sizes.sum()))
        g_scores = torch.cat([t.scores.cpu() for t in cat])
        before = torch.cat([t.before.cpu() for t in cat])
        cap = torch.cat([t.cap.cpu() for t in cat])
        pruned, reachable = _select(g_scores, sizes, before, cap, target, tie_seed)
        bounds = torch.tensor([0] + [len(t.scores) for t in cat]).cumsum(0).tolist()
        guard = torch.cat([t.guard.cpu() for t in cat])
        # the unguarded choice prunes a layer's protected (highest-scoring live) channels exactly
        # when it leaves that layer fewer live channels than the guard keeps
        short = [
            n
            for n, a, b in zip(names, bounds, bounds[1:], strict=False)
            if (pruned[a:b] & ~guard[a:b]).any()
        ]
        if short:
            pruned, reachable = _select(g_scores, sizes, before, cap & guard, target, tie_seed)
            zeros = int(before.sum() + ((sizes - before) * pruned).sum())
            log.warning(
                "channel allocation at sparsity %.4g would leave %s with fewer than %d output "
                "channel(s) (a layer with none passes only its bias: layer collapse); kept their "
                "highest-scoring channels and pruned %d of the %d zeros asked for%s. "
                "Pass min_layer_channels=0 to allow it.",
                target_sparsity,
                ", ".join(map(repr, short)),
                min_layer_channels,
                zeros,
                target,
                ", taking other layers' next-lowest channels instead" if len(names) > 1 else "",
            )
        elif reachable < target:
            log.warning(
                "max_layer_sparsity allows only %d of the %d zeros asked for; pruning those",
                reachable,
                target,
            )
        out = {}
        for n, t, a, b in zip(names, cat, bounds, bounds[1:], strict=False):
            if n in members:  # tied tensors keep the channels of the units kept
                for m, local in members[n].items():
                    s_m = scores[m]
                    keep = ~pruned[a:b][local].to(s_m.device)
                    keep = keep.view(-1, *[1] * (s_m.dim() - 1)).expand(s_m.shape).clone()
                    out[m] = keep & current[m].to(s_m.device) if current is not None else keep
                continue
            p = pruned[a:b].to(t.s.device)
            keep = ~(p.view(t.s.shape) if t.idx is None else p[t.idx])
            if current is not None:
                keep &= current[n].to(t.s.device)
            out[n] = keep
        return out

    result: dict[str, Tensor] = {}
    for name, s_layer in overrides.items():
        result.update(select([name], check_sparsity(s_layer, f"layer_sparsity[{name!r}]")))
    rest = [n for n in layers if n not in overrides]
    if rest:
        if scope == "global":
            result.update(select(rest, sparsity))
        else:
            for n in rest:
                result.update(select([n], sparsity))
    return Masks({n: result[n] for n in scores})


def _global_elements(
    scores: Mapping[str, Tensor], sparsity: float, current: Masks | None, seed: int
) -> Masks:
    """Global element allocation without per-layer limits: one selection (`lowest`) over every
    weight, the dead ones (`current`) first; the same counts and order as `_select`."""
    fast = (torch.float32, torch.float64)
    dtype = next(iter(scores.values())).dtype
    same = dtype in fast and all(s.dtype == dtype for s in scores.values())
    keys = []
    for n, s in scores.items():
        x = s.reshape(-1) if same else s.reshape(-1).double()  # one dtype: exact comparisons
        if current is not None:
            x = x.masked_fill(~current[n].reshape(-1).to(x.device), -math.inf)
        keys.append(x)
    dead = 0 if current is None else sum(int((~current[n]).sum()) for n in scores)
    k = max(round(sparsity * sum(len(x) for x in keys)), dead)
    pruned = lowest(keys, k, seed)
    return Masks({n: ~p.view(s.shape) for (n, s), p in zip(scores.items(), pruned, strict=True)})


def nm_keep(score: Tensor, n: int, m: int, alive: Tensor | None = None) -> Tensor:
    """Keep mask of the N:M pattern on one score tensor: the n highest of every m consecutive
    entries along dim 1 (entries not `alive` are never kept); the rule `allocate` uses for "N:M"."""
    current = None if alive is None else Masks({"w": alive})
    return _nm_masks({"w": score}, n, m, current)["w"]
