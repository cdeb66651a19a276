"""Shared pieces of the sweep tests: the tiny sweep config and a fixture that unregisters the
test plug-in afterwards. Importing this module registers nothing.

The config names `imports = ["sweep_plugin"]`: parse_config imports that module (and so do
spawned workers and subprocesses, with this folder on PYTHONPATH), which registers the tiny
dataset and model in the zoo. `clean_zoo` removes them after each test, so other test files that
list the zoo's registries never see them.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.fixture(autouse=True)
def clean_zoo():
    """Unregister the tiny plug-in after the test (autouse where imported into a test module)."""
    yield
    from saliency.zoo import datasets, models

    for name in ("tiny_blobs", "tiny_text"):
        datasets._DATASETS.pop(name, None)
    for name in ("tiny_mlp", "tiny_llama"):
        models._MODELS.pop(name, None)
    sys.modules.pop("sweep_plugin", None)


def register() -> None:
    """Register the tiny dataset and model now (for tests that need them before parse_config)."""
    import sweep_plugin  # noqa: F401


TINY = """
imports = ["sweep_plugin"]
name = "tiny"
model = "tiny_mlp"
dataset = "tiny_blobs"
seeds = [0, 1]
sparsities = [0.5, 0.9]
modes = ["oneshot", "finetune"]
criteria = ["magnitude", "random"]

[train]
epochs = 2
batch_size = 32
lr = 0.1

[scoring]
n_samples = 64
batch_size = 32
"""


def write_config(dir: Path, text: str = TINY, extra: str = "") -> Path:
    """Write a sweep config to `dir/tiny.toml`: `text` with `extra` lines placed before the first
    table (top-level keys) when they are keys, appended otherwise."""
    text = textwrap.dedent(text)
    head, sep, tail = text.partition("\n[")
    p = Path(dir) / "tiny.toml"
    p.write_text(head + "\n" + textwrap.dedent(extra) + "\n" + sep + tail)
    return p
