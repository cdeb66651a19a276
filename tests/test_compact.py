"""Channel groups, physical removal of channels (compact) and structured OBS.

Compaction is checked the way a user would: the compacted model's outputs equal the pruned
(masked) model's in float64, on every CNN family of the zoo and a concatenation block.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import saliency
from saliency.zoo import get_model

SHAPE = (3, 16, 16)


def _models():
    return ["resnet20", "vgg_small", "mobilenet_small"]


class Concat(nn.Module):
    """Two branches concatenated (Inception-style), then a conv and a Linear head after flatten."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 1)
        self.bn = nn.BatchNorm2d(10)
        self.c = nn.Conv2d(10, 5, 3, stride=2)
        self.fc = nn.Linear(5 * 7 * 7, 3)

    def forward(self, x):
        h = F.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        return self.fc(torch.flatten(F.relu(self.c(h)), 1))


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = Concat() if name == "concat" else get_model(name, input_shape=SHAPE, num_classes=3)
    model = model.double().eval()
    with torch.no_grad():  # BatchNorm statistics and affine away from their identity defaults
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def _x(n: int = 2) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _targets(model):
    return saliency.prunable_parameters(model, keep_output_dense=True)


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", [*_models(), "concat"])
def test_compact_keeps_outputs_and_shrinks(name):
    pytest.importorskip("torch_pruning")
    model, x = _build(name), _x()
    groups = saliency.channel_groups(model, x, params=_targets(model))
    masks = saliency.prune(model, "magnitude", 0.5, granularity="channel", scope="layer",
                           params=_targets(model), groups=groups)  # fmt: skip
    before = copy.deepcopy(model)
    small = saliency.compact(model, x)
    with torch.no_grad():
        x2 = _x(5)
        assert torch.allclose(small(x2), model(x2), rtol=0, atol=1e-10)
    assert _count(small) < 0.75 * _count(model)
    # the input model is untouched: same weights, masks still attached
    assert all(torch.equal(a, b) for a, b in zip(before.state_dict().values(),
                                                 model.state_dict().values(), strict=True))  # fmt: skip
    assert saliency.attached_masks(model) is not None and 0.35 < masks.sparsity < 0.65


def test_units_are_pruned_whole_and_owned_parameters_zeroed():
    pytest.importorskip("torch_pruning")
    model, x = _build("resnet20"), _x()
    groups = saliency.channel_groups(model, x, params=_targets(model))
    # option-A shortcut: stage-2 channel 8 + j carries stage-1 channel j, one unit
    assert groups["blocks.3.conv2.weight"][8] == groups["conv.weight"][0]
    assert groups["blocks.3.conv2.weight"][0] != groups["blocks.3.conv1.weight"][0]
    masks = saliency.prune(model, "magnitude", 0.4, granularity="channel", scope="layer",
                           params=_targets(model), groups=groups)  # fmt: skip
    dead = groups.pruned_units(masks)
    for n, ids in groups.items():
        kept = masks[n].reshape(len(ids), -1).any(1)
        assert torch.equal(~kept, torch.isin(ids, dead)), n  # never cut unevenly
    bn = model.blocks[6].bn2  # stage 3 of the residual stream
    pruned = torch.isin(groups["blocks.6.conv2.weight"], dead)
    assert pruned.any() and (bn.weight[pruned] == 0).all() and (bn.bias[pruned] == 0).all()
    # fine-tuning keeps them zero: the owned parameters are attached with the masks
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(2):
        F.cross_entropy(model(_x(4)), torch.tensor([0, 1, 2, 0])).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    assert (bn.weight[pruned] == 0).all() and (bn.bias[pruned] == 0).all()
    small = saliency.compact(model, x)
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), rtol=0, atol=1e-10)


def test_depthwise_and_concat_ties():
    pytest.importorskip("torch_pruning")
    model, x = _build("mobilenet_small"), _x()
    g = saliency.channel_groups(model, x)
    # a depthwise conv's channels are its input's: one unit with the pointwise conv before it
    assert torch.equal(g["features.block3.dw.weight"], g["features.block2.pw.weight"])
    assert not set(g["features.block3.pw.weight"].tolist()) & set(
        g["features.block3.dw.weight"].tolist()
    )
    concat = _build("concat")
    g = saliency.channel_groups(concat, x)  # branches of a concatenation stay separate units
    assert not set(g["a.weight"].tolist()) & set(g["b.weight"].tolist())
    assert g.owned["bn.weight"].tolist() == [*g["a.weight"].tolist(), *g["b.weight"].tolist()]


