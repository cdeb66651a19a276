"""Result records: one JSON object per line in `records.jsonl`, appended and flushed one at a time.

A killed writer can leave at most one partial last line; `read_records` skips it (and logs it),
so nothing already written is ever lost and a half-written line never breaks reading.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: single-writer only
    fcntl = None

log = logging.getLogger(__name__)

RECORDS_FILE = "records.jsonl"


def records_path(path: str | os.PathLike) -> Path:
    """`path` itself if it is a file, else `path/records.jsonl`."""
    p = Path(path)
    return p if p.suffix == ".jsonl" else p / RECORDS_FILE


def append_records(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> None:
    """Append records durably: each is one complete line, written with a single call and fsynced.

    An exclusive `flock` on the file makes concurrent appends from several processes (sweep
    workers) safe: each call's lines land together, never interleaved.
    """
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


def iter_records(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    p = records_path(path)
    if not p.exists():
        return
    with open(p, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s:%d: skipping a partial or corrupt record", p, i)
                continue
            if isinstance(rec, dict):
                yield rec


# what makes two records the same observation; a rerun with a changed config (other training
# settings, other hyperparameters under the same label) writes new run ids for the same key
OBSERVATION = ("sweep", "model", "dataset", "scope", "granularity", "mode", "label", "seed",
               "sparsity_target", "phase", "split", "metric")  # fmt: skip


def _observation(r: dict[str, Any]) -> tuple:
    label = r.get("label") or r.get("criterion")
    return tuple(repr(label if k == "label" else r.get(k)) for k in OBSERVATION)


def latest_observations(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per observation (`OBSERVATION` fields), only the records of its most recent run: results
    of an older config stay in the file but are not averaged in as if they were more seeds.
    Records without a run id are all kept."""
    newest: dict[tuple, tuple[float, Any]] = {}
    for r in records:
        if r.get("run_id") is None:
            continue
        key, t = _observation(r), float(r.get("time") or 0.0)
        if key not in newest or t >= newest[key][0]:
            newest[key] = (t, r["run_id"])
    keep = [
        r for r in records if r.get("run_id") is None or newest[_observation(r)][1] == r["run_id"]
    ]
    if len(keep) < len(records):
        log.warning(
            "%d record(s) superseded by newer runs of the same observation (the config changed "
            "between runs); read_records(..., latest=False) returns them too",
            len(records) - len(keep),
        )
    return keep


def read_records(*paths: str | os.PathLike, latest: bool = True) -> list[dict[str, Any]]:
    """All records from one or more results directories or `.jsonl` files; with `latest`, only the
    most recent run of each observation (see `latest_observations`)."""
    out: list[dict[str, Any]] = []
    for path in paths:
        if not records_path(path).exists():
            raise FileNotFoundError(
                f"no records at {records_path(path)} (expected a results "
                f"directory holding {RECORDS_FILE}, or a .jsonl file)"
            )
        out.extend(iter_records(path))
    return latest_observations(out) if latest else out


def save_scores(path: str | os.PathLike, group: str, label: str, scores: dict[str, Any]) -> Path:
    """Save one scoring pass as a plain {param name: float32 tensor} dict, atomically, to
    `path/scores/<group>/<label>.pt` (group is "<mode>-seed<seed>")."""
    import torch

    out = Path(path) / "scores" / group / f"{label}.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    torch.save({n: s.detach().float().cpu() for n, s in scores.items()}, tmp)
    os.replace(tmp, out)
    return out
