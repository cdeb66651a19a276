"""Layer-wise pruning with sequential propagation: capture -> solve -> apply, layer after layer.

The papers' procedure (OBC, SparseGPT, Wanda): layer k is calibrated on the inputs it receives
once the layers before it are pruned, so it also absorbs their error. The layers are taken in
the order of a probe forward on the first calibration batch; consecutive layers reading the
very same input tensor (an attention block's q, k and v projections) form one group and are
solved on the same capture. ``H = 2 X^T X / n`` of the group's layers is accumulated by hooks
(never ``X`` itself), the solver returns ``(W', mask)`` of each layer, and ``W'`` is written into
the model before the next group is captured. Memory: one ``[d, d]`` per layer of the group.

Two ways to feed a group its inputs. A model of repeated blocks (a transformer) is propagated
block by block (``saliency.blocks``: block 0's inputs caught once, each block run on the cached
inputs of the one before; ~``groups + 1`` forwards of each block, optional offload and resume).
Elsewhere (no block structure, targets outside the blocks, ``blocks=False``) the calibration
batches run through the model up to the group's last call (the prefix path: one partial forward
of the calibration set per group, ~2B^2 block forwards for B blocks). Both give the same bits.

A solver criterion defines ``solve_layer(W, H, pattern, alive) -> (W', keep)`` on matrices
(``saliency.solvers``), ``diag_only`` (Wanda needs only ``diag H``) and ``n_samples``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from saliency import blocks as _blocks
from saliency import capture, distributed
from saliency.allocate import check_allocation, check_sparsity
from saliency.masks import Masks
from saliency.model_io import iter_batches, model_device

log = logging.getLogger(__name__)

# allocate keywords a layer-wise solver accepts at their defaults only (anything else is refused)
_DEFAULTS = {"reduce": None, "block": None, "pooling": "avg", "max_layer_sparsity": None,
             "min_layer_channels": 1, "channel_layout": None}  # fmt: skip


def is_solver(crit: Any) -> bool:
    """True for criteria that choose masks and update weights together, layer by layer."""
    return callable(getattr(crit, "solve_layer", None))


def check_settings(crit, sparsity, scope: str, granularity: str, alloc: Mapping[str, Any]):
    """(sparsity, (N, M) or None) after refusing what a layer-wise solver cannot do."""
    name = getattr(crit, "name", type(crit).__name__)
    if scope != "layer":
        raise ValueError(
            f"{name!r} solves each layer on its own inputs: pass scope='layer' (per-layer "
            f"sparsities through layer_sparsity={{name: sparsity}}); got scope={scope!r}"
        )
    nm, _ = check_allocation(sparsity, scope, granularity)
    if nm is None and granularity != "element":
        raise ValueError(
            f"{name!r} prunes at granularity 'element' or 'N:M' (like '2:4'); got {granularity!r}"
        )
    bad = sorted(k for k, v in alloc.items() if k in _DEFAULTS and v != _DEFAULTS[k])
    bad += sorted(k for k in alloc if k not in _DEFAULTS and k != "layer_sparsity")
    if bad:
        raise ValueError(f"{name!r} does not take the allocation setting(s) {bad}")
    return sparsity, nm


def _groups(model, modules, batch) -> tuple[list[list[str]], dict[str, int]]:
    calls = capture.call_order(model, modules, batch)
    missing = sorted(set(modules) - {n for n, _ in calls})
    if missing:
        raise ValueError(
            f"layers {missing[:5]} never ran on the calibration data, so they cannot be calibrated: "
            f"{capture.WAY_OUT}"
        )
    counts = {n: sum(1 for k, _ in calls if k == n) for n in modules}
    groups: list[list[str]] = []
    last: Tensor | None = None
    for n, x_in in calls:
        if any(n in g for g in groups):
            continue
        if groups and x_in is last:
            groups[-1].append(n)
        else:
            groups.append([n])
        last = x_in
    return groups, counts


def prune_layerwise(
    model: nn.Module,
    crit: Any,
    params: Mapping[str, nn.Parameter],
    data: Iterable,
    sparsity: float | None,
    *,
    granularity: str = "element",
    current: Masks | None = None,
    layer_sparsity: Mapping[str, float] | None = None,
    blocks: Sequence[str] | bool | None = None,
    offload: bool = False,
    device: str | torch.device | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    forwards: dict[str, int] | None = None,
    solve_group=None,
) -> Masks:
    """Prune ``params`` in place with ``crit.solve_layer``, sequentially (module docstring).

    Every layer gets ``sparsity`` (exact count per layer) or its ``layer_sparsity`` override, or
    the N:M pattern of ``granularity``; ``current`` zeros stay zero and count toward the target.
    Models made of repeated blocks (or ``blocks=[module names]``) are propagated block by block
    (``saliency.blocks``; ``blocks=False``: the prefix path): ``offload=True`` / ``device=`` keep only the current block on the
    compute device, ``checkpoint_dir`` makes the run resumable. ``forwards`` (a dict, filled in)
    counts model calls (``"prefix"``) and block calls (``"block"``), one per batch.
    ``solve_group(group, modules, stats, keep) -> {target: (weight, mask)}`` replaces the
    per-layer ``crit.solve_layer`` (the structured solvers, ``saliency.structured``).
    Returns the masks (not attached: ``saliency.prune`` attaches them)."""
    nm, _ = check_allocation(sparsity, "layer", granularity)
    overrides = dict(layer_sparsity or {})
    unknown = sorted(set(overrides) - set(params))
    if unknown:
        raise ValueError(f"layer_sparsity names unknown tensors {unknown}; known: {list(params)}")
    if nm is not None and overrides:
        raise ValueError("layer_sparsity cannot be combined with an N:M granularity")
    pattern = {n: (check_sparsity(overrides.get(n, sparsity)) if nm is None else None, nm)
               for n in params}  # fmt: skip
    modules = capture.layer_modules(model, params)
    home = model_device(model)
    compute = _compute_device(device, offload, home)
    batches = list(iter_batches(data, crit.n_samples, device=home))
    counts = forwards if forwards is not None else {}
    counts.update(prefix=0, block=0)
    modes = {m: m.training for m in model.modules()}
    model.eval()  # calibration sees the network as it is used: no dropout, running statistics
    try:
        found = _blocks.candidates(model, modules, blocks)
        with _blocks.watching(found, modules) as events:
            groups, calls = _groups(model, modules, batches[0][:1])  # one sample: the order
        counts["prefix"] += 1
        plan, why = _blocks.plan(found, events, groups, modules)
        asked = (
            blocks not in (None, False)
            or offload
            or device is not None
            or checkpoint_dir is not None
        )
        if plan is None and asked:
            raise ValueError(f"blocks=, offload=, device= and checkpoint_dir= need block-by-block "
                             f"propagation, which is not possible here: {why}")  # fmt: skip
        log.debug("layer-wise propagation: %s", why or f"{len(plan.blocks)} blocks")
        keep: dict[str, Tensor] = {}

        def do_group(group, module, inputs):
            part = {n: modules[n] for n in group}
            with capture.capturing(part, diag_only=crit.diag_only, calls=calls) as (stats, run):
                for b in inputs:
                    run(module, b)
            combine(stats)
            if solve_group is not None:
                return solve_group(group, modules, stats, keep)
            return _solve_group(crit, group, modules, stats, pattern, current, keep)

        def restore(written):
            with torch.no_grad():
                for n, (w, k) in written.items():
                    modules[n].weight.copy_(w)
                    keep[n] = k.to(modules[n].weight.device)

        rest = groups
        if plan is not None:
            if checkpoint_dir is not None and distributed.world() is not None:
                raise ValueError("checkpoint_dir= is not supported under torch.distributed")
            store = None if checkpoint_dir is None else _blocks.Store(
                checkpoint_dir, _run_key(crit, pattern, plan, batches))  # fmt: skip
            _blocks.propagate(model, plan, batches, do_group, restore, home=home, compute=compute,
                              offload=offload or compute != home, store=store, counts=counts)  # fmt: skip
            rest = plan.post
        for group in rest:  # the prefix path: every batch through the model up to the group
            do_group(group, model, batches)
            counts["prefix"] += len(batches)
    finally:
        for m, mode in modes.items():
            m.train(mode)
    return Masks({n: keep[n].to(params[n].device) for n in params})


def _compute_device(device, offload: bool, home: torch.device) -> torch.device:
    if device is not None:
        try:
            return torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device must name a torch device ('cuda', 'cuda:1', 'cpu'); "
                             f"got {device!r}") from e  # fmt: skip
    if offload and torch.cuda.is_available():
        return torch.device("cuda")
    return home


def _run_key(crit, pattern, plan, batches) -> dict[str, Any]:
    """What a checkpoint directory must match to be resumed."""
    return {"criterion": repr(crit), "pattern": {n: list(p) for n, p in pattern.items()},
            "blocks": plan.names, "samples": [len(b) for b in batches]}  # fmt: skip


def _solve_group(crit, group, modules, stats, pattern, current, keep) -> dict[str, tuple]:
    """Solve and write the layers of one group; ``{target: (weight, mask)}`` as written.
    Distributed: the owner of each layer solves it, then broadcasts."""
    world, order = distributed.world(), list(modules)
    solved, error = {}, None
    for n in group:
        if world is not None and order.index(n) % world[1] != world[0]:
            continue
        W = capture.weight_matrix(modules[n])  # solved where H lives (the CPU), written back
        alive = current[n].cpu().bool() if current is not None else None
        alive = None if alive is None else capture.as_matrix(modules[n], alive)
        try:
            W2, k = crit.solve_layer(W.cpu(), stats[n].H, pattern[n], alive)
            solved[n] = (W2.to(W), k.bool().to(W.device))
        except ValueError as e:
            error = error or ValueError(f"layer {n!r}: {e}")
    distributed.raise_together(error)
    written = {}
    for n in group:
        module = modules[n]
        if world is not None:
            W = capture.weight_matrix(module)
            empty = (torch.empty_like(W), torch.empty(W.shape, dtype=torch.bool, device=W.device))
            W2, k = solved.get(n, empty)
            src = order.index(n) % world[1]
            solved[n] = (distributed.broadcast(W2, src), distributed.broadcast(k, src))
        W2, k = solved[n]
        with torch.no_grad():
            module.weight.copy_(capture.from_matrix(module, W2))
        keep[n] = capture.from_matrix(module, k.to(module.weight.device)).contiguous()
        written[n] = (module.weight.detach(), keep[n])
        log.debug("%s: %s, %d rows, sparsity %.3f", crit.name, n, stats[n].n,
                  1 - float(k.float().mean()))  # fmt: skip
    return written


def dense_stats(model, params, data, *, n_samples, diag_only) -> dict[str, capture.Stats]:
    """Input statistics of every layer on the unpruned model in one pass (no propagation): what
    a solver criterion's ``score`` reads."""
    modules = capture.layer_modules(model, params)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        never = dict.fromkeys(modules, 1 << 62)  # never cut the forward short
        with capture.capturing(modules, diag_only=diag_only, calls=never) as (stats, run):
            for batch in iter_batches(data, n_samples, device=model_device(model)):
                run(model, batch)
        combine(stats)
    finally:
        for m, mode in modes.items():
            m.train(mode)
    return stats


