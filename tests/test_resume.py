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


def _tiny_cfg(**changes):
    from saliency.sweep.config import parse_config, tomllib

    raw = tomllib.loads(sweep_fixtures.TINY)
    raw.update(seeds=[0], criteria=["magnitude"], modes=["oneshot"], **changes)
    return parse_config(raw)


def test_a_second_run_on_the_directory_is_refused(tmp_path):
    from saliency.sweep.runner import SweepLocked, _locked, run_sweep

    cfg = _tiny_cfg()
    with _locked(tmp_path / "tiny"), pytest.raises(SweepLocked, match="in use by another"):
        run_sweep(cfg, tmp_path)
    assert run_sweep(cfg, tmp_path).ran == 3  # the lock goes with its holder


def test_finished_sweep_writes_nothing_and_stale_tmp_files_go(tmp_path):
    from saliency.sweep.runner import run_sweep

    cfg = _tiny_cfg()
    out = run_sweep(cfg, tmp_path).out
    (out / "config.json").unlink()
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = run_sweep(cfg, tmp_path)  # also what works in a read-only directory
    assert again.ran == 0 and {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    # temporary files of writes that died stay only until the next run that writes
    stale = [out / "config.json.999.tmp", out / "cache" / "dense.pt.999.tmp"]
    for p in stale:
        p.write_text("partial")
    run_sweep(_tiny_cfg(sparsities=[0.5, 0.9, 0.95]), tmp_path)
    assert not any(p.exists() for p in stale) and (out / "config.json").exists()


def test_a_failed_atomic_write_leaves_no_tmp(tmp_path):
    from saliency.sweep.records import atomic_write

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "config.json", fail)
    assert list(tmp_path.iterdir()) == []


def test_resume_with_another_thread_count_says_so(tmp_path):
    import torch

    from saliency.sweep.runner import run_sweep

    run_sweep(_tiny_cfg(), tmp_path)
    assert {r["threads"] for r in read_records(tmp_path / "tiny")} == {1}
    torch.set_num_threads(2)  # restored by the one_thread fixture
    res = run_sweep(_tiny_cfg(sparsities=[0.5, 0.9, 0.95]), tmp_path)
    assert any("ran with 1 torch thread(s), this run with 2" in n for n in res.notes), res.notes
    assert any("resuming: 3 of 4 unit(s)" in n for n in res.notes)


def _start_workers(tmp_path):
    """A 2-worker sweep in its own session (a terminal's process group), once records appear."""
    config = sweep_fixtures.write_config(tmp_path)
    out = tmp_path / "results"
    # long enough fine-tunes that the sweep is still running when the test signals it (at 30
    # epochs a quiet machine finished all 68 units in 5 s, before the signal)
    cmd = [*_cmd(config, out)[:-2], "--workers", "2", "--set", "finetune.epochs=300"]
    proc = subprocess.Popen(
        cmd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # as a terminal starts it: Ctrl-C at its default, whatever this process inherited (a
        # test run started with `&` from a script ignores SIGINT, and so would its children)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    records = out / "tiny" / "records.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if records.exists() and records.read_bytes().count(b"\n") >= 8:
            return proc, records
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no records appeared: {proc.communicate()}")


def _group_alive(session: int) -> bool:
    """Whether a process of the session still runs (a zombie awaiting its reaper does not)."""
    ps = subprocess.run(["ps", "-o", "stat=", "-g", str(session)], capture_output=True, text=True)
    return any(not st.startswith("Z") for st in ps.stdout.split())


def test_ctrl_c_stops_workers_promptly_with_one_line_and_exit_130(tmp_path):
    proc, records = _start_workers(tmp_path)
    start = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends: the whole group
    out, err = proc.communicate(timeout=30)
    assert time.monotonic() - start < 15
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    (line,) = [ln for ln in err.splitlines() if "interrupted" in ln]
    assert "are recorded in" in line and "run the same command again" in line
    deadline = time.monotonic() + 5
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _group_alive(proc.pid)  # no worker left behind, writing
    size = records.stat().st_size
    time.sleep(1)
    assert records.stat().st_size == size


def test_workers_exit_when_the_parent_is_killed(tmp_path):
    proc, records = _start_workers(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)  # the OOM killer takes the parent only
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 20
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _group_alive(proc.pid), "workers outlived their parent"
