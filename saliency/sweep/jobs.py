"""What one job of a sweep does: train the dense model of a seed, or prune with one criterion.

A job runs in any process (the parent, a pool worker, a submitit task) from picklable inputs:
the `SweepConfig`, a `Job`, and the sweep directory. It appends the records of each finished
unit at once (one locked, fsynced write per unit), so a kill loses only the unit in progress.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

import saliency
from saliency.criteria import Cost, get_criterion
from saliency.masks import Masks
from saliency.prune import prune_step, score
from saliency.sweep.config import CriterionSpec, SweepConfig, digest
from saliency.sweep.records import append_records

_DATA: dict[tuple, Any] = {}  # per-process cache of loaded datasets


@dataclass(frozen=True)
class Unit:
    run_id: str
    mode: str
    sparsity: float


@dataclass(frozen=True)
class Job:
    """`kind` "dense" (train and cache the dense model of `seed`), "oneshot" (one scoring pass
    for every oneshot/finetune unit of a criterion and seed), or "gradual"/"iterative"/"init"
    (one unit each)."""

    kind: str
    seed: int
    criterion: CriterionSpec | None = None
    units: tuple[Unit, ...] = field(default_factory=tuple)


def dataset(cfg: SweepConfig):
    from saliency import zoo

    key = (cfg.dataset, cfg.data_root)
    if key not in _DATA:
        _DATA[key] = zoo.get_dataset(cfg.dataset, data_root=cfg.data_root, seed=0)
    return _DATA[key]


def loss_fn_for(task: str) -> Callable:
    if task == "regression":
        return lambda out, y: torch.nn.functional.mse_loss(out.reshape(y.shape), y)
    return torch.nn.functional.cross_entropy


def dense_key(cfg: SweepConfig, seed: int) -> dict[str, Any]:
    return {
        "model": cfg.model,
        "model_kwargs": cfg.model_kwargs,
        "dataset": cfg.dataset,
        "train": cfg.train,
        "seed": seed,
    }


def unit_run_id(
    cfg: SweepConfig, seed: int, mode: str, spec: CriterionSpec | None, s: float
) -> str:
    """sha256 of the unit's canonical config: what determines its result, nothing else."""
    unit = {**dense_key(cfg, seed), "mode": mode}
    if spec is not None:
        unit.update(
            criterion=spec.name,
            hparams=spec.hparams,
            sparsity=s,
            scope=cfg.scope,
            granularity=cfg.granularity,
            allocate=cfg.allocate,
            targets=cfg.targets,
            scoring=cfg.scoring,
        )
        if mode in ("finetune", "iterative"):
            unit["finetune"] = cfg.finetune
        if mode in ("gradual", "iterative", "init"):
            unit[mode] = getattr(cfg, mode)
    return digest(unit)


def new_model(cfg: SweepConfig, seed: int) -> torch.nn.Module:
    from saliency import zoo

    ds = dataset(cfg)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        return zoo.get_model(
            cfg.model, input_shape=ds.input_shape, num_classes=ds.num_classes, **cfg.model_kwargs
        )


def _train(cfg, model, seed, settings, *, on_step=None) -> None:
    from saliency.sweep.train import resolve_device, train

    ds = dataset(cfg)
    keys = ("epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay")
    train(
        model,
        ds.train,
        **{k: settings[k] for k in keys},
        seed=seed,
        device=resolve_device(cfg.device),
        task=ds.task,
        on_step=on_step,
    )


def cache_path(cfg: SweepConfig, out: Path, seed: int) -> Path:
    return out / "cache" / f"dense-seed{seed}-{digest(dense_key(cfg, seed))}.pt"


def dense_model(cfg: SweepConfig, out: Path, seed: int) -> torch.nn.Module:
    """The trained dense model of `seed`, from the cache, or trained now and cached atomically."""
    path = cache_path(cfg, out, seed)
    model = new_model(cfg, seed)
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    else:
        _train(cfg, model, seed, cfg.train)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
        os.replace(tmp, path)
    return model.to("cpu")


