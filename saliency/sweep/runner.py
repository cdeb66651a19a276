"""Sweep runner: config -> units -> jobs -> records, resumable, serial or in parallel.

A unit is (criterion, sparsity, seed, mode) with a run id hashed from its config. Units are
grouped into jobs so that expensive work is shared: the dense model of a seed is trained once
(and cached on disk), and in oneshot/finetune modes one scoring pass of a criterion serves every
sparsity. Jobs run in this process (`workers=1`), in a spawned process pool (`workers>1`), or as
submitit jobs (`executor="submitit"`); dense jobs first, then the others. Workers append their
own records under a file lock; re-running skips every unit whose records are all written.

One run at a time per sweep directory: `run_sweep` holds an exclusive lock on `<dir>/.lock`
while it works (a second run fails at once with `SweepLocked`). A sweep with nothing left to do
writes nothing, so finished results can be re-checked in a read-only directory. Ctrl-C stops
the workers at once and raises `SweepInterrupted` with what was recorded.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saliency import distributed
from saliency.sweep.config import SweepConfig
from saliency.sweep.jobs import Job, Unit, cache_path, dense_budget, run_job, unit_run_id
from saliency.sweep.records import (
    atomic_write,
    clean,
    config_groups,
    iter_records,
    records_path,
)

log = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # Windows: no directory lock
    fcntl = None


class SweepLocked(RuntimeError):
    """Another run holds the sweep directory's lock."""


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the sweep; `result` counts what was recorded before it."""

    def __init__(self, result: SweepResult):
        super().__init__("interrupted")
        self.result = result


@dataclass
class SweepResult:
    out: Path
    units: int
    skipped: int  # already recorded before this run
    ran: int = 0
    seconds: float = 0.0
    failures: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what a resume found, one line each

    @property
    def records_path(self) -> Path:
        return records_path(self.out)


def plan(cfg: SweepConfig) -> list[Job]:
    """Every job of the sweep: per seed the dense job and the dense baselines of the modes
    that train further, then the pruning jobs."""
    jobs = []
    for seed in cfg.seeds:
        jobs.append(
            Job(
                "dense", seed, None, (Unit(unit_run_id(cfg, seed, "dense", None, 0), "dense", 0.0),)
            )
        )
    for seed in cfg.seeds:
        for m in cfg.modes:
            if dense_budget(cfg, m) is not None:
                jobs.append(
                    Job(
                        "baseline",
                        seed,
                        None,
                        (Unit(unit_run_id(cfg, seed, m, None, 0.0), m, 0.0),),
                    )
                )
    for spec in cfg.criteria:
        for seed in cfg.seeds:
            shared = [
                Unit(unit_run_id(cfg, seed, m, spec, s), m, s)
                for s in cfg.sparsities
                for m in cfg.modes
                if m in ("oneshot", "finetune")
            ]
            if shared:
                jobs.append(Job("oneshot", seed, spec, tuple(shared)))
            for m in (m for m in cfg.modes if m not in ("oneshot", "finetune")):
                for s in cfg.sparsities:
                    jobs.append(
                        Job(m, seed, spec, (Unit(unit_run_id(cfg, seed, m, spec, s), m, s),))
                    )
    return jobs


def _pending(cfg: SweepConfig, out: Path, jobs: list[Job], done: set[str]) -> list[Job]:
    """Jobs with units left. A dense job also runs when its cache is gone but another job needs it."""
    needs_dense = {
        j.seed for j in jobs if j.kind != "dense" and any(u.run_id not in done for u in j.units)
    }
    return [
        j
        for j in jobs
        if any(u.run_id not in done for u in j.units)
        or (
            j.kind == "dense"
            and j.seed in needs_dense
            and not cache_path(cfg, out, j.seed).exists()
        )
    ]


_QUEUE = None  # a worker's channel to the parent's progress bar


def _worker_init(q, threads: int, datasets: dict) -> None:
    global _QUEUE
    import torch

    from saliency.sweep import jobs

    _QUEUE = q
    jobs._DATA.update(datasets)  # loaded once by the parent: no re-parsing in every worker
    torch.set_num_threads(threads)  # a worker process of our own: share the cores
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    parent = mp.parent_process()
    if parent is not None:  # exit when the parent dies (the OOM killer takes only the parent)
        threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent) -> None:
    parent.join()
    os._exit(1)


def _notify(event) -> None:
    if _QUEUE is not None:
        kind, value = event
        _QUEUE.put((kind, 1 if kind == "done" else value))


def _worker_job(cfg: SweepConfig, job: Job, out: str, done: frozenset[str]) -> int:
    return run_job(cfg, job, out, done, notify=_notify)


def _failure(job: Job, err: BaseException) -> dict[str, Any]:
    return {
        "kind": job.kind,
        "seed": job.seed,
        "criterion": job.criterion.label if job.criterion else "dense",
        "error": f"{type(err).__name__}: {err}",
    }


def run_sweep(
    cfg: SweepConfig,
    out_root: str | os.PathLike = "results",
    *,
    workers: int = 1,
    executor: str = "local",
    progress: bool = False,
    on_error: str = "raise",
    cluster: str | None = None,
) -> SweepResult:
    """Run (or resume) a sweep into `out_root/<cfg.name>/`; returns counts, failures and notes.

    executor: "local" (this process, or a pool of `workers` spawned processes) or "submitit"
    (`cluster` as submitit's AutoExecutor: None picks Slurm when available, "local" runs locally).
    on_error: "raise" stops at the first failing job; "skip" records it in `failures` and goes on.
    progress: a tqdm bar with ETA on stderr, naming the step in progress and the training loss.
    Raises `SweepLocked` when another run works on the directory, `SweepInterrupted` on Ctrl-C.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip'; got {on_error!r}")
    if executor not in ("local", "submitit"):
        raise ValueError(f"executor must be 'local' or 'submitit'; got {executor!r}")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int; got {workers!r}")
    ranks = distributed.init_from_env()
    if ranks and (workers > 1 or executor != "local"):
        raise ValueError(
            "under torchrun every rank runs each unit in turn (scoring shared out among the "
            f"ranks): use workers=1 and executor='local'; got {workers=}, {executor=!r}"
        )
    _preflight(cfg)
    if ranks:
        _check_torchrun(cfg)
    out = Path(out_root) / cfg.name
    jobs = plan(cfg)
    all_units = {u.run_id for j in jobs for u in j.units}
    threads = _threads(workers, executor)
    # under torchrun all ranks must run the same jobs: rank 0's reading of the records decides
    records = distributed.broadcast_object(clean(iter_records(out)))
    done = {r["run_id"] for r in records if r.get("run_id") is not None}
    result = SweepResult(out, len(all_units), len(all_units & done))
    result.notes = _resume_notes(records, all_units, threads)
    pending = distributed.broadcast_object(_pending(cfg, out, jobs, done))
    if not pending:  # nothing to write: works in a read-only directory
        return result
    with _locked(out) if distributed.is_writer() else contextlib.nullcontext():
        _remove_stale_tmp(out)
        atomic_write(out / "config.json", lambda tmp: tmp.write_text(_config_json(cfg)))
        _execute(
            cfg,
            out,
            pending,
            frozenset(done),
            result,
            workers,
            threads,
            executor,
            progress,
            on_error,
            cluster,
        )
    return result


def _execute(
    cfg, out, pending, done, result, workers, threads, executor, progress, on_error, cluster
) -> None:
    start = time.perf_counter()
    bar = _bar(result.units - result.skipped, progress and distributed.is_writer())
    show = _show(bar)
    try:
        dense = [j for j in pending if j.kind == "dense"]
        rest = [j for j in pending if j.kind != "dense"]
        if executor == "submitit":
            for phase in (dense, rest):
                _run_submitit(cfg, out, phase, done, result, show, on_error, cluster)
        elif workers > 1 and len(pending) > 1:
            _run_pool(cfg, out, dense, rest, done, result, show, on_error, workers, threads)
        else:
            for job in dense + rest:
                try:
                    result.ran += run_job(cfg, job, out, done, notify=show)
                except Exception as err:
                    if on_error == "raise":
                        raise
                    log.exception("job failed: %s", job)
                    result.failures.append(_failure(job, err))
    except KeyboardInterrupt:
        result.ran = len({r["run_id"] for r in clean(iter_records(out))}) - result.skipped
        raise SweepInterrupted(result) from None
    finally:
        bar.close()
        result.seconds = time.perf_counter() - start


def _threads(workers: int, executor: str) -> int:
    """The torch threads each unit of this run computes with."""
    import torch

    if executor == "local" and workers > 1:
        return max(1, (os.cpu_count() or 1) // workers)
    return torch.get_num_threads()


def _resume_notes(records: list[dict], units: set[str], threads: int) -> list[str]:
    """What a resume finds: units of other configurations in the directory (by the settings
    that differ), and recorded units computed with another number of threads."""
    notes = []
    ours = [r for r in records if r.get("run_id") in units]
    others = [r for r in records if r.get("run_id") not in units]
    if ours:
        n = len({r["run_id"] for r in ours})
        notes.append(
            f"resuming: {n} of {len(units)} unit(s) of this configuration already recorded"
        )
    if others:
        n = len({r.get("run_id") for r in others})
        groups = config_groups(ours + others)
        differ = sorted({k.split("=")[0] for label, _ in groups for k in label.split(", ") if k})
        why = (
            f" (differing in {', '.join(differ)})"
            if differ
            else " (other criteria, sparsities, seeds or modes)"
        )
        notes.append(
            f"the directory also holds {n} unit(s) not in this run{why}; "
            "reports and figures show each configuration separately"
        )
    other_threads = {r.get("threads") for r in ours if r.get("threads") not in (None, threads)}
    if other_threads:
        n = len({r["run_id"] for r in ours if r.get("threads") in other_threads})
        notes.append(
            f"{n} recorded unit(s) ran with {', '.join(map(str, sorted(other_threads)))} torch "
            f"thread(s), this run with {threads}: their losses may differ in the last digits "
            "(each record says its `threads`)"
        )
    return notes


class _locked:
    """An exclusive, non-blocking `flock` on `<out>/.lock` for the duration of a run."""

    def __init__(self, out: Path):
        self.path = out / ".lock"

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.path, "a+")
        if fcntl is not None:
            try:
                fcntl.flock(self.f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.f.seek(0)
                holder = self.f.read().strip() or "another process"
                self.f.close()
                raise SweepLocked(
                    f"{self.path.parent} is in use by another saliency run ({holder}); wait for "
                    "it to finish, or use another --out"
                ) from None
        self.f.seek(0)
        self.f.truncate()
        self.f.write(f"pid {os.getpid()}")
        self.f.flush()
        return self

    def __exit__(self, *exc):
        self.f.close()  # releases the lock


def _remove_stale_tmp(out: Path) -> None:
    """Temporary files of writes that died (a killed run); none can be in progress under the lock."""
    if not distributed.is_writer():
        return
    for p in out.rglob("*.tmp"):
        if "submitit" not in p.parts:
            p.unlink(missing_ok=True)


def _check_torchrun(cfg: SweepConfig) -> None:
    """Under torchrun each rank scores whole batches of the scoring data; a criterion that reads
    fewer samples (or batches) than the scoring data holds would read a different subset than
    one process does: refused, so records never silently depend on the number of ranks."""
    from saliency.sweep.config import ConfigError
    from saliency.sweep.jobs import build_criterion

    cap = cfg.scoring["n_samples"]
    for spec in cfg.criteria:
        crit = build_criterion(spec, cfg.seeds[0], cfg.granularity)
        n, nb = getattr(crit, "n_samples", None), getattr(crit, "n_batches", None)
        if nb is not None or (n is not None and (cap is None or n < cap)):
            raise ConfigError(
                f"sweep {cfg.name!r} under torchrun: criterion {spec.label!r} reads "
                f"n_samples={n}, n_batches={nb} of the {cap or 'all'} scoring samples, and these "
                "limits apply per rank. Set its n_samples to None (or >= [scoring] n_samples) and "
                "n_batches to None, and choose the amount with [scoring] n_samples"
            )


def _preflight(cfg: SweepConfig) -> None:
    """Everything that can fail without training fails now: the data loads, the model builds,
    the device exists, the targets resolve (and their channel groups, with [compact] measure),
    and allocation accepts the scope, granularity and allocate options at every sparsity."""
    import torch

    from saliency.allocate import allocate
    from saliency.sweep.config import ConfigError
    from saliency.sweep.jobs import allocate_kwargs, dataset, new_model, structured, targets
    from saliency.sweep.train import resolve_device

    try:
        dataset(cfg)
        resolve_device(cfg.device)
        model = new_model(cfg, cfg.seeds[0])
        params = targets(cfg, model)
        if structured(cfg):  # transformer units: found on the model, measurable
            _preflight_units(cfg, model)
            return
        allocate_kwargs(cfg, model)  # [compact] measure: the channel groups trace and resolve
        scores = {
            n: torch.rand(p.shape, generator=torch.Generator().manual_seed(0))
            for n, p in params.items()
        }
        for s in cfg.sparsities:
            allocate(scores, s, scope=cfg.scope, granularity=cfg.granularity, **cfg.allocate)
    except (TypeError, ValueError, ImportError) as err:
        raise ConfigError(f"sweep {cfg.name!r}: {err}") from err


def _preflight_units(cfg: SweepConfig, model) -> None:
    """The model's heads, neurons and blocks are found on a calibration batch; with [compact]
    measure the model is a causal LM of a task "lm" dataset whose context holds the prompt and
    the generated tokens, and the data holds the prompt. Raises ValueError naming what fails."""
    import saliency
    from saliency.model_io import is_causal_lm
    from saliency.sweep.jobs import calibration_example, dataset
    from saliency.sweep.units import prompt_tokens

    structure = saliency.find_structure(model, calibration_example(cfg, cfg.seeds[0]))
    if not structure.groups:
        raise ValueError(f"granularity {cfg.granularity!r}: no heads or MLP neurons found in "
                         f"{cfg.model!r}")  # fmt: skip
    c = cfg.compact
    if not c["measure"]:
        return
    if not is_causal_lm(model) or dataset(cfg).task != "lm":
        raise ValueError(f"[compact] measure at granularity {cfg.granularity!r} times prefill and "
                         f"decoding: it needs a causal LM and a task 'lm' dataset; got "
                         f"{type(model).__name__} on task {dataset(cfg).task!r}")  # fmt: skip
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if context is not None and c["prefill_tokens"] + c["decode_tokens"] > context:
        raise ValueError(f"compact.prefill_tokens + compact.decode_tokens = "
                         f"{c['prefill_tokens'] + c['decode_tokens']} exceeds the context of "
                         f"{cfg.model!r} ({context} positions)")  # fmt: skip
    prompt_tokens(cfg, c["prefill_tokens"])


def _config_json(cfg: SweepConfig) -> str:
    from saliency.sweep.config import canonical_json

    return canonical_json(cfg.as_dict()) + "\n"


def _bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="unit", disable=not enabled, dynamic_ncols=True, smoothing=0.1)


def _show(bar) -> Callable:
    """The progress events of `run_job` on the bar: the step in progress as its description,
    the last epoch's mean training loss as its postfix."""

    def show(event) -> None:
        kind, value = event
        if kind == "done":
            bar.update(1 if isinstance(value, Unit) else value)
        elif kind == "status":
            bar.set_description_str(value, refresh=False)
        elif kind == "loss":
            bar.set_postfix_str(f"train loss {value:.4g}", refresh=False)

    return show


def _run_pool(cfg, out, dense, rest, done, result, show, on_error, workers, threads) -> None:
    """One pool of spawned workers; the other jobs of a seed start when its dense job ends.
    On any exception (Ctrl-C included) the workers are terminated at once, not awaited."""
    from saliency.sweep.jobs import _DATA as jobs_data

    ctx = mp.get_context("spawn")  # fork after torch has started threads can deadlock
    q = ctx.Queue()
    rest = sorted(rest, key=_heavy_first)  # long jobs first: no worker idles at the tail
    waiting = {seed: [j for j in rest if j.seed == seed] for seed in {j.seed for j in dense}}
    ready = [j for j in rest if j.seed not in waiting]
    pool = ProcessPoolExecutor(
        min(workers, len(dense) + len(rest)),
        mp_context=ctx,
        initializer=_worker_init,
        initargs=(q, threads, dict(jobs_data)),
    )
    try:
        futures = {pool.submit(_worker_job, cfg, j, str(out), done): j for j in dense + ready}
        remaining = set(futures)
        while remaining:
            finished, remaining = wait(remaining, timeout=0.2, return_when=FIRST_COMPLETED)
            _drain(q, show)
            for f in finished:
                job = futures[f]
                try:
                    result.ran += f.result()
                except Exception as err:
                    if on_error == "raise":
                        raise
                    result.failures.append(_failure(job, err))
                if job.kind == "dense":  # a failed dense job still lets its jobs report
                    for j in waiting.pop(job.seed, []):
                        nf = pool.submit(_worker_job, cfg, j, str(out), done)
                        futures[nf] = j
                        remaining.add(nf)
    except BaseException:
        _terminate(pool)
        raise
    pool.shutdown(wait=True)
    _drain(q, show)


def _terminate(pool: ProcessPoolExecutor) -> None:
    """Stop a pool's workers now (a unit in progress is lost, never half-counted: see records)."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for p in procs:
        if p.is_alive():
            p.terminate()
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        p.join(timeout=5)


def _heavy_first(job: Job) -> int:
    """Criteria with a weight update (OBS) or several scoring rounds (SynFlow) run first."""
    from saliency.criteria import get_criterion

    if job.criterion is None:
        return 0
    crit = get_criterion(job.criterion.name, **job.criterion.hparams)
    return -int(
        callable(getattr(crit, "apply_update", None)) or callable(getattr(crit, "schedule", None))
    )


def _drain(q, show) -> None:
    while True:
        try:
            show(q.get_nowait())
        except queue_mod.Empty:
            return


def _run_submitit(cfg, out, jobs, done, result, show, on_error, cluster) -> None:
    try:
        import submitit
    except ImportError:
        raise ImportError(
            "executor='submitit' needs the submitit package: pip install saliency[cluster]"
        ) from None
    ex = submitit.AutoExecutor(folder=str(out / "submitit"), cluster=cluster)
    ex.update_parameters(timeout_min=60 * 24)
    poll = 0.25 if cluster in ("local", "debug") else 10.0  # seconds between status checks
    running = {ex.submit(run_job, cfg, j, str(out), done): j for j in jobs}
    for sub in submitit.helpers.as_completed(list(running), poll_frequency=poll):
        job = running[sub]
        try:
            n = sub.result()
            result.ran += n
            show(("done", n))
        except Exception as err:
            if on_error == "raise":
                raise
            result.failures.append(_failure(job, err))