def combine(stats: dict[str, capture.Stats]) -> None:
    """Distributed: ``sum x x^T`` and row counts of each layer summed over every rank's
    calibration batches, in place (each rank propagated its own batches)."""
    if distributed.world() is None:
        return
    names = list(stats)
    sums = distributed.all_reduce_many([stats[n].sum for n in names])
    totals = distributed.all_reduce_many([stats[n].total for n in names])
    counts = distributed.sum_counts(*[stats[n].n for n in names])
    for n, s, t, c in zip(names, sums, totals, counts, strict=True):
        stats[n].sum, stats[n].total, stats[n].n = s, t, c


def check_hparams(crit) -> None:
    """Refuse bad ``n_samples`` / ``damp`` / ``block_size`` when the criterion is built."""
    n = crit.n_samples
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n_samples must be a positive int or None (all the data); got {n!r}")
    damp = getattr(crit, "damp", 0.0)
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp >= 0:
        raise ValueError(f"damp must be a number >= 0 (relative to mean diag H); got {damp!r}")
    b = getattr(crit, "block_size", 1)
    if isinstance(b, bool) or not isinstance(b, int) or b < 1:
        raise ValueError(f"block_size must be a positive int; got {b!r}")


def obs_scores(crit, model, params, data) -> dict[str, Tensor]:
    """Layer-wise OBS saliency ``w_q^2 / (2 [H^-1]_qq)`` of every weight on the dense model, with
    the criterion's damped ``H`` of its own layer: the cost of the first greedy step of OBC, and
    what OBC and SparseGPT rank by before any update."""
    from saliency import solvers

    stats = dense_stats(model, params, data, n_samples=crit.n_samples, diag_only=False)
    modules = capture.layer_modules(model, params)
    out = {}
    for n, st in stats.items():
        try:
            s = solvers.obs_costs(capture.weight_matrix(modules[n]).cpu(), st.H, crit.damp)
        except ValueError as e:
            raise ValueError(f"layer {n!r}: {e}") from e
        out[n] = capture.from_matrix(modules[n], s.float()).to(params[n].device).contiguous()
    return out