def scoring_data(cfg: SweepConfig, seed: int) -> DataLoader:
    """The first `scoring.n_samples` training samples of a seeded permutation."""
    x, y = dataset(cfg).train.tensors[:2]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(x), generator=g)[: cfg.scoring["n_samples"] or len(x)]
    return DataLoader(TensorDataset(x[idx], y[idx]), batch_size=cfg.scoring["batch_size"])


def targets(cfg: SweepConfig, model) -> dict[str, torch.nn.Parameter]:
    return saliency.prunable_parameters(model, **cfg.targets)


def hparams_of(crit) -> dict[str, Any]:
    if not dataclasses.is_dataclass(crit):
        return {}
    raw = {f.name: getattr(crit, f.name) for f in dataclasses.fields(crit)}
    return json.loads(json.dumps(raw, default=str))


def prune_with_cost(cfg, model, crit, sparsity, data, loss_fn, *, current=None, scores=None):
    """Score -> allocate -> update -> apply over the criterion's rounds (or with given `scores`).

    Returns (masks, cost summed over rounds, predicted loss increase or None). The predicted
    increase of `loss_units` criteria sums, round by round, the scores of the newly pruned entries.
    """
    params = targets(cfg, model)
    rounds = crit.schedule(sparsity) if callable(getattr(crit, "schedule", None)) else [sparsity]
    if scores is not None:
        rounds = [sparsity]
    total, predicted, masks = Cost(backward_passes=0), 0.0, current
    for s in rounds:
        sc = scores if scores is not None else score(model, crit, data, loss_fn, params=params)
        before = masks
        masks = prune_step(
            model,
            crit,
            params,
            sc,
            s,
            current=masks,
            scope=cfg.scope,
            granularity=cfg.granularity,
            **cfg.allocate,
        )
        if scores is None:
            total.seconds += sc.cost.seconds
            total.samples += sc.cost.samples or 0
            bp = sc.cost.backward_passes
            total.backward_passes = (
                None
                if bp is None or total.backward_passes is None
                else (total.backward_passes + bp)
            )
        for n, keep in masks.items():
            new = ~keep if before is None else before[n] & ~keep
            predicted += float(sc[n][new.to(sc[n].device)].double().sum())
    if masks is None:  # an empty schedule: nothing pruned
        masks = Masks.ones_like(params)
    if scores is not None:
        total = scores.cost
    return masks, total, predicted if getattr(crit, "loss_units", False) else None


def evaluate_model(cfg: SweepConfig, model) -> dict[str, float]:
    from saliency.sweep.train import evaluate, resolve_device

    ds = dataset(cfg)
    return {
        k: float(v)
        for k, v in evaluate(
            model, ds.test, task=ds.task, device=resolve_device(cfg.device)
        ).items()
    }


def make_records(
    cfg,
    job: Job,
    unit: Unit,
    model,
    masks: Masks,
    phases: dict[str, dict],
    *,
    cost: Cost | None,
    predicted: float | None,
) -> list[dict[str, Any]]:
    """The tidy records of one unit (one per phase and metric), per /work/notes/records.md."""
    from saliency.sweep.metrics import count_flops, gzip_size, params_count

    ds = dataset(cfg)
    plain = model
    if saliency.attached_masks(model) is not None:
        plain = saliency.remove(copy.deepcopy(model))
    flops_dense, flops_nonzero = count_flops(plain, ds.input_shape)
    total, remaining = params_count(plain, masks)
    spec = job.criterion
    crit = get_criterion(spec.name, **spec.hparams) if spec else None
    base = {
        "run_id": unit.run_id,
        "sweep": cfg.name,
        "config_hash": cfg.config_hash,
        "model": cfg.model,
        "dataset": cfg.dataset,
        "task": ds.task,
        "criterion": spec.name if spec else "dense",
        "label": spec.label if spec else "dense",
        "hparams": hparams_of(crit) if crit else {},
        "seed": job.seed,
        "mode": unit.mode,
        "scope": cfg.scope,
        "granularity": cfg.granularity,
        "sparsity_target": unit.sparsity,
        "sparsity": masks.sparsity,
        "layer_sparsity": masks.layer_sparsity(),
        "split": "test",
        "params_total": total,
        "params_remaining": remaining,
        "flops_dense": flops_dense,
        "flops_nonzero": flops_nonzero,
        "gzip_bytes": gzip_size(plain),
        "score_seconds": cost.seconds if cost else None,
        "score_samples": cost.samples if cost else None,
        "score_backward_passes": cost.backward_passes if cost else None,
        "predicted_loss_increase": predicted,
        "time": time.time(),
        "saliency_version": saliency.__version__,
    }
    return [
        {**base, "phase": phase, "metric": m, "value": v}
        for phase, metrics in phases.items()
        for m, v in metrics.items()
    ]


