"""What one job of a sweep does: train the dense model of a seed, or prune with one criterion.

A job runs in any process (the parent, a pool worker, a submitit task) from picklable inputs:
the `SweepConfig`, a `Job`, and the sweep directory. It appends the records of each finished
unit at once (one locked, fsynced write per unit), so a kill loses only the unit in progress.
"""

from __future__ import annotations

import copy
import importlib
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

import saliency
from saliency.criteria import Cost
from saliency.layerwise import is_solver
from saliency.masks import Masks
from saliency.prune import score
from saliency.sweep.config import SweepConfig
from saliency.sweep.records import append_records
from saliency.sweep.units import (  # noqa: F401  (re-exported: the runner and tests use them)
    _DATA,
    Job,
    Unit,
    allocate_kwargs,
    build_criterion,
    cache_path,
    calibration_example,
    dataset,
    dense_budget,
    dense_model,
    device,
    evaluate_model,
    first_order_change,
    kept_masks,
    loss_fn_for,
    loss_gradient,
    make_records,
    needs_element_scores,
    new_model,
    prune_with_cost,
    scoring_data,
    structured,
    targets,
    train_model,
    unit_run_id,
)

log = logging.getLogger(__name__)


def _finish(
    cfg, out, job, unit, model, masks, phases, cost, predicted, tb, notify, first_order=None
) -> None:
    recs = make_records(
        cfg,
        job,
        unit,
        model,
        masks,
        phases,
        cost=cost,
        predicted=predicted,
        first_order=first_order,
    )
    append_records(out, recs)
    if recs and (recs[0]["emptied_layers"] or recs[0]["input_connected"] is False):
        log.warning(
            "%s: layer collapse at sparsity %g (seed %d, %s): %d emptied layer(s) %s%s; the "
            "records say so (emptied_layers, input_connected)",
            recs[0]["label"],
            unit.sparsity,
            job.seed,
            unit.mode,
            len(recs[0]["emptied_layers"]),
            recs[0]["emptied_layers"][:8],
            ", the output no longer depends on the input"
            if recs[0]["input_connected"] is False
            else "",
        )
    if tb is not None:
        tb.unit(job, unit, recs)
    if notify:
        notify(("done", unit))


def _status(notify, job: Job, what: str, sparsity: float | None = None) -> None:
    """Tell the progress display what runs now: "obs s=0.9 seed 1: fine-tune"."""
    if notify:
        label = job.criterion.label if job.criterion else "dense"
        at = "" if sparsity is None else f" s={sparsity:g}"
        notify(("status", f"{label}{at} seed {job.seed}: {what}"))


def run_job(
    cfg: SweepConfig,
    job: Job,
    out: str | os.PathLike,
    done: frozenset[str] = frozenset(),
    notify: Callable[[Unit], None] | None = None,
) -> int:
    """Run the units of `job` whose run_id is not in `done`; returns how many were run.

    `notify(event)` sees the progress: ("status", text) when a step starts, ("loss", mean
    training loss) after every epoch, ("done", unit) when a unit's records are written."""
    from saliency.sweep.tblog import TensorBoard

    for mod in cfg.imports:  # a fresh worker process registers the user's plug-ins again
        importlib.import_module(mod)
    out = Path(out)
    todo = [u for u in job.units if u.run_id not in done]
    tb = TensorBoard.maybe(cfg, out)
    try:
        if job.kind == "dense":
            _status(notify, job, "train" if todo else "check the cache")
            model = dense_model(cfg, out, job.seed, notify)
            masks = Masks.ones_like(targets(cfg, model))
            metrics = evaluate_model(cfg, model, scoring=scoring_data(cfg, job.seed))
            for u in todo:
                _finish(
                    cfg,
                    out,
                    job,
                    u,
                    model,
                    masks,
                    {"dense": metrics},
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
    """One scoring pass of the dense model, reused for every sparsity (oneshot and finetune).
    Transformer units: the units are found once, and element scores computed once where the
    criterion reads them (`needs_element_scores`); FLAP and structured OBS score per sparsity."""
    from saliency.sweep.records import save_scores

    dense = dense_model(cfg, out, job.seed, notify)
    ds, spec = dataset(cfg), job.criterion
    crit = build_criterion(spec, job.seed, cfg.granularity)
    data, loss_fn = scoring_data(cfg, job.seed), loss_fn_for(ds.task)
    _status(notify, job, "score")
    multi = (
        any(list(crit.schedule(s)) != [s] for s in cfg.sparsities)
        if callable(getattr(crit, "schedule", None))
        else False
    )
    scores, structure = None, None
    if structured(cfg):
        structure = saliency.find_structure(dense, calibration_example(cfg, job.seed))
    wanted = not structured(cfg) or needs_element_scores(crit, cfg.granularity)
    if (not multi and not is_solver(crit) and wanted) or cfg.save_scores:  # solvers: no scores
        scores = score(dense, crit, data, loss_fn, params=targets(cfg, dense))
        if cfg.save_scores:
            mode = "oneshot" if "oneshot" in cfg.modes else "finetune"
            save_scores(out, f"{mode}-seed{job.seed}", spec.label, scores)
    grads = None
    for s in sorted({u.sparsity for u in todo}):
        _status(notify, job, "prune", s)
        model = copy.deepcopy(dense)
        masks, cost, predicted = prune_with_cost(
            cfg, model, crit, s, data, loss_fn, scores=None if multi else scores,
            structure=structure,
        )  # fmt: skip
        pruned = evaluate_model(cfg, model, scoring=data)
        first_order = None
        if predicted is not None:  # loss-unit criteria: also the term their model leaves out
            grads = grads if grads is not None else loss_gradient(dense, data, loss_fn)
            first_order = first_order_change(grads, dense, model)
        for u in (u for u in todo if u.sparsity == s):
            phases = {"pruned": pruned}
            if u.mode == "finetune":
                _status(notify, job, "fine-tune", s)
                ft = copy.deepcopy(model)
                saliency.attach(ft, kept_masks(cfg, ft, masks))
                train_model(cfg, ft, job.seed, cfg.finetune, notify=notify)
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
                first_order,
            )