def test_a_unit_with_rows_outside_the_targets_is_not_pruned():
    pytest.importorskip("torch_pruning")
    model, x = _build("resnet20"), _x()
    params = saliency.prunable_parameters(model, exclude=["fc.*", "blocks.0.conv2.*"])
    groups = saliency.channel_groups(model, x, params=params)
    bn = {k: v.clone() for k, v in model.blocks[0].bn2.state_dict().items()}
    saliency.prune(model, "magnitude", 0.5, granularity="channel", scope="layer",
                   params=params, groups=groups)  # fmt: skip
    # the residual stream keeps blocks.0.conv2's rows: none of its units is pruned, so the
    # BatchNorm after that (untargeted) conv is left as it was
    assert all(torch.equal(v, model.blocks[0].bn2.state_dict()[k]) for k, v in bn.items())
    small = saliency.compact(model, x)
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), rtol=0, atol=1e-10)


def test_torch_save_round_trip(tmp_path):
    pytest.importorskip("torch_pruning")
    model, x = _build("resnet20"), _x()
    groups = saliency.channel_groups(model, x, params=_targets(model))
    saliency.prune(model, "magnitude", 0.5, granularity="channel", scope="layer",
                   params=_targets(model), groups=groups)  # fmt: skip
    small = saliency.compact(model, x)
    torch.save(small, tmp_path / "small.pt")
    loaded = torch.load(tmp_path / "small.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
    assert [p.shape for p in loaded.parameters()] == [p.shape for p in small.parameters()]


def test_uneven_and_constant_channels_are_kept_exactly(caplog):
    pytest.importorskip("torch_pruning")
    model, x = _build("resnet20"), _x()
    with torch.no_grad():
        model.blocks[0].conv2.weight[3] = 0  # one member of a residual unit: uneven cut
        model.blocks[1].conv1.weight[5] = 0  # weights zero, but its BatchNorm shift is not
    small = saliency.compact(model, x)
    assert _count(small) == _count(model)
    assert "2 channel unit(s) have zero weight rows but are not dead" in caplog.text
    with torch.no_grad():
        model.blocks[1].bn1.weight[5] = model.blocks[1].bn1.bias[5] = 0  # now dead
    small = saliency.compact(model, x)
    assert small.blocks[1].conv1.out_channels == 15 and small.blocks[1].conv2.in_channels == 15
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), rtol=0, atol=1e-10)


def test_refusals():
    pytest.importorskip("torch_pruning")
    grouped = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3, groups=2), nn.Flatten())
    with pytest.raises(ValueError, match="grouped convolution"):
        saliency.channel_groups(grouped, torch.randn(1, 4, 8, 8))
    # a dead channel that is not zero after the model's activation: caught by the output check
    gated = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sigmoid(), nn.Conv2d(4, 2, 1)).double()
    with torch.no_grad():
        gated[0].weight[1] = 0
        gated[0].bias[1] = 0
    with pytest.raises(saliency.CompactError, match="differ"):
        saliency.compact(gated, _x())


def test_allocate_groups_prune_units_together():
    w = {"a": torch.tensor([[1.0], [5.0], [3.0]]), "b": torch.tensor([[2.0], [2.0], [9.0]])}
    groups = {"a": torch.tensor([0, 1, 2]), "b": torch.tensor([0, 1, 2])}
    masks = saliency.allocate(w, 1 / 3, granularity="channel", groups=groups, reduce="sum")
    assert masks["a"][:, 0].tolist() == masks["b"][:, 0].tolist() == [False, True, True]
    # a plain tensor next to the tied ones is its own layer in layer scope
    w["c"] = torch.tensor([[4.0], [0.5], [7.0]])
    masks = saliency.allocate(w, 1 / 3, granularity="channel", groups=groups, scope="layer")
    assert masks["c"][:, 0].tolist() == [True, False, True]
    assert masks["a"][:, 0].tolist() == masks["b"][:, 0].tolist()
    with pytest.raises(ValueError, match="granularity 'channel'"):
        saliency.allocate(w, 0.5, groups=groups)
    with pytest.raises(ValueError, match="unit ids"):
        saliency.allocate(w, 0.5, granularity="channel", groups={"a": torch.tensor([0, 1])})
    with pytest.raises(ValueError, match="tied"):
        saliency.allocate(w, 0.5, granularity="channel", groups=groups, layer_sparsity={"a": 0.5})


