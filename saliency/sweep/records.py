"""Result records: one JSON object per line in `records.jsonl`; one locked, fsynced append per unit.

Reading is defensive, because a records file outlives crashes, full disks and concurrent runs:
- a line that is not UTF-8, not JSON, or not a usable record (no metric, a non-numeric value)
  is skipped with a warning, as is the partial last line a killed writer leaves;
- exact duplicates (the same run id, phase, metric and split written twice: a unit rerun after
  an interrupted write, or two runs racing on one directory) count once, the last one written;
- a unit whose records did not all reach the file (each record says how many its unit has,
  `unit_records`) is left out, and `saliency run` runs it again.
Every record carries `settings`: what determined its result besides its place in the sweep
(criterion, sparsity, seed, mode). `config_groups` splits records whose settings differ, so a
report or figure never averages or lines up results of different configurations unlabelled.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from saliency import distributed

try:
    import fcntl
except ImportError:  # Windows: single-writer only
    fcntl = None

log = logging.getLogger(__name__)

RECORDS_FILE = "records.jsonl"
# a record is usable when these fields hold values of these kinds
REQUIRED: dict[str, Callable[[Any], bool]] = {
    "metric": lambda v: isinstance(v, str),
    "phase": lambda v: isinstance(v, str),
    "mode": lambda v: isinstance(v, str),
    "value": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "sparsity_target": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
}


def records_path(path: str | os.PathLike) -> Path:
    """`path` itself if it is a file, else `path/records.jsonl`."""
    p = Path(path)
    return p if p.suffix == ".jsonl" else p / RECORDS_FILE


def append_records(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> None:
    """Append records durably: all of them in one write under an exclusive `flock`, fsynced.

    Concurrent appends from several processes (sweep workers) never interleave. A write cut
    short (kill, full disk) leaves a unit with some of its lines: readers leave such a unit out
    (see `unit_records`) and a resumed sweep runs it again. Under torchrun only rank 0 writes
    (`saliency.distributed.is_writer`).
    """
    if not distributed.is_writer():
        return
    p = records_path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(r, sort_keys=True, allow_nan=True) + "\n" for r in records)
    if not lines:
        return
    with open(p, "a+b") as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # released when the file is closed
        # a previous writer killed mid-line left no newline: start on a fresh line
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write(lines.encode())
        f.flush()
        os.fsync(f.fileno())


def _usable(rec: Any) -> str | None:
    """Why `rec` is not a usable record, or None."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    for k, ok in REQUIRED.items():
        if not ok(rec.get(k)):
            return f"field {k!r} is {rec.get(k)!r}"
    return None