def _job_gradual(cfg, out, job, todo, tb, notify) -> None:
    """Polynomial decay from `initial_sparsity` to the target while training (Zhu & Gupta 2017),
    from the trained dense model or (``start = "init"``, as tfmot's tutorials) from scratch."""
    (u,) = todo
    g, ds = cfg.gradual, dataset(cfg)
    if g["start"] == "init":
        model = new_model(cfg, job.seed).to(device(cfg))
    else:
        model = dense_model(cfg, out, job.seed, notify)
    _status(notify, job, "gradual pruning", u.sparsity)
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
        build_criterion(spec, job.seed, cfg.granularity),
        schedule,
        scoring_data(cfg, job.seed),
        loss_fn_for(ds.task),
        scope=cfg.scope,
        granularity=cfg.granularity,
        params=targets(cfg, model),
        **allocate_kwargs(cfg, model),
    )

    def on_step(step: int, *_):
        masks = pruner.step()
        if tb is not None and schedule.should_prune(step):
            tb.during(job, u, step, masks)  # sparsity over training, as tfmot's PruningSummaries
        return masks  # new masks: train() clears the optimizer state at their pruned entries

    train_model(
        cfg,
        model,
        job.seed,
        {**cfg.finetune, "epochs": g["epochs"]},
        on_step=on_step,
        notify=notify,
    )
    masks, cost = pruner.masks, pruner.cost
    if masks is None or pruner.global_step <= end:  # schedule cut short by the epochs
        log.warning(
            "%s: the gradual schedule had not reached sparsity %g after %d epochs (end_step %d of "
            "%d steps); pruning the rest at once after training",
            spec.label,
            u.sparsity,
            g["epochs"],
            end,
            steps,
        )
        masks = saliency.prune(
            model,
            pruner.criterion,
            u.sparsity,
            scoring_data(cfg, job.seed),
            loss_fn_for(ds.task),
            cfg.scope,
            cfg.granularity,
            params=targets(cfg, model),
            cost=cost,
            **allocate_kwargs(cfg, model),
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
        cost,
        None,
        tb,
        notify,
    )


def _job_iterative(cfg, out, job, todo, tb, notify) -> None:
    """`rounds` geometric prune / fine-tune rounds to the target (Frankle & Carbin 2019)."""
    (u,) = todo
    it, ds, spec = cfg.iterative, dataset(cfg), job.criterion
    model = dense_model(cfg, out, job.seed, notify)
    crit = build_criterion(spec, job.seed, cfg.granularity)
    data, loss_fn = scoring_data(cfg, job.seed), loss_fn_for(ds.task)
    _status(notify, job, "iterative pruning", u.sparsity)
    fraction = 1.0 - (1.0 - u.sparsity) ** (1.0 / max(it["rounds"], 1))
    rounds = saliency.Geometric(u.sparsity, fraction).rounds() if u.sparsity > 0 else [0.0]
    masks, cost = None, Cost(backward_passes=0)
    for s in rounds:
        masks, c, _ = prune_with_cost(cfg, model, crit, s, data, loss_fn, current=masks)
        cost.add(c)
        saliency.attach(model, kept_masks(cfg, model, masks))
        train_model(
            cfg, model, job.seed, {**cfg.finetune, "epochs": it["epochs_per_round"]}, notify=notify
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
        cost,
        None,
        tb,
        notify,
    )


def _job_init(cfg, out, job, todo, tb, notify) -> None:
    """Prune the seed's initialization (SNIP / GraSP / SynFlow setting), then train it."""
    (u,) = todo
    ds, spec = dataset(cfg), job.criterion
    model = new_model(cfg, job.seed).to(device(cfg))
    crit = build_criterion(spec, job.seed, cfg.granularity)
    data = scoring_data(cfg, job.seed)
    _status(notify, job, "prune at init", u.sparsity)
    masks, cost, predicted = prune_with_cost(
        cfg, model, crit, u.sparsity, data, loss_fn_for(ds.task)
    )
    phases = {"pruned": evaluate_model(cfg, model, scoring=data)}
    epochs = cfg.init["epochs"] if cfg.init["epochs"] is not None else cfg.train["epochs"]
    saliency.attach(model, kept_masks(cfg, model, masks))
    _status(notify, job, "train", u.sparsity)
    train_model(cfg, model, job.seed, {**cfg.train, "epochs": epochs}, notify=notify)
    saliency.remove(model)
    phases["final"] = evaluate_model(cfg, model)
    _finish(cfg, out, job, u, model, masks, phases, cost, predicted, tb, notify)


def _job_baseline(cfg, out, job, todo, tb, notify) -> None:
    """The dense model given the training a mode's pruned models get (`dense_budget`): the
    fair reference for that mode, since the extra epochs alone improve a model too."""
    (u,) = todo
    start, rounds = dense_budget(cfg, u.mode)
    if start == "init":
        model = new_model(cfg, job.seed).to(device(cfg))
    else:
        model = dense_model(cfg, out, job.seed, notify)
    _status(notify, job, f"{u.mode} baseline")
    for settings in rounds:
        train_model(cfg, model, job.seed, settings, notify=notify)
    masks = Masks.ones_like(targets(cfg, model))
    phases = {"final": evaluate_model(cfg, model)}
    _finish(cfg, out, job, u, model, masks, phases, None, None, tb, notify)
