"""Tiny float64 models of every architecture family the library claims, for oracle tests.

Each `Arch` builds a seeded model, a batch (B = 3 samples) and its loss. Layouts are chosen to
fool shape checks: sequence lengths and query counts equal the batch size, so only a proof of the
sample axis (not `shape[0] == B`) keeps a fast path honest. `refuse` names archs whose samples
mix inside the model (no per-sample quantity is defined): estimators must raise there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

B = 3  # batch size; also every sequence length / query count below, on purpose
D = 4  # feature width
C = 3  # classes


@dataclass
class Arch:
    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], tuple]
    loss: Callable = F.cross_entropy
    mixes_samples: bool = False  # samples interact in the forward pass: per-sample refused
    tags: set = field(default_factory=set)  # "backpack": BackPACK must take this model

    def make(self, seed: int = 0):
        torch.manual_seed(seed)
        model = self.build().double().eval()
        g = torch.Generator().manual_seed(seed + 1)
        x, y = self.batch(g)
        return model, x, y


def _x(*shape):
    return lambda g: (
        torch.randn(B, *shape, generator=g, dtype=torch.float64),
        torch.randint(0, C, (B,), generator=g),
    )


def _logits(out):
    """The test's own reading of a model's output (dict / tuple / tensor)."""
    if isinstance(out, dict):
        return out["logits"]
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


# ----------------------------------------------------------------------------- models


def mlp():
    return nn.Sequential(nn.Linear(D, 5), nn.Tanh(), nn.Linear(5, C))


def cnn():
    return nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * 2 * 2, C)
    )


class Encoder(nn.Module):
    """Embedding Linear -> TransformerEncoderLayer -> mean pool -> head, on [B, L, D] inputs."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(D, D)
        self.layer = nn.TransformerEncoderLayer(
            D, nhead=2, dim_feedforward=6, dropout=0.0, batch_first=batch_first
        )
        self.head = nn.Linear(D, C)

    def forward(self, x):
        h = self.embed(x)
        if not self.batch_first:
            h = h.transpose(0, 1)  # [L, B, D]
        h = self.layer(h)
        return self.head(h.mean(1 if self.batch_first else 0))


class ViTBlock(nn.Module):
    """Patch embedding conv, class token, position embedding, pre-norm attention + MLP."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(1, D, 2, stride=2)  # 4x4 image -> 2x2 patches
        self.cls = nn.Parameter(torch.randn(1, 1, D) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, 5, D) * 0.1)
        self.norm1 = nn.LayerNorm(D)
        self.attn = nn.MultiheadAttention(D, 2, batch_first=True)
        self.norm2 = nn.LayerNorm(D)
        self.mlp = nn.Sequential(nn.Linear(D, 6), nn.GELU(), nn.Linear(6, D))
        self.head = nn.Linear(D, C)

    def forward(self, x):
        h = self.patch(x).flatten(2).transpose(1, 2)  # [B, 4, D]
        h = torch.cat([self.cls.expand(len(h), -1, -1), h], 1) + self.pos
        a = self.norm1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.mlp(self.norm2(h))
        return self.head(h[:, 0])


class Linear3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 5)
        self.head = nn.Linear(5, C)

    def forward(self, x):  # [B, L, D]
        return self.head(torch.tanh(self.fc(x)).mean(1))


class LinearTransposed(nn.Module):
    """A Linear on x.transpose(0, 1): [L, B, D] with L == B."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 5)
        self.head = nn.Linear(5, C)

    def forward(self, x):
        h = torch.tanh(self.fc(x.transpose(0, 1)))  # [L, B, 5]
        return self.head(h.mean(0))


