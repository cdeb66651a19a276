"""A character-level language model on text that ships with Python, for layer-wise pruning.

Dataset ``pydoc_chars``: the ~465k characters of Python's reference documentation topics
(``pydoc_data.topics``, in the standard library: offline), topics joined in sorted key order,
one token per character (vocabulary: the characters that occur, sorted). The first 90% is the
training text and the last 10% the test text, cut into non-overlapping windows of 65
characters: inputs are the first 64, targets the next character at each position.

Model ``char_gpt``: a small decoder-only transformer (pre-LayerNorm blocks, causal attention
with separate ``q``, ``k``, ``v``, ``o`` nn.Linear projections, a GELU MLP ``fc1``/``fc2``, learned
positions). It returns logits ``[B, vocab, T]`` (classes on dim 1), so the library's
cross-entropy reads them as is; the test loss is the mean per-character cross-entropy and
``exp(loss)`` the perplexity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from saliency.zoo.datasets import Dataset, register_dataset
from saliency.zoo.models import register_model

SEQ_LEN = 64


def pydoc_text() -> str:
    import pydoc_data.topics

    return "".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))


def _windows(ids: torch.Tensor, seq_len: int) -> TensorDataset:
    n = (len(ids) - 1) // seq_len
    x = ids[: n * seq_len].view(n, seq_len)
    y = ids[1 : n * seq_len + 1].view(n, seq_len)
    return TensorDataset(x, y)


@register_dataset("pydoc_chars")
def pydoc_chars(*, data_root=None, seed: int = 0) -> Dataset:
    text = pydoc_text()
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    cut = int(0.9 * len(ids))
    return Dataset(
        train=_windows(ids[:cut], SEQ_LEN),
        test=_windows(ids[cut:], SEQ_LEN),
        task="classification",
        num_classes=len(vocab),
        input_shape=(SEQ_LEN,),
        name="pydoc_chars",
    )


class Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape

        def split(t):
            return t.view(B, T, self.heads, d // self.heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)),
                                           is_causal=True)  # fmt: skip
        return self.o(y.transpose(1, 2).reshape(B, T, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.attn, self.ln2 = nn.LayerNorm(d), Attention(d, heads), nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class CharGPT(nn.Module):
    def __init__(self, vocab: int, seq_len: int, d: int, layers: int, heads: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq_len, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x)).transpose(1, 2)  # [B, vocab, T]: classes on dim 1


@register_model("char_gpt")
def char_gpt(shape, num_classes, *, d_model: int = 64, layers: int = 2, heads: int = 4):
    if len(shape) != 1 or num_classes is None:
        raise ValueError(
            f"char_gpt needs token sequences [T] and a vocabulary; got {shape}, {num_classes}"
        )
    if d_model % heads:
        raise ValueError(f"d_model {d_model} must be a multiple of heads {heads}")
    return CharGPT(num_classes, shape[0], d_model, layers, heads)
