"""K-FAC factors, inverse and OBS update against explicit Kronecker matrices and per-sample loops."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import saliency
from saliency import kfac


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _loop_factors(model, layer, x, y, loss):
    """A = (1/N) sum_n (1/T) sum_t a a^T, G = (1/N) sum_n sum_t g g^T by a per-sample loop."""
    A = G = 0
    for n in range(len(x)):
        seen = {}
        h = layer.register_forward_hook(lambda m, i, o, seen=seen: seen.update(a=i[0], s=o))
        try:
            out = model(x[n : n + 1])
        finally:
            h.remove()
        (g,) = torch.autograd.grad(loss(out, y[n : n + 1]), seen["s"])
        if isinstance(layer, nn.Linear):
            a, g = seen["a"].reshape(-1, layer.in_features), g.reshape(-1, layer.out_features)
        else:
            a = F.unfold(seen["a"], layer.kernel_size, padding=layer.padding)[0].T
            g = g[0].reshape(layer.out_channels, -1).T
        A = A + a.T @ a / len(a)
        G = G + g.T @ g
    return A / len(x), G / len(x)


class Net(nn.Module):
    def __init__(self, seq=False):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 16, 4)
        self.seq = seq

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def test_factors_match_a_per_sample_loop_for_linear_conv_and_sequences():
    torch.manual_seed(0)
    model = Net().eval()
    x, y = torch.randn(5, 2, 4, 4), torch.randint(0, 4, (5,))
    params = {"conv.weight": model.conv.weight, "fc.weight": model.fc.weight}
    K = kfac.kfac_factors(model, params, [(x, y)], F.cross_entropy, damp=0.0)
    for n, layer in (("conv.weight", model.conv), ("fc.weight", model.fc)):
        A, G = _loop_factors(model, layer, x, y, F.cross_entropy)
        torch.testing.assert_close(K.factors[n].A, A, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(K.factors[n].G, G, rtol=1e-10, atol=1e-12)
    seq = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Flatten(), nn.Linear(8, 2)).eval()
    xs, ys = torch.randn(4, 2, 3), torch.randint(0, 2, (4,))
    K = kfac.kfac_factors(seq, {"0.weight": seq[0].weight}, [(xs, ys)], F.cross_entropy)
    A, G = _loop_factors(seq, seq[0], xs, ys, F.cross_entropy)
    torch.testing.assert_close(K.factors["0.weight"].A, A)
    torch.testing.assert_close(K.factors["0.weight"].G, G)


def test_inverse_diagonal_matvec_and_update_match_the_explicit_kronecker_matrix():
    torch.manual_seed(1)
    A = torch.randn(5, 5)
    G = torch.randn(3, 3)
    f = kfac.KroneckerFactors(A @ A.T, G @ G.T, torch.Size([3, 5]), damping=0.3)
    H = torch.kron(f.G, f.A) + 0.3 * torch.eye(15)  # row-major vec of [out, in]
    Hinv = torch.linalg.inv(H)
    torch.testing.assert_close(f.inv_diag().reshape(-1), torch.diagonal(Hinv))
    V = torch.randn(3, 5)
    torch.testing.assert_close(f.matvec(V).reshape(-1), H @ V.reshape(-1))
    w = torch.randn(3, 5)
    keep = torch.rand(3, 5) > 0.6
    Q = ~keep.reshape(-1)
    dw = -Hinv[:, Q] @ torch.linalg.solve(Hinv[Q][:, Q], w.reshape(-1)[Q])
    want = (w.reshape(-1) + dw).reshape(3, 5)
    torch.testing.assert_close(kfac.masked_solve(f, w, keep), want * keep)
    # each output row's diagonal block of the inverse (greedy selection runs on these)
    blocks = torch.stack([Hinv[5 * j : 5 * j + 5, 5 * j : 5 * j + 5] for j in range(3)])
    torch.testing.assert_close(f.row_inverse(slice(0, 3)), blocks)
    torch.testing.assert_close(f.row_inverse(slice(1, 2)), blocks[1:2])


def test_kfac_greedy_selection_runs_greedy_on_the_row_blocks_of_its_inverse():
    from saliency.criteria.obs import OBS, greedy_scores

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    data = [(torch.randn(40, 6), torch.randint(0, 3, (40,)))]
    params = saliency.prunable_parameters(model)
    crit = OBS(hessian="kfac", selection="greedy")
    scores = saliency.score(model, crit, data=data)
    for n, p in params.items():
        f = scores.extra["obs"].factors[n]
        w = p.detach().double()
        Hinv = torch.linalg.inv(torch.kron(f.G, f.A) + f.damping * torch.eye(w.numel()))
        d = w.shape[1]
        blocks = torch.stack([Hinv[d * j : d * j + d, d * j : d * j + d] for j in range(len(w))])
        want = greedy_scores(blocks, w, torch.ones_like(w, dtype=torch.bool))
        torch.testing.assert_close(scores[n].double(), want, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("fisher", ["empirical", "true"])
def test_undamped_kfac_obs_on_one_output_least_squares_lands_on_the_refit(fisher):
    """One output: G is a scalar, A (x) G = c * X^T X / N, the Hessian up to a scalar, so OBS's
    update is the least-squares refit on the kept features."""
    torch.manual_seed(0)
    X = torch.randn(200, 8)
    y = X @ torch.randn(8, 1) + 0.1 * torch.randn(200, 1)
    m = nn.Sequential(nn.Linear(8, 1, bias=False))
    m[0].weight.data = torch.linalg.lstsq(X, y).solution.T.clone()
    masks = saliency.prune(
        m, "obs", 0.5, [(X, y)], F.mse_loss, hessian="kfac", damp=0.0, fisher=fisher, keep=False
    )
    keep = masks["0.weight"][0]
    ref = torch.zeros(8)
    ref[keep] = torch.linalg.lstsq(X[:, keep], y).solution[:, 0]
    torch.testing.assert_close(m[0].weight[0].detach(), ref, rtol=1e-9, atol=1e-12)


def test_kfac_obs_and_obd_scores_and_their_joint_prediction():
    torch.manual_seed(0)
    model = Net().eval()
    x, y = torch.randn(16, 2, 4, 4), torch.randint(0, 4, (16,))
    s = saliency.score(model, "obs", [(x, y)], hessian="kfac", selection="single")
    K = s.extra["obs"]
    for n, p in saliency.prunable_parameters(model).items():
        want = p.detach() ** 2 / (2 * K.factors[n].inv_diag())
        torch.testing.assert_close(s[n].double(), want, rtol=1e-6, atol=0)
    d = saliency.score(model, "obd", [(x, y)], hessian="kfac")
    for n in d:
        f = K.factors[n]
        torch.testing.assert_close(d[n], 0.5 * (f.diag() - f.damping) * model.get_parameter(n) ** 2)
    from saliency.criteria.obs import predicted_increase

    masks = saliency.allocate(s, 0.5)
    pred = predicted_increase(K, saliency.prunable_parameters(model), masks)
    assert pred["joint"] > 0 and pred["single"] > 0


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 3)
        self.b.weight = nn.Parameter(torch.randn(3, 4))
        self.c = nn.Linear(4, 3)
        self.c.weight = self.b.weight

    def forward(self, x):
        return self.b(self.a(x)) + self.c(x)


class Transposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # [B, L, D]: fc sees the sequence axis first
        return self.head(self.fc(x.transpose(0, 1)).transpose(0, 1).mean(1))


@pytest.mark.parametrize(
    "make, x, params, match",
    [
        (lambda: nn.Sequential(nn.Linear(4, 3)), torch.randn(5, 4), ["0.bias"], "not biases"),
        (Shared, torch.randn(5, 4), ["b.weight"], "held by exactly one module"),
        (Transposed, torch.randn(3, 3, 4), ["fc.weight"], "did not prove"),
        (
            lambda: nn.Sequential(nn.Conv1d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(8, 3)),
            torch.randn(5, 4, 4),
            ["0.weight"],
            "groups=2",
        ),
        (
            lambda: nn.Sequential(nn.ConvTranspose1d(4, 3, 2), nn.Flatten(), nn.Linear(15, 3)),
            torch.randn(5, 4, 4),
            ["0.weight"],
            "no closed form",
        ),
    ],
)
def test_kfac_refuses_layouts_where_its_factors_are_undefined(make, x, params, match):
    model = make().double().eval()
    x = x.double()
    named = dict(model.named_parameters())
    y = torch.randint(0, 3, (len(x),))
    with pytest.raises(ValueError, match=match):
        saliency.score(model, "obs", [(x, y)], hessian="kfac", params={n: named[n] for n in params})


def test_kfac_leaves_the_model_untouched_and_keeps_pruned_weights_zero():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    before = copy.deepcopy(model.state_dict())
    saliency.score(model, "obs", [(x, y)], hessian="kfac", fisher="true", mc_samples=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    m1 = saliency.prune(model, "obs", 0.5, [(x, y)], hessian="kfac", keep=False)
    m2 = saliency.prune(model, "obs", 0.8, [(x, y)], hessian="kfac", current=m1, keep=False)
    for n, p in saliency.prunable_parameters(model).items():
        assert bool((p[~m2[n]] == 0).all()) and not bool((m2[n] & ~m1[n]).any())


def test_eigh_failure_falls_back_to_jittered_float64(monkeypatch, caplog):
    from saliency import kfac

    g = torch.Generator().manual_seed(0)
    X = torch.randn(3, 20, generator=g, dtype=torch.float64)
    A = X.T @ X  # rank 3 of 20, as a factor from few samples
    G = torch.eye(2, dtype=torch.float64)
    real, calls = torch.linalg.eigh, []

    def flaky(M, *args, **kwargs):
        calls.append(len(M))
        if len(calls) == 1:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return real(M, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    f = kfac.KroneckerFactors(A, G, torch.Size([2, 20]), damping=1e-3)
    assert calls == [20, 20, 2] and "failed to converge" in caplog.text
    s, U = real(A)
    assert torch.allclose(f.UA @ torch.diag(f.sA) @ f.UA.T, A, atol=1e-9)
    assert torch.allclose(f.sA, s.clamp(min=0), atol=1e-9)

    def broken(M, *args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    with pytest.raises(ValueError, match=r"20 x 20 factor failed even in float64"):
        kfac.KroneckerFactors(A, G, torch.Size([2, 20]))