def test_channel_pad_is_the_option_a_shortcut():
    x = torch.randn(2, 16, 8, 8)
    expected = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8))
    assert torch.equal(saliency.ChannelPad(16, 32, 2)(x), expected)


def test_structured_obs_matches_least_squares_brute_force():
    """A linear model with a fixed mixing layer and squared loss: the loss is quadratic in the
    pruned layer, so removing a channel with the joint OBS update must land on the constrained
    least-squares optimum, and its score is the exact loss increase."""
    torch.manual_seed(0)
    n = 40
    X, Y = torch.randn(n, 4, dtype=torch.float64), torch.randn(n, 3, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 3, bias=False)).double()
    A = torch.einsum("jk,si->sjki", model[1].weight.detach(), X).reshape(n * 3, 12)
    b = Y.reshape(-1, 1)
    w_opt = torch.linalg.lstsq(A, b).solution.squeeze(1)
    with torch.no_grad():
        model[0].weight.copy_(w_opt.view(3, 4))

    def loss(w):
        return float(((A @ w - b.squeeze(1)) ** 2).view(n, 3).sum(-1).mean())

    increase, solutions = [], []
    for c in range(3):
        keep = torch.ones(12, dtype=torch.bool)
        keep[4 * c : 4 * c + 4] = False
        w = torch.zeros(12, dtype=torch.float64)
        w[keep] = torch.linalg.lstsq(A[:, keep], b).solution.squeeze(1)
        increase.append(loss(w) - loss(w_opt))
        solutions.append(w)

    def loss_fn(out, y):
        return ((out - y) ** 2).sum(-1).mean()

    kw = dict(hessian="exact", dtype="float64")
    params = {"0.weight": model[0].weight}
    sc = saliency.score(model, "obs_channel", [(X, Y)], loss_fn, params=params, **kw)
    per_channel = sc["0.weight"].double().sum(1)  # each weight holds a share of the cost
    assert torch.allclose(per_channel, torch.tensor(increase, dtype=torch.float64), rtol=1e-5)
    masks = saliency.prune(model, "obs_channel", 1 / 3, [(X, Y)], loss_fn, granularity="channel",
                           params=params, min_layer_channels=0, keep=False, **kw)  # fmt: skip
    best = min(range(3), key=increase.__getitem__)
    assert masks["0.weight"][:, 0].tolist() == [c != best for c in range(3)]
    assert torch.allclose(model[0].weight.detach().reshape(-1), solutions[best], atol=1e-9)


def test_structured_obs_under_kfac_matches_the_dense_kfac_inverse():
    """K-FAC: the channel cost and the joint update over the whole layer equal those computed
    with the explicit damped Kronecker matrix (row-major weights: H = G (x) A + lambda I)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    X, Y = torch.randn(64, 5, dtype=torch.float64), torch.randint(0, 3, (64,))
    params = {"0.weight": model[0].weight}
    sc = saliency.score(model, "obs_channel", [(X, Y)], params=params, hessian="kfac")
    f = sc.extra["obs"].factors["0.weight"]
    Hinv = torch.linalg.inv(torch.kron(f.G, f.A) + f.damping * torch.eye(20, dtype=torch.float64))
    w = model[0].weight.detach().reshape(-1).clone()
    rows = [slice(5 * c, 5 * c + 5) for c in range(4)]
    cost = torch.stack([0.5 * w[q] @ torch.linalg.solve(Hinv[q, q], w[q]) for q in rows])
    assert torch.allclose(sc["0.weight"].double().sum(1), cost, rtol=1e-5)
    c = int(cost.argmin())
    masks = saliency.prune(model, "obs_channel", 1 / 4, [(X, Y)], granularity="channel",
                           params=params, hessian="kfac", keep=False)  # fmt: skip
    assert masks["0.weight"][:, 0].tolist() == [r != c for r in range(4)]
    q = rows[c]
    expected = w - Hinv[:, q] @ torch.linalg.solve(Hinv[q, q], w[q])
    assert torch.allclose(model[0].weight.detach().reshape(-1), expected, atol=1e-6)
