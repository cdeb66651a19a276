"""SNIP against a hand-written reference: |g * w| / sum |g * w| with g from torch.func."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

import saliency


def ref_mean_grad(model, batches):
    """Mean cross-entropy gradient over all samples of `batches` (one functional call)."""
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    ps = {n: p.detach() for n, p in model.named_parameters()}
    return grad(lambda q: F.cross_entropy(functional_call(model, q, (x,)), y))(ps)


@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_snip_matches_reference(which, tiny_mlp, tiny_cnn, tiny_data, cnn_data):
    model, data = (tiny_mlp, tiny_data) if which == "mlp" else (tiny_cnn, cnn_data)
    params = saliency.prunable_parameters(model)
    s = saliency.score(model, "snip", data=data)
    g = ref_mean_grad(model, data)
    raw = {n: (g[n] * p.detach()).abs() for n, p in params.items()}
    total = sum(r.sum() for r in raw.values())
    for n in params:
        torch.testing.assert_close(s[n], raw[n] / total, rtol=1e-5, atol=1e-8)
    assert abs(sum(float(v.sum()) for v in s.values()) - 1.0) < 1e-5
    assert s.cost.samples == 16 and s.cost.backward_passes == 2


def test_snip_sample_and_batch_limits(tiny_mlp, tiny_data):
    one = saliency.score(tiny_mlp, "snip", data=tiny_data, n_batches=1)
    ref = saliency.score(tiny_mlp, "snip", data=tiny_data[:1])
    few = saliency.score(tiny_mlp, "snip", data=tiny_data, n_samples=8)
    for n in one:
        torch.testing.assert_close(one[n], ref[n])
        torch.testing.assert_close(few[n], ref[n])
    assert one.cost.samples == 8 and one.cost.backward_passes == 1
    with pytest.raises(ValueError, match="n_batches must be a positive int"):
        saliency.get_criterion("snip", n_batches=0)


def test_snip_batchnorm_train_mode_restores_running_stats(cnn_data):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(108, 3)
    )
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s_train = saliency.score(model, "snip", data=cnn_data)
    s_eval = saliency.score(model, "snip", data=cnn_data, eval_mode=True)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training and not any(m.training for m in model.modules())
    # batch statistics and running statistics give different gradients
    assert not torch.allclose(s_train["0.weight"], s_eval["0.weight"])
    # eval mode equals the reference computed on an eval-mode model
    g = ref_mean_grad(model, cnn_data)
    params = saliency.prunable_parameters(model)
    raw = {n: (g[n] * p.detach()).abs() for n, p in params.items()}
    total = sum(r.sum() for r in raw.values())
    for n in params:
        torch.testing.assert_close(s_eval[n], raw[n] / total, rtol=1e-5, atol=1e-8)


def test_snip_channel_granularity_prunes_whole_channels(tiny_cnn, cnn_data):
    masks = saliency.prune(tiny_cnn, "snip", 0.5, data=cnn_data, granularity="channel", keep=False)
    for n, m in masks.items():
        per_channel = m.reshape(m.shape[0], -1)
        assert bool((per_channel.all(1) | ~per_channel.any(1)).all()), n
