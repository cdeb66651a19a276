"""Curvature against brute force: per-sample loops, autograd Hessians, explicit Jacobians."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from saliency import curvature as C

torch.set_default_dtype(torch.float32)


class Mixed(nn.Module):
    """Linear on [B, T, in] inputs (extra dim), grouped padded Conv2d, Conv1d, LayerNorm (generic
    path), a layer used twice, and a tied weight (generic path)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, groups=2, padding_mode="reflect")
        self.conv1 = nn.Conv1d(4, 3, 2, stride=2, dilation=1)
        self.seq = nn.Linear(4, 4)  # applied on [B, 9, 4]
        self.norm = nn.LayerNorm(3)
        self.twice = nn.Linear(3, 3)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x))  # [B, 4, 3, 3]
        h = self.seq(h.flatten(2).transpose(1, 2)).relu_()  # [B, 9, 4], in-place after Linear
        h = self.conv1(h.transpose(1, 2))  # [B, 3, 4]
        h = self.norm(h.mean(-1))
        h = self.twice(torch.tanh(self.twice(h)))
        return self.head(h) + h @ self.head.weight.T  # second use of a tied weight


def _loop_grads(model, params, x, y, loss_fn):
    out = {n: [] for n in params}
    for i in range(len(x)):
        gs = torch.autograd.grad(loss_fn(model(x[i : i + 1]), y[i : i + 1]), list(params.values()))
        for n, g in zip(params, gs, strict=True):
            out[n].append(g)
    return {n: torch.stack(v) for n, v in out.items()}


@pytest.fixture
def mixed():
    torch.manual_seed(0)
    model = Mixed().double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=g)
    return model, x, y


def test_per_sample_grads_match_loop(mixed):
    model, x, y = mixed
    params = dict(model.named_parameters())
    hooked, generic = C._split(model, params)
    # closed forms where they apply, the generic path for LayerNorm; head.weight is also used
    # outside its layer: the hooked factors do not explain its gradient, so it falls back
    assert {n for names in hooked.values() for n in names.values()} >= {"conv.weight", "seq.weight"}
    assert {"norm.weight"} <= set(generic)
    got = C.per_sample_grads(model, params, x, y, F.cross_entropy, chunk_size=2)
    ref = _loop_grads(model, params, x, y, F.cross_entropy)
    for n in params:
        assert got[n].shape == (5, *params[n].shape)
        torch.testing.assert_close(got[n], ref[n], msg=n)
    sq = C.sum_grad_squared(model, params, x, y, F.cross_entropy, chunk_size=2)
    for n in params:
        torch.testing.assert_close(sq[n], (ref[n] ** 2).sum(0), msg=n)


def test_sum_reduction_gives_same_per_sample_grads(mixed):
    model, x, y = mixed
    params = {"conv.weight": model.conv.weight, "norm.bias": model.norm.bias}
    a = C.per_sample_grads(model, params, x, y, F.cross_entropy)
    b = C.per_sample_grads(model, params, x, y, lambda o, t: F.cross_entropy(o, t, reduction="sum"))
    for n in params:
        torch.testing.assert_close(a[n], b[n])


def test_linear_closed_form_square_sum(tiny_mlp, tiny_data):
    x, y = tiny_data[0]
    params = dict(tiny_mlp.named_parameters())
    ref = _loop_grads(tiny_mlp, params, x, y, F.cross_entropy)
    sq = C.sum_grad_squared(tiny_mlp, params, x, y, F.cross_entropy)
    for n in params:
        torch.testing.assert_close(sq[n], (ref[n] ** 2).sum(0), msg=n)


def test_model_state_untouched(tiny_cnn, cnn_data):
    x, y = cnn_data[0]
    tiny_cnn.conv.weight.requires_grad_(False)
    stale = torch.ones_like(tiny_cnn.fc.weight)
    tiny_cnn.fc.weight.grad = stale
    params = dict(tiny_cnn.named_parameters())
    g = C.per_sample_grads(tiny_cnn, params, x, y, F.cross_entropy)
    assert g["conv.weight"].abs().sum() > 0
    assert not tiny_cnn.conv.weight.requires_grad and tiny_cnn.fc.weight.grad is stale
    assert all(not m._forward_hooks for m in tiny_cnn.modules())


def test_batchnorm_in_train_mode_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    with pytest.raises(ValueError, match="BatchNorm1d in train mode.*model.eval"):
        C.per_sample_grads(model, dict(model.named_parameters()), x, y, F.cross_entropy)
    model.eval()
    g = C.per_sample_grads(model, dict(model.named_parameters()), x, y, F.cross_entropy)
    assert g["1.weight"].shape == (4, 4)


def test_bad_params_refused(tiny_mlp, tiny_data):
    x, y = tiny_data[0]
    with pytest.raises(ValueError, match="not the parameter of that name"):
        C.per_sample_grads(tiny_mlp, {"w": torch.zeros(3)}, x, y, F.cross_entropy)
    with pytest.raises(ValueError, match="non-empty dict"):
        C.per_sample_grads(tiny_mlp, {}, x, y, F.cross_entropy)
    with pytest.raises(ValueError, match="8 samples but targets hold 3"):
        C.per_sample_grads(tiny_mlp, dict(tiny_mlp.named_parameters()), x, y[:3], F.cross_entropy)
