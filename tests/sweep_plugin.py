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


if "tiny_text" not in available_datasets():

    @register_dataset("tiny_text")
    def tiny_text(*, data_root=None, seed: int = 0) -> Dataset:
        """The first 6144 bytes of the pydoc text as byte tokens (vocabulary 256), windows of
        24: 230 calibration windows, 26 test windows (task "lm", as pydoc_smollm2)."""
        from saliency.zoo.smollm2 import lm_samples, token_windows
        from saliency.zoo.text import pydoc_text

        ids = torch.tensor(list(pydoc_text().encode()[:6144]), dtype=torch.long)
        calibration, test = token_windows(ids, seq_len=24, test_fraction=0.1)
        return Dataset(lm_samples(calibration), lm_samples(test), "lm", 256, (24,), "tiny_text")


if "tiny_llama" not in available_models():

    @register_model("tiny_llama")
    def tiny_llama(shape, num_classes, *, hidden: int = 32, layers: int = 2) -> nn.Module:
        """A random LLaMA (transformers): GQA with 4 query heads in 2 KV groups, MLP width 64."""
        import transformers

        config = transformers.LlamaConfig(
            vocab_size=num_classes, hidden_size=hidden, intermediate_size=2 * hidden,
            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64,
        )  # fmt: skip
        return transformers.LlamaForCausalLM(config)