def iter_records(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """The usable records of one file, in file order; anything else is skipped with a warning."""
    p = records_path(path)
    if not p.exists():
        return
    with open(p, "rb") as f:
        for i, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                log.warning("%s:%d: skipping a line that is not UTF-8", p, i)
                continue
            except json.JSONDecodeError:
                log.warning("%s:%d: skipping a partial or corrupt record", p, i)
                continue
            why = _usable(rec)
            if why is not None:
                log.warning("%s:%d: skipping an unusable record (%s)", p, i, why)
                continue
            yield rec


def _unit(r: dict[str, Any]) -> tuple:
    return (r.get("sweep"), r.get("run_id"))


def _key(r: dict[str, Any]) -> tuple:
    return (*_unit(r), r.get("phase"), r.get("metric"), r.get("split"))


def clean(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop exact duplicates (keeping the last written) and the records of incomplete units."""
    records = list(records)
    last = {_key(r): i for i, r in enumerate(records) if r.get("run_id") is not None}
    unique = [r for i, r in enumerate(records) if r.get("run_id") is None or last[_key(r)] == i]
    if len(unique) < len(records):
        log.warning(
            "%d duplicated record(s) counted once (a unit written twice: a rerun after an "
            "interrupted write, or two runs on one directory)",
            len(records) - len(unique),
        )
    have = Counter(_unit(r) for r in unique)
    partial = {
        _unit(r)
        for r in unique
        if isinstance(r.get("unit_records"), int) and have[_unit(r)] < r["unit_records"]
    }
    if partial:
        log.warning(
            "%d unit(s) with only part of their records (a write cut short) left out; "
            "`saliency run` runs them again",
            len(partial),
        )
    return [r for r in unique if _unit(r) not in partial]


def read_records(*paths: str | os.PathLike) -> list[dict[str, Any]]:
    """The usable records of complete units from results directories or `.jsonl` files, each
    observation once (see the module docstring). Records of different configurations are all
    returned: split them with `config_groups` before averaging."""
    out: list[dict[str, Any]] = []
    for path in paths:
        if not records_path(path).exists():
            raise FileNotFoundError(
                f"no records at {records_path(path)} (expected a results "
                f"directory holding {RECORDS_FILE}, or a .jsonl file)"
            )
        out.extend(iter_records(path))
    return clean(out)


def done_run_ids(path: str | os.PathLike) -> set[str]:
    """Run ids of the units whose records are all in the file."""
    return {r["run_id"] for r in clean(iter_records(path)) if r.get("run_id") is not None}


# ---- configurations --------------------------------------------------------------------------


def flat_settings(r: dict[str, Any]) -> dict[str, str]:
    """A record's settings as {dotted key: JSON value}, with its criterion's hyperparameters
    under `<label>.<name>` (a `seed` hyperparameter that follows the sweep seed left out)."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            out[prefix] = json.dumps(node, sort_keys=True, default=str)

    walk(r.get("settings") or {}, "")
    label = r.get("label") or r.get("criterion")
    for k, v in (r.get("hparams") or {}).items():
        if not (k == "seed" and v == r.get("seed")):
            out[f"{label}.{k}"] = json.dumps(v, sort_keys=True, default=str)
    out.pop("", None)
    return out


_ANY = object()  # a record without the key fits every value of it


def config_groups(records: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """[(label, records)] per configuration, newest first; one group with label "" when every
    record was made with the same settings.

    A label names only the settings that differ ("train.epochs=2"). A record without a setting
    (a one-shot record when `finetune.epochs` differs, a dense record when `scoring` differs)
    belongs to every group it agrees with: a group is one complete configuration.
    """
    flats = [flat_settings(r) for r in records]
    values: dict[str, set[str]] = defaultdict(set)
    for f in flats:
        for k, v in f.items():
            values[k].add(v)
    varying = sorted(k for k, vs in values.items() if len(vs) > 1)
    if not varying:
        return [("", list(records))]
    rows = [tuple(f.get(k, _ANY) for k in varying) for f in flats]

    def fits(a: tuple, b: tuple) -> bool:
        return all(x is _ANY or y is _ANY or x == y for x, y in zip(a, b, strict=True))

    def covers(big: tuple, small: tuple) -> bool:
        return big != small and all(s is _ANY or s == b for b, s in zip(big, small, strict=True))

    distinct = list(dict.fromkeys(rows))
    heads = [t for t in distinct if not any(covers(u, t) for u in distinct)]
    groups = []
    for h in heads:
        members = [r for r, t in zip(records, rows, strict=True) if fits(h, t)]
        label = ", ".join(f"{k}={v}" for k, v in zip(varying, h, strict=True) if v is not _ANY)
        newest = max((float(r.get("time") or 0.0) for r in members), default=0.0)
        groups.append((newest, label, members))
    groups.sort(key=lambda g: -g[0])
    return [(label, members) for _, label, members in groups]


def config_slug(label: str) -> str:
    """A short file-name suffix for a configuration label ('' for the only one)."""
    import hashlib

    return "_cfg" + hashlib.sha256(label.encode()).hexdigest()[:6] if label else ""


# ---- files written atomically -----------------------------------------------------------------


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary file next to `path`, then rename it over `path`; the
    temporary file is removed if anything fails, so no `*.tmp` is left behind. Under torchrun
    only rank 0 writes (`saliency.distributed.is_writer`)."""
    out = Path(path)
    if not distributed.is_writer():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def save_scores(path: str | os.PathLike, group: str, label: str, scores: dict[str, Any]) -> Path:
    """Save one scoring pass as a plain {param name: float32 tensor} dict, atomically, to
    `path/scores/<group>/<label>.pt` (group is "<mode>-seed<seed>")."""
    import torch

    state = {n: s.detach().float().cpu() for n, s in scores.items()}
    return atomic_write(
        Path(path) / "scores" / group / f"{label}.pt", lambda tmp: torch.save(state, tmp)
    )