class LinearReshaped(nn.Module):
    """A Linear on x.reshape(-1, D): the sample axis folded into positions."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 5)
        self.head = nn.Linear(5, C)

    def forward(self, x):
        b, L, _ = x.shape
        h = torch.tanh(self.fc(x.reshape(-1, D))).reshape(b, L, 5)
        return self.head(h.mean(1))


class LearnedQueries(nn.Module):
    """DETR/Perceiver style: a Linear on batch-independent queries ([Q, D], Q == B)."""

    def __init__(self):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(B, D))
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, D)
        self.head = nn.Linear(D, C)

    def forward(self, x):  # [B, L, D]
        q = self.q_proj(self.queries)  # [Q, D]
        k = self.k_proj(x)  # [B, L, D]
        att = torch.softmax(torch.einsum("qd,bld->bql", q, k), -1)
        return self.head(torch.einsum("bql,bld->bqd", att, x).mean(1))


class BasicBlock(nn.Module):
    """ResNet basic block with BatchNorm, then pool and head."""

    def __init__(self, track: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(2, track_running_stats=track)
        self.conv2 = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2, track_running_stats=track)
        self.head = nn.Linear(2, C)
        if track:  # non-trivial running statistics and affine parameters
            for bn in (self.bn1, self.bn2):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.data.uniform_(0.5, 1.5)
                bn.bias.data.uniform_(-0.5, 0.5)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)) + x)
        return self.head(h.mean((2, 3)))


class ConvZoo(nn.Module):
    """Depthwise, grouped, dilated, strided convs and non-zero padding modes."""

    def __init__(self):
        super().__init__()
        self.depthwise = nn.Conv2d(2, 2, 3, padding=1, groups=2, padding_mode="circular")
        self.grouped = nn.Conv2d(2, 4, 3, padding="same", groups=2, padding_mode="reflect")
        self.dilated = nn.Conv2d(4, 2, 3, dilation=2, padding=2, padding_mode="replicate")
        self.strided = nn.Conv2d(2, 3, 2, stride=2)
        self.head = nn.Linear(3 * 2 * 2, C)

    def forward(self, x):  # [B, 2, 4, 4]
        h = torch.tanh(self.depthwise(x))
        h = torch.tanh(self.grouped(h))
        h = torch.tanh(self.dilated(h))
        return self.head(torch.tanh(self.strided(h)).flatten(1))


class ConvTransposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(2, 3, 2, stride=2)
        self.head = nn.Linear(3, C)

    def forward(self, x):  # [B, 2, 2, 2] -> [B, 3, 4, 4]
        return self.head(torch.tanh(self.up(x)).mean((2, 3)))


class Conv1d3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 2, 2)
        self.c3 = nn.Conv3d(1, 2, 2)
        self.head = nn.Linear(4, C)

    def forward(self, x):  # [B, 1, 3, 3, 3]
        h3 = torch.tanh(self.c3(x)).flatten(2)  # [B, 2, 8]
        h1 = torch.tanh(self.c1(h3))  # [B, 2, 7]
        return self.head(torch.cat([h1.mean(2), h3.mean(2)], 1))


class TiedLM(nn.Module):
    """Embedding with a tied output head; per-position logits [B, V, L]."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, D)
        self.mix = nn.Linear(D, D)
        self.head = nn.Linear(D, 5, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):  # [B, L]
        return self.head(torch.tanh(self.mix(self.emb(tokens)))).transpose(1, 2)


def _tokens(g):
    x = torch.randint(0, 5, (B, B), generator=g)
    y = torch.randint(0, 5, (B, B), generator=g)
    y[0, 1] = -100  # padding, ignored by cross-entropy
    return x, y


class SharedTwice(nn.Module):
    """ALBERT-style: one layer registered twice in a ModuleList and applied twice."""

    def __init__(self):
        super().__init__()
        shared = nn.Linear(D, D)
        self.layers = nn.ModuleList([shared, shared])
        self.head = nn.Linear(D, C)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


