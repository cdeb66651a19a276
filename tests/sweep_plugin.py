"""A tiny synthetic dataset and model registered in the zoo by name, for the sweep tests.

Sweep configs load this module with `imports = ["sweep_plugin"]`; the tests put this folder on
PYTHONPATH so that spawned workers and subprocesses register the same names.
"""

from __future__ import annotations

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
