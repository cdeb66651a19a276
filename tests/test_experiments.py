"""The article configs in experiments/ stay valid as the config schema evolves."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from saliency.sweep.config import load_config
from saliency.sweep.runner import plan

EXPERIMENTS = Path(__file__).parent.parent / "experiments"


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.toml")), ids=lambda p: p.stem)
def test_experiment_config_parses_and_plans(path):
    cfg = load_config(path)
    assert plan(cfg), f"{path.name} plans no work"


def test_articles_script_help():
    out = subprocess.run(
        [sys.executable, str(EXPERIMENTS / "articles.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "friedman" in out.stdout