class Recurrent(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.rnn = cell(D, 5, batch_first=True)
        self.head = nn.Linear(5, C)

    def forward(self, x):  # [B, L, D]
        return self.head(self.rnn(x)[0][:, -1])


class DictOut(nn.Module):
    def __init__(self, as_tuple=False):
        super().__init__()
        self.as_tuple = as_tuple
        self.body = nn.Linear(D, 5)
        self.head = nn.Linear(5, C)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        logits = self.head(h)
        return (logits, h) if self.as_tuple else {"logits": logits, "hidden": h}


class Frozen(nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(D, 5)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(5, C)

    def forward(self, x):
        return self.head(torch.tanh(self.frozen(x)))


class InPlaceActs(nn.Module):
    """Layers followed by in-place activations (ReLU6, Hardtanh, SiLU)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(D, 5)
        self.act1 = nn.ReLU6(inplace=True)
        self.fc2 = nn.Linear(5, 5)
        self.act2 = nn.Hardtanh(-0.5, 0.5, inplace=True)
        self.fc3 = nn.Linear(5, 5)
        self.act3 = nn.SiLU(inplace=True)
        self.head = nn.Linear(5, C)

    def forward(self, x):
        h = self.act1(self.fc1(x) * 3)
        h = self.act2(self.fc2(h))
        return self.head(self.act3(self.fc3(h)))


class ChannelsLast(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.head = nn.Linear(3, C)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).mean((2, 3)))


def _channels_last(g):
    x, y = _x(2, 4, 4)(g)
    return x.contiguous(memory_format=torch.channels_last), y


def _regression(g):
    return (
        torch.randn(B, D, generator=g, dtype=torch.float64),
        torch.randn(B, C, generator=g, dtype=torch.float64),
    )


def seq_positions(padding_mode="zeros"):
    """Sequential Conv1d model with per-position logits [B, C, L] (BackPACK-routable when the
    padding is zeros; circular padding must step aside)."""
    return nn.Sequential(
        nn.Conv1d(2, 3, 3, padding=1, padding_mode=padding_mode), nn.Tanh(), nn.Conv1d(3, C, 1)
    )


def seq_pool_same():
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding="same"),
        nn.ReLU(),
        nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
        nn.Flatten(),
        nn.Linear(2 * 2 * 2, C),
    )


def seq_registered_twice():
    shared = nn.Linear(D, D)
    return nn.Sequential(shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(D, C))


def _positions(g):
    x = torch.randn(B, 2, 5, generator=g, dtype=torch.float64)
    return x, torch.randint(0, C, (B, 5), generator=g)


ARCHS = [
    Arch("mlp", mlp, _x(D), tags={"backpack"}),
    Arch("mlp_mse_sum", mlp, _regression, nn.MSELoss(reduction="sum"), tags={"backpack"}),
    Arch("cnn", cnn, _x(1, 6, 6), tags={"backpack"}),
    Arch("encoder_seq_first", lambda: Encoder(False), _x(B, D)),
    Arch("encoder_batch_first", lambda: Encoder(True), _x(B, D)),
    Arch("vit_block", ViTBlock, _x(1, 4, 4)),
    Arch("linear_3d", Linear3d, _x(B, D)),
    Arch("linear_transposed", LinearTransposed, _x(B, D)),
    Arch("linear_reshaped", LinearReshaped, _x(B, D)),
    Arch("learned_queries", LearnedQueries, _x(B, D)),
    Arch("resnet_bn_eval", BasicBlock, _x(2, 3, 3)),
    Arch("resnet_bn_batch_stats", lambda: BasicBlock(False), _x(2, 3, 3), mixes_samples=True),
    Arch("conv_variants", ConvZoo, _x(2, 4, 4)),
    Arch("conv_transpose", ConvTransposed, _x(2, 2, 2)),
    Arch("conv1d_3d", Conv1d3d, _x(1, 3, 3, 3)),
    Arch("tied_lm_ignore_index", TiedLM, _tokens, nn.CrossEntropyLoss(ignore_index=-100)),
    Arch("tied_lm_sum", TiedLM, _tokens, nn.CrossEntropyLoss(reduction="sum")),
    Arch("shared_twice", SharedTwice, _x(D)),
    Arch("gru", lambda: Recurrent(nn.GRU), _x(B, D)),
    Arch("lstm", lambda: Recurrent(nn.LSTM), _x(B, D)),
    Arch("dict_output", DictOut, _x(D)),
    Arch("tuple_output", lambda: DictOut(True), _x(D)),
    Arch("frozen", Frozen, _x(D)),
    Arch("inplace_acts", InPlaceActs, _x(D)),
    Arch("channels_last", ChannelsLast, _channels_last),
    Arch("seq_positions", seq_positions, _positions, tags={"backpack"}),
    Arch("seq_positions_circular", lambda: seq_positions("circular"), _positions),
    Arch("seq_pool_same", seq_pool_same, _x(1, 4, 4)),
    Arch("seq_registered_twice", seq_registered_twice, _x(D)),
]
ARCH_IDS = [a.name for a in ARCHS]
BY_NAME = {a.name: a for a in ARCHS}


# ----------------------------------------------------------------------------- references


def loop_losses(model, x, y, loss_fn):
    """Per-sample losses, one forward per sample (never through functional_call)."""
    return [loss_fn(_logits(model(x[n : n + 1])), y[n : n + 1]) for n in range(len(x))]


def loop_grads(model, params, x, y, loss_fn):
    """``{name: [N, *shape]}`` per-sample gradients by a plain loop of autograd calls."""
    out = {n: [] for n in params}
    with torch.enable_grad():
        saved = [(p, p.requires_grad) for p in params.values()]
        for p, _ in saved:
            p.requires_grad_(True)
        try:
            for loss in loop_losses(model, x, y, loss_fn):
                gs = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                for (n, p), g in zip(params.items(), gs, strict=True):
                    out[n].append(torch.zeros_like(p) if g is None else g)
        finally:
            for p, r in saved:
                p.requires_grad_(r)
    return {n: torch.stack(v) for n, v in out.items()}


def flat(d: dict, names) -> torch.Tensor:
    return torch.cat([d[n].reshape(-1) for n in names])


# ----------------------------------------------------------------------------- appended archs


class CrossAttention(nn.Module):
    """nn.MultiheadAttention with kdim / vdim != embed_dim: separate q/k/v projection weights."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(D, 2, kdim=3, vdim=5, batch_first=True)
        self.head = nn.Linear(D, C)

    def forward(self, x):  # [B, L, D + 3 + 5]: queries, keys, values side by side
        q, k, v = x.split([D, 3, 5], -1)
        return self.head(self.attn(q, k, v, need_weights=False)[0].mean(1))


class ConvTransposedGrouped(nn.Module):
    """ConvTranspose1d with groups=2: weight [in, out/groups, k]."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose1d(4, 6, 3, stride=2, groups=2)
        self.head = nn.Linear(6, C)

    def forward(self, x):  # [B, 4, 3] -> [B, 6, 7]
        return self.head(torch.tanh(self.up(x)).mean(2))


class MobileSE(nn.Module):
    """The layers of MobileNetV3 / EfficientNet / timm's ResNet in one block (issue 23): GroupNorm
    and Hardswish stem, a depthwise conv, squeeze-excitation gated by Hardsigmoid (no double
    backward in torch), a grouped 1x1 conv, a residual BatchNorm (gamma zero-initialised with
    `zero_init`, timm's ``zero_init_last``), ReLU6, LayerNorm and a head (zero-initialised with
    `zero_init`, as torchvision's ViT and timm's Mixer) on [B, 2, 5, 5] inputs."""

    def __init__(self, zero_init: bool = False):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.act = nn.Hardswish()
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.se_reduce = nn.Conv2d(4, 2, 1)
        self.se_expand = nn.Conv2d(2, 4, 1)
        self.gate = nn.Hardsigmoid()
        self.pw = nn.Conv2d(4, 4, 1, groups=2)
        self.bn = nn.BatchNorm2d(4)
        self.relu6 = nn.ReLU6()
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, C)
        if zero_init:
            nn.init.zeros_(self.bn.weight)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, x):
        h = self.act(self.gn(self.stem(x)))
        r = self.dw(h)
        s = self.gate(self.se_expand(F.relu(self.se_reduce(r.mean((2, 3), keepdim=True)))))
        h = self.relu6(2 * h + self.bn(self.pw(r * s)))
        return self.head(self.norm(h.mean((2, 3))))


ARCHS += [
    Arch("mobile_se", MobileSE, _x(2, 5, 5)),
    Arch("mobile_se_zero_init", lambda: MobileSE(True), _x(2, 5, 5), tags={"zero_init"}),
    Arch("cross_attention", CrossAttention, _x(B, D + 3 + 5)),
    Arch("conv_transpose_grouped", ConvTransposedGrouped, _x(4, 3)),
]
ARCH_IDS = [a.name for a in ARCHS]
BY_NAME = {a.name: a for a in ARCHS}
