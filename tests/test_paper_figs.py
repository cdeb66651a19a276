"""`python -m paper_figs RESULTS --out DIR` from the repo root builds every figure and table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from test_plotting import write_results

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    env = dict(os.environ, MPLBACKEND="Agg")
    return subprocess.run(
        [sys.executable, "-m", "paper_figs", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_cli_builds_everything(tmp_path):
    d = write_results(tmp_path)
    out = tmp_path / "figs"
    r = run(d, "--out", out, "--band", "ci95")
    assert r.returncode == 0, r.stderr
    written = {Path(line).name for line in r.stdout.split()}
    for stem in (
        "accuracy_vs_sparsity",
        "accuracy_vs_compression",
        "layer_sparsity",
        "agreement",
        "loss_prediction",
        "cost",
    ):
        assert {f"{stem}.png", f"{stem}.pdf"} <= written
        assert (out / f"{stem}.png").stat().st_size > 1000
    assert {"table_accuracy.tex", "table_accuracy.md"} <= written
    assert "95% Student-t" in (out / "accuracy_vs_sparsity.txt").read_text()


def test_cli_only_and_missing_dir(tmp_path):
    d = write_results(tmp_path, scores=False)
    r = run(
        d,
        "--out",
        tmp_path / "f",
        "--only",
        "table",
        "agreement",
        "--table-sparsities",
        "0.5",
        "0.9",
    )
    assert r.returncode == 0, r.stderr
    assert sorted(Path(x).name for x in r.stdout.split()) == [
        "table_accuracy.md",
        "table_accuracy.tex",
    ]
    assert "agreement" in r.stderr  # skipped with its reason
    assert "| criterion | s = 0.5 | s = 0.9 |" in (tmp_path / "f" / "table_accuracy.md").read_text()
    r = run(tmp_path / "nope", "--out", tmp_path / "f")
    assert r.returncode == 2 and "no records" in r.stderr
