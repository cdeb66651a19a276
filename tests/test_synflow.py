"""SynFlow against closed forms, its exponential schedule, layer collapse, and exact restoration."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import saliency


def test_synflow_matches_closed_form_on_relu_mlp():
    """With every parameter made positive, R = 1^T (|W3| (|W2| (|W1| 1 + |b1|) + |b2|) + |b3|)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)
    ).double()
    W = [model[i].weight.detach().abs() for i in (0, 2, 4)]
    b = [model[i].bias.detach().abs() for i in (0, 2, 4)]
    h0 = torch.ones(4, dtype=torch.float64)
    h1 = W[0] @ h0 + b[0]
    h2 = W[1] @ h1 + b[1]
    back2 = torch.ones(3, dtype=torch.float64)  # dR/d out
    back1 = W[2].T @ back2  # dR/d h2
    back0 = W[1].T @ back1  # dR/d h1
    expect = {
        "0.weight": W[0] * torch.outer(back0, h0),
        "2.weight": W[1] * torch.outer(back1, h1),
        "4.weight": W[2] * torch.outer(back2, h2),
    }
    s = saliency.score(model, "synflow", input_shape=(4,))
    assert set(s) == set(expect)
    for n in expect:
        torch.testing.assert_close(s[n], expect[n])
    assert s.cost.samples == 0 and s.cost.backward_passes == 1


def test_synflow_matches_manual_forward_on_cnn(tiny_cnn, cnn_data):
    c, f = tiny_cnn.conv, tiny_cnn.fc
    Wc = c.weight.detach().double().abs().requires_grad_(True)
    Wf = f.weight.detach().double().abs().requires_grad_(True)
    x = torch.ones(1, 1, 8, 8, dtype=torch.float64)
    h = F.relu(F.conv2d(x, Wc, c.bias.detach().double().abs()))
    R = F.linear(h.flatten(1), Wf, f.bias.detach().double().abs()).sum()
    gc, gf = torch.autograd.grad(R, (Wc, Wf))
    s = saliency.score(tiny_cnn, "synflow", data=cnn_data)  # input shape read from the data
    torch.testing.assert_close(s["conv.weight"], (Wc * gc).detach())
    torch.testing.assert_close(s["fc.weight"], (Wf * gf).detach())
    single = saliency.score(tiny_cnn, "synflow", data=cnn_data, double=False)
    assert single["fc.weight"].dtype == torch.float32
    torch.testing.assert_close(single["fc.weight"].double(), (Wf * gf).detach(), rtol=1e-5, atol=0)


def test_synflow_schedule_is_exponential():
    crit = saliency.get_criterion("synflow")
    sched = crit.schedule(0.99)
    assert len(sched) == 100 and sched[-1] == 0.99
    for r, s in enumerate(sched, start=1):
        assert s == pytest.approx(1 - 0.01 ** (r / 100))
    assert all(a < b for a, b in zip(sched, sched[1:], strict=False))
    assert saliency.get_criterion("synflow", rounds=3).schedule(0.875) == pytest.approx(
        [0.5, 0.75, 0.875]
    )
    assert crit.schedule(0.0) == [0.0]
    with pytest.raises(ValueError, match="rounds must be a positive int"):
        saliency.get_criterion("synflow", rounds=0)


def collapse_mlp():
    """A wide first layer with small init weights (fan-in 500): global magnitude empties it."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(500, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 10)
    )


def test_iterative_synflow_avoids_layer_collapse_where_magnitude_does_not():
    mag = saliency.prune(collapse_mlp(), "magnitude", 0.99)
    assert any(not m.any() for m in mag.values()), "single-shot magnitude should empty a layer"
    model = collapse_mlp()
    masks = saliency.prune(model, "synflow", 0.99, input_shape=(500,))
    assert masks.sparsity == pytest.approx(0.99, abs=1e-4)
    assert all(m.any() for m in masks.values()), [int(m.sum()) for m in masks.values()]
    # pruned weights are zero, kept ones keep their sign and value
    ref = collapse_mlp()
    for n, p in saliency.prunable_parameters(model).items():
        kept = masks[n]
        assert torch.equal(p.detach()[kept], dict(ref.named_parameters())[n].detach()[kept])
        assert not p.detach()[~kept].any()
    saliency.remove(model)


def test_synflow_restores_batchnorm_model_exactly(cnn_data):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(108, 3)
    )
    with torch.no_grad():  # trained-looking BatchNorm: negative shifts, non-trivial statistics
        model[1].weight.uniform_(-1, 1)
        model[1].bias.uniform_(-1, 1)
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    model.train()
    model(cnn_data[0][0]).sum().backward()
    before = copy.deepcopy(model.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]
    s = saliency.score(model, "synflow", data=cnn_data)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))
    assert all(m.training for m in model.modules())
    assert all(torch.isfinite(v).all() and (v >= 0).all() for v in s.values())
    # signs survive a full pruning run too
    masks = saliency.prune(model, "synflow", 0.5, data=cnn_data, rounds=5, keep=False)
    for n, p in saliency.prunable_parameters(model).items():
        assert torch.equal(p.detach()[masks[n]], before[n][masks[n]])


def test_synflow_needs_an_input_shape(tiny_mlp):
    with pytest.raises(ValueError, match="input_shape"):
        saliency.score(tiny_mlp, "synflow")
    with pytest.raises(ValueError, match="positive ints"):
        saliency.get_criterion("synflow", input_shape=(0, 3))
    s = saliency.score(tiny_mlp, "synflow", input_shape=[6])  # a TOML list is fine
    assert s["0.weight"].shape == (5, 6)


def test_synflow_reprunes_a_masked_model_and_channels(tiny_cnn, cnn_data):
    first = saliency.prune(tiny_cnn, "synflow", 0.5, data=cnn_data, rounds=4)
    second = saliency.prune(tiny_cnn, "synflow", 0.8, data=cnn_data, rounds=4)
    assert second.sparsity == pytest.approx(0.8, abs=1e-3)
    assert all(not bool((second[n] & ~first[n]).any()) for n in first), "monotone"
    saliency.remove(tiny_cnn)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    masks = saliency.prune(
        model, "synflow", 0.5, input_shape=(6,), granularity="channel", rounds=5, keep=False
    )
    for n, m in masks.items():
        assert bool((m.all(1) | ~m.any(1)).all()), n
