"""Sweep runner: config -> units -> jobs -> records, resumable, serial or in parallel.

A unit is (criterion, sparsity, seed, mode) with a run id hashed from its config. Units are
grouped into jobs so that expensive work is shared: the dense model of a seed is trained once
(and cached on disk), and in oneshot/finetune modes one scoring pass of a criterion serves every
sparsity. Jobs run in this process (`workers=1`), in a spawned process pool (`workers>1`), or as
submitit jobs (`executor="submitit"`); dense jobs first, then the pruning jobs. Workers append
their own records under a file lock; re-running skips every unit whose run id is recorded.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue as queue_mod
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saliency.sweep.config import SweepConfig
from saliency.sweep.jobs import Job, Unit, cache_path, run_job, unit_run_id
from saliency.sweep.records import iter_records, records_path

log = logging.getLogger(__name__)


@dataclass
class SweepResult:
    out: Path
    units: int
    skipped: int  # already recorded before this run
    ran: int = 0
    seconds: float = 0.0
    failures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def records_path(self) -> Path:
        return records_path(self.out)


def plan(cfg: SweepConfig) -> list[Job]:
    """Every job of the sweep: one dense job per seed, then the pruning jobs."""
    jobs = []
    for seed in cfg.seeds:
        jobs.append(
            Job(
                "dense",
                seed,
                None,
                (Unit(unit_run_id(cfg, seed, "dense", None, 0.0), "dense", 0.0),),
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


def done_run_ids(out: str | os.PathLike) -> set[str]:
    return {r["run_id"] for r in iter_records(out) if "run_id" in r}


def _pending(cfg: SweepConfig, out: Path, jobs: list[Job], done: set[str]) -> list[Job]:
    """Jobs with units left. A dense job also runs when its cache is gone but pruning needs it."""
    needs_dense = {
        j.seed
        for j in jobs
        if j.kind in ("oneshot", "gradual", "iterative")
        and any(u.run_id not in done for u in j.units)
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


def _notify(unit: Unit) -> None:
    if _QUEUE is not None:
        _QUEUE.put(1)


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
    """Run (or resume) a sweep into `out_root/<cfg.name>/`; returns counts and failures.

    executor: "local" (this process, or a pool of `workers` spawned processes) or "submitit"
    (`cluster` as submitit's AutoExecutor: None picks Slurm when available, "local" runs locally).
    on_error: "raise" stops at the first failing job; "skip" records it in `failures` and goes on.
    progress: a tqdm bar with ETA on stderr.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip'; got {on_error!r}")
    if executor not in ("local", "submitit"):
        raise ValueError(f"executor must be 'local' or 'submitit'; got {executor!r}")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int; got {workers!r}")
    _preflight(cfg)
    out = Path(out_root) / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    # the config of the latest run (each record carries its own config_hash); written atomically
    tmp = out / f"config.json.{os.getpid()}.tmp"
    tmp.write_text(_config_json(cfg))
    os.replace(tmp, out / "config.json")
    jobs = plan(cfg)
    done = done_run_ids(out)
    all_units = {u.run_id for j in jobs for u in j.units}
    result = SweepResult(out, len(all_units), len(all_units & done))
    pending = _pending(cfg, out, jobs, done)
    start = time.perf_counter()
    bar = _bar(result.units - result.skipped, progress)
    try:
        frozen = frozenset(done)
        dense = [j for j in pending if j.kind == "dense"]
        rest = [j for j in pending if j.kind != "dense"]
        if executor == "submitit":
            for phase in (dense, rest):
                _run_submitit(cfg, out, phase, frozen, result, bar, on_error, cluster)
        elif workers > 1 and len(pending) > 1:
            _run_pool(cfg, out, dense, rest, frozen, result, bar, on_error, workers)
        else:
            for job in dense + rest:
                try:
                    result.ran += run_job(cfg, job, out, frozen, notify=lambda u: bar.update(1))
                except Exception as err:
                    if on_error == "raise":
                        raise
                    log.exception("job failed: %s", job)
                    result.failures.append(_failure(job, err))
    finally:
        bar.close()
        result.seconds = time.perf_counter() - start
    return result


def _preflight(cfg: SweepConfig) -> None:
    """Everything that can fail without training fails now: the data loads, the model builds,
    the device exists, the targets resolve, and allocation accepts the scope, granularity and
    allocate options at every sparsity of the sweep."""
    import torch

    from saliency.allocate import allocate
    from saliency.sweep.config import ConfigError
    from saliency.sweep.jobs import dataset, new_model, targets
    from saliency.sweep.train import resolve_device

    try:
        dataset(cfg)
        resolve_device(cfg.device)
        params = targets(cfg, new_model(cfg, cfg.seeds[0]))
        scores = {
            n: torch.rand(p.shape, generator=torch.Generator().manual_seed(0))
            for n, p in params.items()
        }
        for s in cfg.sparsities:
            allocate(scores, s, scope=cfg.scope, granularity=cfg.granularity, **cfg.allocate)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"sweep {cfg.name!r}: {err}") from err


def _config_json(cfg: SweepConfig) -> str:
    from saliency.sweep.config import canonical_json

    return canonical_json(cfg.as_dict()) + "\n"


def _bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="unit", disable=not enabled, dynamic_ncols=True, smoothing=0.1)


def _run_pool(cfg, out, dense, rest, done, result, bar, on_error, workers) -> None:
    """One pool of spawned workers; the pruning jobs of a seed start when its dense job ends."""
    from saliency.sweep.jobs import _DATA as jobs_data

    ctx = mp.get_context("spawn")  # fork after torch has started threads can deadlock
    q = ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // workers)
    rest = sorted(rest, key=_heavy_first)  # long jobs first: no worker idles at the tail
    waiting = {seed: [j for j in rest if j.seed == seed] for seed in {j.seed for j in dense}}
    ready = [j for j in rest if j.seed not in waiting]
    with ProcessPoolExecutor(
        min(workers, len(dense) + len(rest)),
        mp_context=ctx,
        initializer=_worker_init,
        initargs=(q, threads, dict(jobs_data)),
    ) as pool:
        futures = {pool.submit(_worker_job, cfg, j, str(out), done): j for j in dense + ready}
        remaining = set(futures)
        try:
            while remaining:
                finished, remaining = wait(remaining, timeout=0.2, return_when=FIRST_COMPLETED)
                _drain(q, bar)
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
        finally:
            for f in remaining:
                f.cancel()
    _drain(q, bar)


def _heavy_first(job: Job) -> int:
    """Criteria with a weight update (OBS) or several scoring rounds (SynFlow) run first."""
    from saliency.criteria import get_criterion

    crit = get_criterion(job.criterion.name, **job.criterion.hparams)
    return -int(
        callable(getattr(crit, "apply_update", None)) or callable(getattr(crit, "schedule", None))
    )


def _drain(q, bar) -> None:
    while True:
        try:
            bar.update(q.get_nowait())
        except queue_mod.Empty:
            return


def _run_submitit(cfg, out, jobs, done, result, bar, on_error, cluster) -> None:
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
            bar.update(n)
        except Exception as err:
            if on_error == "raise":
                raise
            result.failures.append(_failure(job, err))
