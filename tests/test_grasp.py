"""GraSP against a full autograd Hessian: score = w * (H g) / |sum w * (H g)|, higher = keep."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import saliency


def small_cnn():
    """Conv 1->2 (3x3) on 5x5 inputs, then Linear 18->3: 72 weights, a Hessian in a second."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(18, 3)
    )


def small_cnn_data():
    g = torch.Generator().manual_seed(3)
    return [
        (torch.randn(8, 1, 5, 5, generator=g), torch.randint(0, 3, (8,), generator=g))
        for _ in range(2)
    ]


def reference(model, batches, T):
    """w * (H g) over the prunable weights, from the explicit Hessian of the mean tempered loss."""
    params = saliency.prunable_parameters(model)
    names = list(params)
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    fixed = {n: p.detach() for n, p in model.named_parameters()}
    x = torch.cat([b[0] for b in batches]).double()
    y = torch.cat([b[1] for b in batches])
    model = model.double()
    fixed = {n: p.double() for n, p in fixed.items()}

    def loss(flat):
        ps = dict(fixed)
        for n, chunk, shape in zip(names, flat.split(sizes), shapes, strict=True):
            ps[n] = chunk.view(shape)
        return F.cross_entropy(functional_call(model, ps, (x,)) / T, y)

    w = torch.cat([fixed[n].reshape(-1) for n in names])
    flat = w.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(flat), flat)
    H = torch.func.hessian(loss)(w)
    S = -w * (H @ g)  # the paper's score: GraSP removes the highest S
    return {n: s.view(shape) for n, s, shape in zip(names, S.split(sizes), shapes, strict=True)}


@pytest.mark.parametrize("which", ["mlp", "cnn"])
@pytest.mark.parametrize("T", [1.0, 200.0])
def test_grasp_matches_explicit_hessian(which, T, tiny_mlp, tiny_data):
    model, data = (tiny_mlp, tiny_data) if which == "mlp" else (small_cnn(), small_cnn_data())
    s = saliency.score(model, "grasp", data=data, temperature=T)
    assert s.cost.samples == 16 and s.cost.backward_passes == 6
    S = reference(model.float(), data, T)
    model.float()
    norm = abs(sum(float(v.sum()) for v in S.values()))
    for n in S:
        # higher = keep: our score is -S, divided by |sum S| as the official code does
        torch.testing.assert_close(s[n].double(), -S[n] / norm, rtol=2e-3, atol=1e-6)


def test_grasp_prunes_what_the_paper_removes(tiny_mlp, tiny_data):
    """allocate removes the lowest scores = the highest S = -w * (H g), the paper's rule."""
    s = saliency.score(tiny_mlp, "grasp", data=tiny_data)
    S = reference(tiny_mlp, tiny_data, 200.0)
    tiny_mlp.float()
    masks = saliency.allocate(s, 0.3)
    flat_S = torch.cat([S[n].reshape(-1) for n in S])
    k = round(0.3 * flat_S.numel())
    threshold = torch.topk(flat_S, k).values[-1]
    for n in S:
        assert torch.equal(~masks[n], S[n] >= threshold), n


def test_grasp_temperature_matters_and_validates(tiny_mlp, tiny_data):
    a = saliency.score(tiny_mlp, "grasp", data=tiny_data, temperature=1.0)
    b = saliency.score(tiny_mlp, "grasp", data=tiny_data, temperature=200.0)
    assert not torch.allclose(a["0.weight"], b["0.weight"])
    with pytest.raises(ValueError, match="temperature must be positive"):
        saliency.get_criterion("grasp", temperature=0)


def test_grasp_channel_scores_are_sums(tiny_mlp, tiny_data):
    """Channel granularity ranks channels by the summed (signed) score: the first-order change
    of the gradient flow when the whole channel goes."""
    s = saliency.score(tiny_mlp, "grasp", data=tiny_data)
    masks = saliency.prune(
        tiny_mlp, "grasp", 0.4, data=tiny_data, granularity="channel", scope="layer", keep=False
    )
    for n, m in masks.items():
        ch = s[n].double().sum(1)
        kept = m.all(1)
        expect = torch.ones_like(kept)
        expect[torch.sort(ch, stable=True).indices[: round(0.4 * len(ch))]] = False
        assert torch.equal(kept, expect), n
