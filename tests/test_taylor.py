"""Taylor on activations against gated per-example autograd; on weights against torch.func."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

import saliency


def gated_reference(model, params, batches):
    """Per example n and channel k: |d l_n / d gate_k| / M with the layer output multiplied by a
    gate of ones: the first-order loss change of zeroing channel k, divided by its M positions."""
    owner = {id(m.weight): m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    out = {}
    for n, p in params.items():
        layer = owner[id(p)]
        dim = -1 if isinstance(layer, nn.Linear) else 1
        total, count = 0.0, 0
        for x, y in batches:
            for i in range(len(x)):
                gate = torch.ones(p.shape[0], requires_grad=True)
                hook = layer.register_forward_hook(
                    lambda m, a, o, gate=gate, dim=dim: (
                        o * gate.view(-1, *[1] * (o.dim() - 2)) if dim == 1 else o * gate
                    )
                )
                try:
                    o = model(x[i : i + 1])
                finally:
                    hook.remove()
                (dg,) = torch.autograd.grad(F.cross_entropy(o, y[i : i + 1]), gate)
                total = total + dg.abs()
                count += 1
        M = 1
        if dim == 1:  # positions of the conv output
            with torch.no_grad():
                M = _positions(model, layer, batches[0][0][:1])
        out[n] = total / count / M
    return out


def _positions(model, layer, x):
    seen = {}
    h = layer.register_forward_hook(lambda m, a, o: seen.setdefault("o", o))
    try:
        model(x)
    finally:
        h.remove()
    return seen["o"][0, 0].numel()


@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_taylor_matches_gated_first_order_change(which, tiny_mlp, tiny_cnn, tiny_data, cnn_data):
    model, data = (tiny_mlp, tiny_data) if which == "mlp" else (tiny_cnn, cnn_data)
    params = saliency.prunable_parameters(model)
    ref = gated_reference(model, params, data)
    raw = saliency.score(model, "taylor", data=data, normalize=False)
    normed = saliency.score(model, "taylor", data=data)
    for n, p in params.items():
        ch = raw[n].reshape(p.shape[0], -1)
        assert bool((ch == ch[:, :1]).all()), "a channel's score is broadcast over its weights"
        torch.testing.assert_close(ch[:, 0], ref[n].float(), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(
            normed[n].reshape(p.shape[0], -1)[:, 0],
            (ref[n] / ref[n].norm()).float(),
            rtol=1e-4,
            atol=1e-7,
        )
    assert raw.cost.samples == 16 and raw.cost.backward_passes == 2


def test_taylor_score_is_the_first_order_loss_change(tiny_mlp):
    """On one example, score * M equals the autograd slope of the loss along 'zero channel k'."""
    x, y = torch.randn(1, 6), torch.tensor([1])
    s = saliency.score(tiny_mlp, "taylor", data=[(x, y)], normalize=False)
    layer = tiny_mlp[0]
    for k in range(5):

        def loss_at(t, k=k):
            scale = torch.ones(5).index_fill(0, torch.tensor([k]), 0.0) * t + (1 - t)
            h = tiny_mlp[1](layer(x) * scale)
            return F.cross_entropy(tiny_mlp[2](h), y)

        # d/dt loss(t) at t=0 moves from the intact net toward the net with channel k zeroed
        t = torch.zeros((), requires_grad=True)
        (slope,) = torch.autograd.grad(loss_at(t), t)
        torch.testing.assert_close(s["0.weight"][k, 0], slope.abs(), rtol=1e-4, atol=1e-7)


def test_taylor_channel_allocation_recovers_channel_scores(tiny_cnn, cnn_data):
    s = saliency.score(tiny_cnn, "taylor", data=cnn_data)
    masks = saliency.prune(
        tiny_cnn, "taylor", 0.5, data=cnn_data, granularity="channel", scope="layer", keep=False
    )
    for n, m in masks.items():
        ch = s[n].reshape(s[n].shape[0], -1)[:, 0]
        kept = m.reshape(m.shape[0], -1).all(1)
        k = round(0.5 * len(ch))
        expect = torch.ones_like(kept)
        expect[torch.sort(ch.double(), stable=True).indices[:k]] = False
        assert torch.equal(kept, expect), n


def test_taylor_hooks_removed_and_state_restored_on_error(tiny_cnn, cnn_data):
    tiny_cnn.train()

    def broken(out, y):
        raise RuntimeError("loss failed")

    with pytest.raises(RuntimeError, match="loss failed"):
        saliency.score(tiny_cnn, "taylor", data=cnn_data, loss_fn=broken)
    assert all(not m._forward_hooks for m in tiny_cnn.modules())
    assert tiny_cnn.training and all(p.grad is None for p in tiny_cnn.parameters())


def test_taylor_refuses_shared_layers_and_non_layer_params(tiny_data):
    lin = nn.Linear(6, 6)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.out = lin, nn.Linear(6, 3)

        def forward(self, x):
            return self.out(self.lin(self.lin(x)))

    model = Twice()
    with pytest.raises(ValueError, match="ran 2 times"):
        saliency.score(model, "taylor", data=tiny_data)
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(ValueError, match="use 'taylor_weight'"):
        saliency.score(model, "taylor", data=tiny_data, params={"out.bias": model.out.bias})


class DeadBranch(nn.Module):
    """A layer behind a ReLU that is off for every sample outputs its bias, the same row for
    every sample, so its values cannot prove its sample axis (mobile_se's SE conv); `mix` adds
    the mean of that layer's output over the batch to every sample's logits."""

    def __init__(self, mix: bool):
        super().__init__()
        self.mix = mix
        self.pre, self.dead, self.head = nn.Linear(6, 2), nn.Linear(2, 3), nn.Linear(6, 3)
        with torch.no_grad():
            self.pre.bias.fill_(-100.0)  # ReLU off for every sample

    def forward(self, x):
        a = self.dead(F.relu(self.pre(x)))
        return self.head(x) + (a.mean(0) if self.mix else a) * torch.tanh(x[:, :3])


def test_taylor_proves_rows_that_do_not_move_by_gradients(tiny_data):
    """Row n of the dead layer reaches sample n's loss alone: scored, equal to the per-example
    reference; averaged over the batch downstream it reaches every loss: refused."""
    torch.manual_seed(0)
    model = DeadBranch(mix=False)
    params = saliency.prunable_parameters(model)
    raw = saliency.score(model, "taylor", data=tiny_data, normalize=False)
    ref = gated_reference(model, params, tiny_data)
    for n in params:
        torch.testing.assert_close(raw[n][:, 0].double(), ref[n].double(), rtol=1e-5, atol=1e-7)
    assert raw["dead.weight"].abs().sum() > 0 and not raw["pre.weight"].any()
    mixed = DeadBranch(mix=True)
    mixed.load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match="'dead.weight' to carry the samples on dim 0"):
        saliency.score(mixed, "taylor", data=tiny_data)
    assert all(not m._forward_hooks for m in mixed.modules())


@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_taylor_weight_matches_reference(which, tiny_mlp, tiny_cnn, tiny_data, cnn_data):
    model, data = (tiny_mlp, tiny_data) if which == "mlp" else (tiny_cnn, cnn_data)
    params = saliency.prunable_parameters(model)
    ps = {n: p.detach() for n, p in model.named_parameters()}
    per_batch = [
        grad(lambda q, x=x, y=y: F.cross_entropy(functional_call(model, q, (x,)), y))(ps)
        for x, y in data
    ]
    s = saliency.score(model, "taylor_weight", data=data)
    for n, p in params.items():
        I = sum((g[n] * p.detach()) ** 2 for g in per_batch) / len(per_batch)
        torch.testing.assert_close(s[n], I.sqrt(), rtol=1e-5, atol=1e-9)
    one = saliency.score(model, "taylor_weight", data=data, n_batches=1)
    for n, p in params.items():
        torch.testing.assert_close(
            one[n], (per_batch[0][n] * p.detach()).abs(), rtol=1e-5, atol=1e-9
        )


def test_taylor_weight_channels_ranked_by_summed_squares(tiny_cnn, cnn_data):
    """Channel granularity ranks channels by I_S = sum over the channel of (g w)^2 (the paper)."""
    s = saliency.score(tiny_cnn, "taylor_weight", data=cnn_data, n_batches=1)
    masks = saliency.allocate(s, 0.5, granularity="channel", scope="layer")
    for n, m in masks.items():
        I_S = (s[n].double() ** 2).reshape(s[n].shape[0], -1).sum(1)
        kept = m.reshape(m.shape[0], -1).all(1)
        expect = torch.ones_like(kept)
        expect[torch.sort(I_S, stable=True).indices[: round(0.5 * len(I_S))]] = False
        assert torch.equal(kept, expect), n


def test_taylor_batchnorm_modes_restore_running_stats(cnn_data):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(108, 3)
    )
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for name in ("taylor", "taylor_weight"):
        for eval_mode in (True, False):
            if name == "taylor" and not eval_mode:  # batch statistics mix the samples
                with pytest.raises(ValueError, match="BatchNorm2d in train mode"):
                    saliency.score(model, name, data=cnn_data, eval_mode=eval_mode)
                continue
            s = saliency.score(model, name, data=cnn_data, eval_mode=eval_mode)
            assert all(torch.isfinite(v).all() for v in s.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(m.training for m in model.modules())
