"""Orchestration: score -> allocate -> (update) -> apply, in one call or during training."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from saliency import distributed as _distributed
from saliency import layer_sparsity
from saliency.allocate import allocate, check_allocation
from saliency.apply import attach, attached_masks, clear_optimizer_state
from saliency.collapse import check_collapse, input_disconnected, warn_zero_scores
from saliency.criteria import (
    Cost,
    Criterion,
    Scores,
    default_loss,
    for_granularity,
    get_criterion,
)
from saliency.criteria.base import LossFn, model_device
from saliency.layerwise import check_settings, is_solver, prune_layerwise
from saliency.masks import Masks
from saliency.schedules import Schedule
from saliency.structured import is_structured, prune_structured
from saliency.targets import channel_layout, prunable_parameters

ALLOCATE_KWARGS = (
    "reduce",
    "block",
    "pooling",
    "layer_sparsity",
    "max_layer_sparsity",
    "min_layer_channels",
    "groups",
    "allocation",
    "tie_seed",
)


def _check_scores(
    scores: Mapping[str, Tensor], params: Mapping[str, Tensor], crit: Criterion
) -> None:
    name = getattr(crit, "name", type(crit).__name__)
    if set(scores) != set(params):
        raise ValueError(
            f"criterion {name!r} returned scores for {sorted(scores)[:5]} but the targets are "
            f"{sorted(params)[:5]}: scores must have exactly one entry per prunable parameter"
        )
    for n, s in scores.items():
        if not isinstance(s, Tensor) or tuple(s.shape) != tuple(params[n].shape):
            shape = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
            raise ValueError(
                f"criterion {name!r}: score {n!r} has shape {shape}, parameter has {tuple(params[n].shape)}"
            )


def check_replicated(model: nn.Module) -> None:
    """Under torch.distributed: refuse a DDP wrapper and a model whose weights, buffers or
    attached masks differ between ranks (``saliency.distributed``); nothing otherwise."""
    if _distributed.world() is None:
        return
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError(
            "pass the wrapped module (ddp_model.module), not the DistributedDataParallel wrapper: "
            "its forward synchronizes gradients, and parameter names would carry 'module.'"
        )
    masks = {f"mask of {n}": m for n, m in (attached_masks(model) or {}).items()}
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers()), **masks}
    _distributed.check_replicated(tensors)


def score(
    model: nn.Module,
    criterion: str | Criterion,
    data: Iterable | None = None,
    loss_fn: LossFn | None = None,
    *,
    params: Mapping[str, nn.Parameter] | None = None,
    distributed: bool | None = None,
    **hparams: Any,
) -> Scores:
    """Scores (higher = keep) of every prunable parameter under `criterion`, with their cost.

    `criterion` is a registered name (hyperparameters as keyword arguments) or an instance.
    `data` is any iterable of (inputs, targets) batches; `loss_fn(outputs, targets)` is
    mean-reduced and defaults to cross-entropy. `scores.cost` holds wall seconds (this rank's),
    samples and backward passes (over all ranks) and, on CUDA, peak memory (this rank's).

    Under torch.distributed (a default process group of several ranks, e.g. ``torchrun``),
    each rank passes its own shard as `data` and the statistics are summed over ranks: the
    scores are the same on every rank and equal to one process on all shards
    (``saliency.distributed``; every rank must hold the same model). ``distributed=False``
    scores each rank's data alone; None (default) follows an enclosing
    ``saliency.distributed.local()`` and combines otherwise.
    """
    with _distributed.enabled(distributed):
        return _score(model, criterion, data, loss_fn, params, hparams)


def _score(model, criterion, data, loss_fn, params, hparams) -> Scores:
    crit = get_criterion(criterion, **hparams)
    params = dict(params) if params is not None else prunable_parameters(model)
    check_replicated(model)
    cuda = model_device(model).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base_memory = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    raw = crit.score(model, params, data, loss_fn or default_loss)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    _check_scores(raw, params, crit)
    warn_zero_scores(raw, params, crit)
    if _distributed.world() is not None:  # a criterion that scored its own shard alone
        name = getattr(crit, "name", type(crit).__name__)
        _distributed.check_replicated(
            raw, f"scores of criterion {name!r}",
            "the criterion does not combine its statistics across ranks (a criterion of your "
            "own: sum them with saliency.distributed.all_reduce_dict and sum_counts, see "
            "docs/distributed.md), or pass distributed=False to score each rank alone",
        )  # fmt: skip
    scores = raw if isinstance(raw, Scores) else Scores(raw)
    scores.cost.seconds = seconds
    if cuda:
        scores.cost.peak_memory_bytes = torch.cuda.max_memory_allocated() - base_memory
    return scores


def _restrict(masks: Masks | None, params: Mapping[str, Tensor]) -> Masks | None:
    """`masks` on exactly the tensors of `params` (all-keep where it had none), or None."""
    if masks is None:
        return None
    ones = Masks.ones_like(params)
    return Masks({n: masks[n] if n in masks else ones[n] for n in params})


# block-stage settings of the layer-wise solvers (saliency.blocks), passed through prune's kwargs
LAYERWISE_RUN = ("blocks", "offload", "device", "checkpoint_dir")


def _split_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    alloc = {k: kwargs.pop(k) for k in ALLOCATE_KWARGS if k in kwargs}
    return alloc, kwargs


def _check_before_scoring(sparsity, scope, granularity, alloc: dict[str, Any]) -> None:
    """Bad allocation settings fail now, not after an expensive scoring pass."""
    check_allocation(
        sparsity,
        scope,
        granularity,
        alloc.get("reduce"),
        alloc.get("block"),
        alloc.get("pooling", "avg"),
    )


def prune_step(
    model: nn.Module,
    crit: Criterion,
    params: Mapping[str, nn.Parameter],
    scores: Scores | None,
    sparsity: float | None,
    *,
    current: Masks | None,
    data: Iterable | None = None,
    run: Mapping[str, Any] | None = None,
    **allocate_kwargs: Any,
) -> Masks:
    """Allocate from `scores`, apply the criterion's weight update if it has one, zero the pruned.

    Layer-wise solvers (OBC, SparseGPT, Wanda: `layerwise.is_solver`) choose masks and update
    weights together on each layer's calibration inputs: they ignore `scores` and run
    `layerwise.prune_layerwise` on `data` instead of allocate + update, with `run` (its
    block-stage settings: blocks, offload, device, checkpoint_dir, forwards).

    Where each weight's output channels lie is read from the module that holds it
    (ConvTranspose weights are [in, out/groups, *k]; transformers' Conv1D [in, out]) and handed
    to `allocate`.
    """
    if is_solver(crit):
        scope, granularity = (
            allocate_kwargs.pop("scope", "global"),
            allocate_kwargs.pop("granularity", "element"),
        )
        check_settings(crit, sparsity, scope, granularity, allocate_kwargs)
        masks = prune_layerwise(model, crit, params, data, sparsity, granularity=granularity,
                                current=current, layer_sparsity=allocate_kwargs.get("layer_sparsity"),
                                **(run or {}))  # fmt: skip
        masks.apply(model)
        return masks
    if allocate_kwargs.get("reduce") is None:  # None (a sweep's default): the criterion's own
        allocate_kwargs["reduce"] = getattr(crit, "channel_reduce", None)
    # where each weight's output channels lie (ConvTranspose; HF Conv1D, [in, out], whose blocks
    # and N:M groups allocate then takes on its transpose)
    allocate_kwargs.setdefault("channel_layout", channel_layout(model, params))
    masks = allocate(scores, sparsity, current=current, **allocate_kwargs)
    if callable(getattr(crit, "apply_update", None)):
        crit.apply_update(model, params, masks, scores)
    masks.apply(model)
    owned = owned_masks(model, masks, allocate_kwargs.get("groups"))
    if owned is not None:  # biases and BatchNorm of pruned units: their outputs become exactly 0
        owned.apply(model)
    return masks


def owned_masks(model: nn.Module, masks: Masks, groups) -> Masks | None:
    """The masks of what pruned channel units own besides the targets (biases, BatchNorm weight
    and bias), for `groups` from `saliency.channel_groups`; None for plain unit-id mappings."""
    if groups is None or not callable(getattr(groups, "owned_masks", None)):
        return None
    return groups.owned_masks(masks, model)


def prune(
    model: nn.Module,
    criterion: str | Criterion,
    sparsity: float | None,
    data: Iterable | None = None,
    loss_fn: LossFn | None = None,
    scope: str = "global",
    granularity: str = "element",
    *,
    params: Mapping[str, nn.Parameter] | None = None,
    current: Masks | None = None,
    keep: bool = True,
    optimizer: torch.optim.Optimizer | None = None,
    cost: Cost | None = None,
    distributed: bool | None = None,
    **kwargs: Any,
) -> Masks:
    """Score, allocate, update and apply in one call; returns the masks.

    Criteria that ask for several rounds (`criterion.schedule(sparsity)`, e.g. SynFlow, OBS with
    recomputation) are re-scored between rounds. Masks already attached to `model` (or given
    as `current`) stay pruned. With `keep`, the masks are attached so that training keeps pruned
    weights at zero (`saliency.remove` bakes them in). `cost`, if given, accumulates the
    scoring cost of every round (seconds, samples, backward passes). Keyword arguments named like `allocate`'s
    (reduce, block, pooling, layer_sparsity, max_layer_sparsity, min_layer_channels, groups,
    tie_seed: equal scores are ordered at random from it) go there;
    the rest are the criterion's hyperparameters. Channel granularity keeps at least one output
    channel per layer unless `min_layer_channels=0` (see `allocate`). With
    `groups=saliency.channel_groups(model, example_inputs)` tied channels (residual additions,
    depthwise convolutions) are pruned together, and the biases and BatchNorm weight and bias
    of pruned channels are zeroed and kept zero too, so that `saliency.compact` can remove
    them with the outputs unchanged. Under torch.distributed the masks and updated weights come
    out the same on every rank (`score`; OBS blocks and layer-wise solves are shared out among
    ranks); ``distributed=False`` prunes each rank alone. Layer collapse is never silent: a
    `LayerCollapseWarning` names emptied layers and says when the output no longer depends on
    the input (`saliency.collapse`); a `ZeroScoreWarning` names layers scored all zero.
    """
    with _distributed.enabled(distributed):
        return _prune(model, criterion, sparsity, data, loss_fn, scope, granularity, params,
                      current, keep, optimizer, cost, kwargs)  # fmt: skip


def _prune(model, criterion, sparsity, data, loss_fn, scope, granularity, params, current, keep,
           optimizer, cost, kwargs) -> Masks:  # fmt: skip
    kwargs = dict(kwargs)
    if is_structured(granularity):
        return _prune_structured(model, criterion, sparsity, data, loss_fn, scope, granularity,
                                 keep, optimizer, cost, kwargs)  # fmt: skip
    run = {k: kwargs.pop(k) for k in LAYERWISE_RUN if k in kwargs}
    alloc, hparams = _split_kwargs(kwargs)
    _check_before_scoring(sparsity, scope, granularity, alloc)
    crit = get_criterion(criterion, **for_granularity(criterion, hparams, granularity))
    if run and not is_solver(crit):
        raise ValueError(f"{sorted(run)} are settings of the layer-wise solvers (obc, sparsegpt, "
                         f"wanda), not of {getattr(crit, 'name', criterion)!r}")  # fmt: skip
    params = dict(params) if params is not None else prunable_parameters(model)
    attached = attached_masks(model)
    masks = _restrict(current if current is not None else attached, params)
    was_connected = input_disconnected(model, data) is False  # checked again after pruning
    rounds = crit.schedule(sparsity) if callable(getattr(crit, "schedule", None)) else [sparsity]
    if "allocation" in alloc and not is_solver(crit):
        raise ValueError(
            f"allocation= chooses layer sparsities for the layer-wise solvers (obc, sparsegpt, "
            f"wanda); {crit.name!r} allocates globally or per layer through scope= instead"
        )
    if is_solver(crit):  # refuse bad settings before any work; one solve, its cost measured
        alloc = _layer_allocation(model, crit, params, data, sparsity, alloc)
        check_settings(crit, sparsity, scope, granularity, alloc)
        check_replicated(model)
        start, forwards = time.perf_counter(), {}
        masks = prune_step(model, crit, params, None, sparsity, current=masks, data=data,
                           run={**run, "forwards": forwards}, scope=scope,
                           granularity=granularity, **alloc)  # fmt: skip
        if cost is not None:
            cost.add(Cost(seconds=time.perf_counter() - start, backward_passes=0,
                          forwards=forwards))  # fmt: skip
        rounds = []
    for s in rounds:
        scores = _score(model, crit, data, loss_fn, params, {})  # in prune's distributed mode
        if cost is not None:
            cost.add(scores.cost)
        masks = prune_step(
            model,
            crit,
            params,
            scores,
            s,
            current=masks,
            scope=scope,
            granularity=granularity,
            **alloc,
        )
    if masks is not None:  # an emptied layer or an output cut from the input is never silent
        check_collapse(model, masks, data, was_connected)
    if keep:
        # masks attached earlier on tensors outside this call's targets stay in force; the
        # biases and BatchNorm of pruned channel units stay zero too (`groups`)
        owned = owned_masks(model, masks, alloc.get("groups")) or {}
        attach(model, Masks({**(attached or {}), **masks, **owned}), optimizer=optimizer)
    elif optimizer is not None:
        clear_optimizer_state(optimizer, model, masks)
    return masks


def _prune_structured(model, criterion, sparsity, data, loss_fn, scope, granularity, keep,
                      optimizer, cost, kwargs) -> Masks:  # fmt: skip
    """Heads, neurons, blocks (``saliency.structured``): one scoring, allocation by units, the
    criterion's update, masks over the units' weights and biases (attached with ``keep``)."""
    structure = kwargs.pop("structure", None)
    crit = get_criterion(criterion, **kwargs)
    start = time.perf_counter()
    spent = Cost()

    def score_elements(weights):
        s = _score(model, crit, data, loss_fn, weights, {})
        spent.add(s.cost)
        return s

    masks, _ = prune_structured(model, crit, sparsity, data, scope=scope, granularity=granularity,
                                score_elements=score_elements, structure=structure)  # fmt: skip
    masks = Masks(masks)
    masks.apply(model)
    if cost is not None:
        spent.seconds = time.perf_counter() - start
        cost.add(spent)
    if keep:
        attached = attached_masks(model)
        attach(model, Masks({**(attached or {}), **masks}), optimizer=optimizer)
    elif optimizer is not None:
        clear_optimizer_state(optimizer, model, masks)
    return masks


def _layer_allocation(model, crit, params, data, sparsity, alloc: dict[str, Any]) -> dict:
    """``allocation="owl" | "obs"``: layer sparsities from the dense model
    (``saliency.layer_sparsity``), handed on as ``layer_sparsity``; "uniform" (default): none."""
    how = alloc.pop("allocation", "uniform")
    if how == "uniform":
        return alloc
    if how not in ("owl", "obs"):
        raise ValueError(f"allocation must be 'uniform', 'owl' or 'obs'; got {how!r}")
    if sparsity is None or alloc.get("layer_sparsity"):
        raise ValueError(
            f"allocation={how!r} spreads one sparsity over the layers: pass sparsity= and no "
            "layer_sparsity (or pass layer_sparsity alone)"
        )
    spread = layer_sparsity.owl_sparsity if how == "owl" else layer_sparsity.obs_budget_sparsity
    alloc["layer_sparsity"] = spread(model, params, data, sparsity, n_samples=crit.n_samples)
    return alloc


class GradualPruner:
    """Prune during the user's own training loop: call `step()` once per optimizer step.

    At the steps where `schedule.should_prune(step)` holds, the model is re-scored and re-masked
    to `schedule.sparsity_at(step)` (monotone: pruned weights stay pruned), and the masks stay
    attached in between. Example (Zhu & Gupta 2017, as tfmot)::

        pruner = GradualPruner(model, "magnitude", PolynomialDecay(0.5, 0.8, 0, 1000), optimizer=opt)
        for x, y in loader:
            loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad(); pruner.step()
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: str | Criterion,
        schedule: Schedule,
        data: Iterable | None = None,
        loss_fn: LossFn | None = None,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        scope: str = "global",
        granularity: str = "element",
        params: Mapping[str, nn.Parameter] | None = None,
        distributed: bool | None = None,
        **prune_kwargs: Any,
    ) -> None:
        if not callable(getattr(schedule, "should_prune", None)) or not callable(
            getattr(schedule, "sparsity_at", None)
        ):
            raise TypeError(
                f"schedule must have should_prune(step) and sparsity_at(step) (see saliency.schedules); got {schedule!r}"
            )
        self.model, self.schedule, self.data, self.loss_fn = model, schedule, data, loss_fn
        alloc, hparams = _split_kwargs(dict(prune_kwargs))
        self.optimizer, self.allocate_kwargs = optimizer, alloc
        # the schedule gives the sparsities later: check the rest with a placeholder
        _check_before_scoring(None if ":" in str(granularity) else 0.5, scope, granularity, alloc)
        self.criterion = get_criterion(
            criterion, **for_granularity(criterion, hparams, granularity)
        )
        self.scope, self.granularity, self.distributed = scope, granularity, distributed
        self.params = dict(params) if params is not None else prunable_parameters(model)
        self.global_step = 0
        self.masks: Masks | None = _restrict(attached_masks(model), self.params)
        self.cost = Cost(backward_passes=0)  # of every scoring pass so far

    def step(self) -> Masks | None:
        """Advance one training step; re-prune if the schedule says so. Returns the masks in force."""
        step, self.global_step = self.global_step, self.global_step + 1
        if self.schedule.should_prune(step):
            target = self.schedule.sparsity_at(step)
            if self.masks is None or target > self.masks.sparsity:
                self.masks = prune(
                    self.model,
                    self.criterion,
                    target,
                    self.data,
                    self.loss_fn,
                    self.scope,
                    self.granularity,
                    params=self.params,
                    optimizer=self.optimizer,
                    cost=self.cost,
                    distributed=self.distributed,
                    **self.allocate_kwargs,
                )
        return self.masks
