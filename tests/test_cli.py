"""The `saliency` command: run, demo (shrunk to the tiny model), criteria, report, figs."""

from __future__ import annotations

import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import sweep_fixtures  # noqa: E402
from sweep_fixtures import clean_zoo  # noqa: E402, F401  (autouse)

from saliency.cli import main, probe_criteria  # noqa: E402
from saliency.sweep.config import tomllib  # noqa: E402
from saliency.sweep.records import read_records  # noqa: E402

TINY_DEMO = [
    "seeds=[0]",
    'imports=["sweep_plugin"]',
    "model=tiny_mlp",
    "dataset=tiny_blobs",
    "sparsities=[0.5, 0.9]",
    "train.epochs=1",
    "scoring.n_samples=32",
]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)  # the CLI sets the thread count of its process: restore it


def sets(items):
    return [a for s in items for a in ("--set", s)]


def test_run_report_and_bad_config(tmp_path, capsys):
    cfg = sweep_fixtures.write_config(tmp_path)
    assert (
        main(
            [
                "run",
                str(cfg),
                "--out",
                str(tmp_path / "r"),
                "--threads",
                "1",
                *sets(["seeds=[0]", 'modes=["oneshot"]']),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "### oneshot: accuracy (%)" in out and "| magnitude |" in out
    assert "5 unit(s) run, 0 already done, of 5" in out
    assert f"records: {tmp_path / 'r' / 'tiny' / 'records.jsonl'}" in out
    assert main(["report", str(tmp_path / "r" / "tiny")]) == 0
    md = capsys.readouterr().out
    assert "| criterion | 0.5 | 0.9 |" in md and "### dense: loss" in md
    assert main(["report", str(tmp_path / "r" / "tiny"), "--metric", "loss"]) == 0
    assert "accuracy" not in capsys.readouterr().out
    # a bad key fails before any work, naming the key; nothing is written
    assert main(["run", str(cfg), "--out", str(tmp_path / "bad"), *sets(["train.epoch=3"])]) == 2
    err = capsys.readouterr().err
    assert "'train.epoch'" in err and "accepted" in err and "epochs" in err
    bad = cfg.read_text().replace('criteria = ["magnitude", "random"]', 'criteria = ["nope"]')
    (tmp_path / "bad.toml").write_text(bad)
    assert main(["run", str(tmp_path / "bad.toml"), "--out", str(tmp_path / "bad")]) == 2
    assert "unknown criterion 'nope'" in capsys.readouterr().err
    assert (
        main(["run", str(cfg), "--out", str(tmp_path / "bad"), *sets(["sparsities=[0.5, 1.0]"])])
        == 2
    )
    assert "sparsities: 1.0 is outside [0, 1)" in capsys.readouterr().err
    assert (
        main(["run", str(cfg), "--out", str(tmp_path / "bad"), *sets(['data_root="/no/such/dir"'])])
        == 2
    )
    assert "data_root '/no/such/dir' is not a directory" in capsys.readouterr().err
    # a file-based dataset without data_root: a message, not a traceback
    assert main(["run", str(cfg), "--out", str(tmp_path / "bad"), *sets(["dataset=mnist"])]) == 2
    assert "needs data_root=" in capsys.readouterr().err
    assert (
        main(["run", str(cfg), "--out", str(tmp_path / "bad"), *sets(['train.optimizer="rms"'])])
        == 2
    )
    assert "train.optimizer must be 'sgd', 'adam' or 'adamw'; got 'rms'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main(["report", str(tmp_path / "nothing")]) == 2


def test_criteria_lists_names_with_descriptions(capsys):
    assert main(["criteria"]) == 0
    lines = capsys.readouterr().out.splitlines()
    magnitude = [line for line in lines if line.startswith("magnitude ")]
    assert magnitude and "Han et al" in magnitude[0]
    assert any(line.startswith("random ") for line in lines)


def test_python_dash_m_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "saliency", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "demo" in out.stdout and "report" in out.stdout


def test_demo_config_is_package_data_and_valid():
    text = resources.files("saliency.sweep").joinpath("demo.toml").read_text()
    raw = tomllib.loads(text)
    assert raw["model"] == "lenet300" and raw["dataset"] == "mnist5k"
    assert raw["modes"] == ["oneshot", "finetune"] and raw["save_scores"] is True
    assert raw["sparsities"][0] == 0.5 and raw["sparsities"][-1] == 0.98 and len(raw["seeds"]) == 3


def test_probe_skips_exact_hessians_on_big_models_and_failing_criteria():
    from dataclasses import dataclass
    from typing import ClassVar

    from saliency.criteria import _REGISTRY, Scores, register_criterion

    @dataclass(frozen=True)
    class ExactThing:
        """Test: an exact-Hessian criterion."""

        name: ClassVar[str] = "t_exact"
        hessian: str = "exact"

        def score(self, model, params, data, loss_fn):
            return Scores({n: p.detach().abs() for n, p in params.items()})

    @dataclass(frozen=True)
    class NeedsPackage:
        """Test: a criterion whose optional dependency is missing."""

        name: ClassVar[str] = "t_needs"

        def score(self, model, params, data, loss_fn):
            raise ImportError("no module named 'fancy'")

    register_criterion(ExactThing, overwrite=True)
    register_criterion(NeedsPackage, overwrite=True)
    try:
        raw = tomllib.loads(sweep_fixtures.TINY)
        raw["model_kwargs"] = {"hidden": 4000}  # 6*4000 + 4000*3 = 36,000 > the exact limit
        skipped = probe_criteria(raw)
        assert (
            "exact Hessian" in skipped["t_exact"]
            and "needs an optional package" in skipped["t_needs"]
        )
        assert "magnitude" not in skipped
        raw["model_kwargs"] = {}
        assert "t_exact" not in probe_criteria(raw)
    finally:
        _REGISTRY.pop("t_exact", None)
        _REGISTRY.pop("t_needs", None)


def test_demo_shrunk_to_the_tiny_model_writes_records_and_figure(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--workers", "1", *sets(TINY_DEMO)]) == 0
    out = capsys.readouterr().out
    assert "saliency demo: tiny_mlp on tiny_blobs" in out
    for suffix in (".png", ".pdf"):
        path = tmp_path / "demo" / "figures" / f"accuracy_vs_sparsity{suffix}"
        assert f"figure: {path}" in out and path.stat().st_size > 0
    records = read_records(tmp_path / "demo")
    import saliency

    assert {r["criterion"] for r in records} == {
        "dense",
        *saliency.available_criteria("element"),
    } - set(
        line.split()[1].rstrip(":")
        for line in out.splitlines()
        if line.strip().startswith("skipped")
    ) - {"taylor", "obs_channel", "flap", "structured_obs"}  # left out by the demo config
    assert {r["mode"] for r in records} == {"dense", "oneshot", "finetune"}
    assert "demo finished in" in out
    assert list((tmp_path / "demo" / "scores" / "oneshot-seed0").glob("*.pt"))
    # figs: every figure the records support
    figs = ["figs", str(tmp_path / "demo"), "--out", str(tmp_path / "figs")]
    assert main([*figs, "--only", "table"]) == 0
    assert list((tmp_path / "figs").glob("table_*.md"))
    assert main([*figs, "--only", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_every_failure_is_one_line_and_nonzero(tmp_path, capsys):
    from test_plotting import write_results

    d = write_results(tmp_path, scores=False)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["figs", str(d), "--out", str(blocker / "figs")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("saliency figs: error:"), err
    # a figure that fails: the others are written, then a one-line error and status 1
    import saliency.plotting as P

    P_cost, P.cost = P.cost, lambda *a, **k: 1 / 0
    try:
        assert main(["figs", str(d), "--out", str(tmp_path / "f"), "--only", "cost"]) == 1
    finally:
        P.cost = P_cost
    err = capsys.readouterr().err
    assert "saliency figs: error: 1 figure(s) failed: cost (ZeroDivisionError" in err
    assert "Traceback" not in err


def test_report_survives_garbage_lines(tmp_path, capsys):
    from test_plotting import write_results

    d = write_results(tmp_path, scores=False)
    with open(d / "records.jsonl", "ab") as f:
        f.write(b"\xff\xfe\n{}\n" + b'{"metric": "accuracy", "value": "x"}\n')
    assert main(["report", str(d)]) == 0
    assert "| magnitude |" in capsys.readouterr().out


def test_broken_pipe_ends_quietly():
    cmd = f"{sys.executable} -m saliency criteria | head -1"
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert out.stdout.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr


def test_models_and_datasets_are_listed(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "lenet300" in out and "hidden=(300, 100)" in out and "model_kwargs" in out
    assert main(["datasets"]) == 0
    assert "mnist5k" in capsys.readouterr().out


def test_console_script_imports_modules_from_the_current_directory(tmp_path):
    import shutil

    exe = shutil.which("saliency") or str(Path(sys.executable).parent / "saliency")
    here = Path(__file__).parent
    for name in ("sweep_plugin.py",):  # the plug-in next to the user's config, not on sys.path
        shutil.copy(here / name, tmp_path / name)
    cfg = sweep_fixtures.write_config(tmp_path)
    out = subprocess.run(
        [exe, "run", str(cfg), "--out", "r", "--threads", "1", *sets(["seeds=[0]"])],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "r" / "tiny" / "records.jsonl").exists()
