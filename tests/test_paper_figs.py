"""`python -m paper_figs RESULTS --out DIR` from the repo root builds every figure and table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from test_plotting import write_results

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # paper_figs lives at the repo root (not an installed package)

from paper_figs.__main__ import main  # noqa: E402


def test_cli_builds_figures(tmp_path, capsys):
    # every figure is covered by test_plotting.test_build_all_writes_every_figure; here the CLI
    d = write_results(tmp_path)
    out = tmp_path / "figs"
    args = ["--only", "accuracy_vs_sparsity", "agreement", "--band", "ci95", "--sparsity", "0.8"]
    assert main([str(d), "--out", str(out), *args, "-q"]) == 0
    written = {Path(line).name for line in capsys.readouterr().out.split()}
    assert written == {
        "accuracy_vs_sparsity.png",
        "accuracy_vs_sparsity.pdf",
        "accuracy_vs_sparsity.txt",
        "agreement.png",
        "agreement.pdf",
        "agreement.txt",
    }
    assert "95% Student-t" in (out / "accuracy_vs_sparsity.txt").read_text()
    assert "global sparsity 0.8" in (out / "agreement.txt").read_text()


def test_cli_only_skips_and_missing_dir(tmp_path, capsys, caplog):
    d = write_results(tmp_path, scores=False)
    args = [str(d), "--out", str(tmp_path / "f"), "--only", "table", "agreement"]
    with caplog.at_level("INFO"):
        assert main([*args, "--table-sparsities", "0.5", "0.9"]) == 0
    out = capsys.readouterr().out.split()
    assert sorted(Path(x).name for x in out) == ["table_accuracy.md", "table_accuracy.tex"]
    assert "save_scores" in caplog.text  # agreement skipped with its reason
    assert "| criterion | s = 0.5 | s = 0.9 |" in (tmp_path / "f" / "table_accuracy.md").read_text()
    assert main([str(tmp_path / "nope"), "--out", str(tmp_path / "f")]) == 2
    assert "no records" in capsys.readouterr().err


def test_python_dash_m_from_repo_root(tmp_path):
    d = write_results(tmp_path, scores=False)
    env = dict(os.environ, MPLBACKEND="Agg")
    cmd = [
        sys.executable,
        "-m",
        "paper_figs",
        str(d),
        "--out",
        str(tmp_path / "f"),
        "--only",
        "table",
    ]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "f" / "table_accuracy.tex").exists()