def _finish(cfg, out, job, unit, model, masks, phases, cost, predicted, tb, notify) -> None:
    recs = make_records(cfg, job, unit, model, masks, phases, cost=cost, predicted=predicted)
    append_records(out, recs)
    if tb is not None:
        tb.unit(job, unit, recs)
    if notify:
        notify(unit)


def run_job(
    cfg: SweepConfig,
    job: Job,
    out: str | os.PathLike,
    done: frozenset[str] = frozenset(),
    notify: Callable[[Unit], None] | None = None,
) -> int:
    """Run the units of `job` whose run_id is not in `done`; returns how many were run."""
    from saliency.sweep.tblog import TensorBoard

    for mod in cfg.imports:  # a fresh worker process registers the user's plug-ins again
        importlib.import_module(mod)
    out = Path(out)
    todo = [u for u in job.units if u.run_id not in done]
    tb = TensorBoard.maybe(cfg, out)
    try:
        if job.kind == "dense":
            model = dense_model(cfg, out, job.seed)
            masks = Masks.ones_like(targets(cfg, model))
            for u in todo:
                _finish(
                    cfg,
                    out,
                    job,
                    u,
                    model,
                    masks,
                    {"dense": evaluate_model(cfg, model)},
                    None,
                    None,
                    tb,
                    notify,
                )
        elif todo:
            globals()[f"_job_{job.kind}"](cfg, out, job, todo, tb, notify)
    finally:
        if tb is not None:
            tb.close()
    return len(todo)


def _job_oneshot(cfg, out, job, todo, tb, notify) -> None:
    """One scoring pass of the dense model, reused for every sparsity (oneshot and finetune)."""
    from saliency.sweep.records import save_scores

    dense = dense_model(cfg, out, job.seed)
    ds, spec = dataset(cfg), job.criterion
    crit = get_criterion(spec.name, **spec.hparams)
    data, loss_fn = scoring_data(cfg, job.seed), loss_fn_for(ds.task)
    multi = (
        any(list(crit.schedule(s)) != [s] for s in cfg.sparsities)
        if callable(getattr(crit, "schedule", None))
        else False
    )
    scores = None
    if not multi or cfg.save_scores:
        scores = score(dense, crit, data, loss_fn, params=targets(cfg, dense))
        if cfg.save_scores:
            mode = "oneshot" if "oneshot" in cfg.modes else "finetune"
            save_scores(out, f"{mode}-seed{job.seed}", spec.label, scores)
    for s in sorted({u.sparsity for u in todo}):
        model = copy.deepcopy(dense)
        masks, cost, predicted = prune_with_cost(
            cfg, model, crit, s, data, loss_fn, scores=None if multi else scores
        )
        pruned = evaluate_model(cfg, model)
        for u in (u for u in todo if u.sparsity == s):
            phases = {"pruned": pruned}
            if u.mode == "finetune":
                ft = copy.deepcopy(model)
                saliency.attach(ft, masks)
                _train(cfg, ft, job.seed, cfg.finetune)
                saliency.remove(ft)
                phases["final"] = evaluate_model(cfg, ft)
            _finish(
                cfg,
                out,
                job,
                u,
                model if u.mode == "oneshot" else ft,
                masks,
                phases,
                cost,
                predicted,
                tb,
                notify,
            )


