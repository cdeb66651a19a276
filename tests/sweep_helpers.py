"""A tiny synthetic dataset and model for the sweep tests, registered in the zoo by name.

Sweep configs load this module with `imports = ["sweep_helpers"]` (the tests put this folder on
PYTHONPATH), so that spawned workers and subprocesses register the same names.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from saliency.zoo import (
    Dataset,
    available_datasets,
    available_models,
    register_dataset,
    register_model,
)

HERE = Path(__file__).parent


if "tiny_blobs" not in available_datasets():

    @register_dataset("tiny_blobs")
    def tiny_blobs(*, data_root=None, seed: int = 0) -> Dataset:
        """160 + 64 points in 6-D, 3 classes given by a fixed random linear map."""
        g = torch.Generator().manual_seed(1234)
        x = torch.randn(224, 6, generator=g)
        y = (x @ torch.randn(6, 3, generator=g)).argmax(1)
        return Dataset(
            TensorDataset(x[:160], y[:160]),
            TensorDataset(x[160:], y[160:]),
            "classification",
            3,
            (6,),
            "tiny_blobs",
        )


if "tiny_mlp" not in available_models():

    @register_model("tiny_mlp")
    def tiny_mlp(shape, num_classes, *, hidden: int = 12) -> nn.Module:
        return nn.Sequential(
            nn.Flatten(), nn.Linear(shape[0], hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )


TINY = """
imports = ["sweep_helpers"]
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
