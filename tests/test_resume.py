"""Resume: a sweep killed with SIGKILL mid-run loses nothing written, and re-running it
completes the rest without duplicating a record; a torn last line never breaks reading."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import sweep_fixtures  # noqa: E402
from sweep_fixtures import clean_zoo  # noqa: E402, F401  (autouse)

from saliency.sweep.records import append_records, read_records  # noqa: E402

HERE = Path(__file__).parent


@pytest.fixture(autouse=True)
def one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on shared cores
    yield
    torch.set_num_threads(n)


# enough units (2 seeds x 2 criteria x 8 sparsities x 2 modes) that the kill lands mid-run
SLOW = {"sparsities": "[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]", "finetune.epochs": "3"}


def _cmd(config: Path, out: Path) -> list[str]:
    sets = [a for k, v in SLOW.items() for a in ("--set", f"{k}={v}")]
    return [
        sys.executable,
        "-m",
        "saliency",
        "run",
        str(config),
        "--out",
        str(out),
        "--threads",
        "1",
        *sets,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _check_complete(records: list[dict]) -> None:
    per_unit = Counter(r["run_id"] for r in records)
    keys = Counter((r["run_id"], r["phase"], r["metric"]) for r in records)
    assert max(keys.values()) == 1, "a record was written twice"
    # dense: accuracy, loss, scoring_loss; oneshot: the same, pruned; finetune: + final acc, loss;
    # the dense model fine-tuned as the pruned ones (the fair baseline): final acc, loss
    assert sorted(Counter(per_unit.values()).items()) == [
        (2, 2),
        (3, 2 + 2 * 2 * 8),
        (5, 2 * 2 * 8),
    ]


def test_sigkill_mid_run_then_resume(tmp_path):
    config = sweep_fixtures.write_config(tmp_path)
    out = tmp_path / "results"
    records_file = out / "tiny" / "records.jsonl"
    proc = subprocess.Popen(
        _cmd(config, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            # kill once some pruning units are written (past the dense models)
            if records_file.exists() and records_file.read_bytes().count(b"\n") >= 8:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the sweep finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    before = read_records(out / "tiny")
    n_units = 2 + 2 + 2 * 2 * 8 * 2  # dense, dense fine-tuned, pruned
    assert 0 < len({r["run_id"] for r in before}) < n_units
    first = {(r["run_id"], r["phase"], r["metric"]): r["value"] for r in before}
    # resume (in this process: the same code path, without a second interpreter start-up)
    from saliency.sweep.config import load_config
    from saliency.sweep.runner import run_sweep

    cfg = load_config(config, [f"{k}={v}" for k, v in SLOW.items()])
    res = run_sweep(cfg, out)
    assert res.skipped == len({r["run_id"] for r in before})
    assert res.ran == n_units - res.skipped and not res.failures
    after = read_records(out / "tiny")
    _check_complete(after)
    kept = {(r["run_id"], r["phase"], r["metric"]): r["value"] for r in after}
    assert all(kept[k] == v for k, v in first.items())  # what was written before stays
    # a third run has nothing to do
    again = run_sweep(cfg, out)
    assert (again.ran, again.skipped) == (0, n_units)
    assert len(read_records(out / "tiny")) == len(after)


def test_torn_last_line_is_skipped_and_the_unit_rerun(tmp_path, caplog):
    from saliency.sweep.config import parse_config, tomllib
    from saliency.sweep.runner import run_sweep

    raw = tomllib.loads(sweep_fixtures.TINY)
    raw.update(seeds=[0], criteria=["magnitude"], modes=["oneshot"])
    cfg = parse_config(raw)
    res = run_sweep(cfg, tmp_path)
    records = read_records(res.out)
    last_unit = records[-1]["run_id"]
    # simulate a kill during the write of the last unit: drop its lines, leave half a line
    kept = [r for r in records if r["run_id"] != last_unit]
    path = res.out / "records.jsonl"
    path.unlink()
    append_records(res.out, kept)
    with open(path, "ab") as f:
        f.write(b'{"run_id": "' + last_unit.encode() + b'", "phase": "pru')
    assert len(read_records(res.out)) == len(kept)  # the torn line is skipped, with a warning
    assert "partial" in caplog.text
    again = run_sweep(cfg, tmp_path)
    assert again.ran == 1
    final = read_records(res.out)
    assert len(final) == len(records)
    assert Counter((r["run_id"], r["phase"], r["metric"]) for r in final).most_common(1)[0][1] == 1


@pytest.mark.parametrize("missing", ["cache"])
def test_resume_retrains_a_deleted_dense_cache(tmp_path, missing):
    from saliency.sweep.config import parse_config, tomllib
    from saliency.sweep.runner import run_sweep

    raw = tomllib.loads(sweep_fixtures.TINY)
    raw.update(seeds=[0], criteria=["magnitude"], modes=["oneshot"], sparsities=[0.5])
    cfg = parse_config(raw)
    res = run_sweep(cfg, tmp_path)
    for p in (res.out / missing).iterdir():
        p.unlink()
    raw["sparsities"] = [0.5, 0.8]  # a new unit needs the dense model again
    res2 = run_sweep(parse_config(raw), tmp_path)
    assert res2.ran == 1 and len(list((res.out / "cache").iterdir())) == 1
    dense = [r for r in read_records(res.out) if r["criterion"] == "dense"]
    assert len(dense) == 3  # the dense records were not written twice