def _job_gradual(cfg, out, job, todo, tb, notify) -> None:
    """Polynomial decay from `initial_sparsity` to the target while training (Zhu & Gupta 2017)."""
    (u,) = todo
    g, ds = cfg.gradual, dataset(cfg)
    model = dense_model(cfg, out, job.seed)
    steps = g["epochs"] * math.ceil(len(ds.train) / cfg.finetune["batch_size"])
    end = g["end_step"] if g["end_step"] is not None else max(g["begin_step"], int(0.75 * steps))
    freq = g["frequency"] or max(1, (end - g["begin_step"]) // 10)
    schedule = saliency.PolynomialDecay(
        min(g["initial_sparsity"], u.sparsity),
        u.sparsity,
        g["begin_step"],
        end,
        power=g["power"],
        frequency=freq,
    )
    spec = job.criterion
    pruner = saliency.GradualPruner(
        model,
        get_criterion(spec.name, **spec.hparams),
        schedule,
        scoring_data(cfg, job.seed),
        loss_fn_for(ds.task),
        scope=cfg.scope,
        granularity=cfg.granularity,
        params=targets(cfg, model),
        **cfg.allocate,
    )
    _train(
        cfg,
        model,
        job.seed,
        {**cfg.finetune, "epochs": g["epochs"]},
        on_step=lambda *a, **k: pruner.step(),
    )
    masks = pruner.masks
    if masks is None or masks.sparsity < u.sparsity - 1e-6:  # schedule cut short by the epochs
        masks = saliency.prune(
            model,
            pruner.criterion,
            u.sparsity,
            scoring_data(cfg, job.seed),
            loss_fn_for(ds.task),
            cfg.scope,
            cfg.granularity,
            params=targets(cfg, model),
            **cfg.allocate,
        )
    saliency.remove(model)
    _finish(
        cfg,
        out,
        job,
        u,
        model,
        masks,
        {"final": evaluate_model(cfg, model)},
        None,
        None,
        tb,
        notify,
    )


def _job_iterative(cfg, out, job, todo, tb, notify) -> None:
    """`rounds` geometric prune / fine-tune rounds to the target (Frankle & Carbin 2019)."""
    (u,) = todo
    it, ds, spec = cfg.iterative, dataset(cfg), job.criterion
    model = dense_model(cfg, out, job.seed)
    crit = get_criterion(spec.name, **spec.hparams)
    data, loss_fn = scoring_data(cfg, job.seed), loss_fn_for(ds.task)
    fraction = 1.0 - (1.0 - u.sparsity) ** (1.0 / max(it["rounds"], 1))
    rounds = saliency.Geometric(u.sparsity, fraction).rounds() if u.sparsity > 0 else [0.0]
    masks, cost = None, Cost(backward_passes=0)
    for s in rounds:
        masks, c, _ = prune_with_cost(cfg, model, crit, s, data, loss_fn, current=masks)
        cost.seconds += c.seconds
        cost.samples += c.samples
        cost.backward_passes = (
            None
            if c.backward_passes is None or cost.backward_passes is None
            else cost.backward_passes + c.backward_passes
        )
        saliency.attach(model, masks)
        _train(cfg, model, job.seed, {**cfg.finetune, "epochs": it["epochs_per_round"]})
        saliency.remove(model)
    _finish(
        cfg,
        out,
        job,
        u,
        model,
        masks,
        {"final": evaluate_model(cfg, model)},
        cost,
        None,
        tb,
        notify,
    )


def _job_init(cfg, out, job, todo, tb, notify) -> None:
    """Prune the seed's initialization (SNIP / GraSP / SynFlow setting), then train it."""
    (u,) = todo
    ds, spec = dataset(cfg), job.criterion
    model = new_model(cfg, job.seed)
    crit = get_criterion(spec.name, **spec.hparams)
    masks, cost, predicted = prune_with_cost(
        cfg, model, crit, u.sparsity, scoring_data(cfg, job.seed), loss_fn_for(ds.task)
    )
    phases = {"pruned": evaluate_model(cfg, model)}
    epochs = cfg.init["epochs"] if cfg.init["epochs"] is not None else cfg.train["epochs"]
    saliency.attach(model, masks)
    _train(cfg, model, job.seed, {**cfg.train, "epochs": epochs})
    saliency.remove(model)
    phases["final"] = evaluate_model(cfg, model)
    _finish(cfg, out, job, u, model, masks, phases, cost, predicted, tb, notify)
