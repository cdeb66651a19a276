"""Curvature against brute force: per-sample loops, autograd Hessians, explicit Jacobians."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from saliency import curvature as C
from saliency import per_sample as P

torch.set_default_dtype(torch.float32)


class Mixed(nn.Module):
    """Linear on [B, T, in] inputs (extra dim), grouped padded Conv2d, Conv1d, LayerNorm (generic
    path), a layer used twice, and a tied weight (generic path)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, groups=2, padding_mode="reflect")
        self.conv1 = nn.Conv1d(4, 3, 2, stride=2, dilation=2)
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


@pytest.mark.parametrize("chunk_elements", [2**23, 60])
def test_per_sample_grads_match_loop(mixed, chunk_elements, monkeypatch):
    monkeypatch.setattr(P, "_CHUNK_ELEMENTS", chunk_elements)  # 60: one sample per chunk
    model, x, y = mixed
    params = dict(model.named_parameters())
    hooked, generic = P._split(model, params)
    # closed forms where they apply, the generic path for LayerNorm; head.weight is also used
    # outside its layer: the hooked factors do not explain its gradient, so it falls back
    assert {n for names in hooked.values() for n in names.values()} >= {"conv.weight", "seq.weight"}
    assert {"norm.weight"} <= set(generic)
    got = P.per_sample_grads(model, params, x, y, F.cross_entropy, chunk_size=2)
    ref = _loop_grads(model, params, x, y, F.cross_entropy)
    for n in params:
        assert got[n].shape == (5, *params[n].shape)
        torch.testing.assert_close(got[n], ref[n], msg=n)
    sq = P.sum_grad_squared(model, params, x, y, F.cross_entropy, chunk_size=2)
    for n in params:
        torch.testing.assert_close(sq[n], (ref[n] ** 2).sum(0), msg=n)


def test_sum_reduction_gives_same_per_sample_grads(mixed):
    model, x, y = mixed
    params = {"conv.weight": model.conv.weight, "norm.bias": model.norm.bias}
    a = P.per_sample_grads(model, params, x, y, F.cross_entropy)
    b = P.per_sample_grads(model, params, x, y, lambda o, t: F.cross_entropy(o, t, reduction="sum"))
    for n in params:
        torch.testing.assert_close(a[n], b[n])


@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_fast_path_matches_loop(which, tiny_mlp, tiny_data, tiny_cnn, cnn_data):
    """No in-place ops, no shared weights: backward only to the layer outputs."""
    model, data = (tiny_mlp, tiny_data) if which == "mlp" else (tiny_cnn, cnn_data)
    x, y = data[0]
    params = dict(model.named_parameters())
    hooked, generic = P._split(model, params)
    with P._Capture(hooked) as cap:
        out = model(x)
    assert not generic and cap.untouched_outputs() and P._sole_uses(out, hooked, cap)
    ref = _loop_grads(model, params, x, y, F.cross_entropy)
    _close(P.per_sample_grads(model, params, x, y, F.cross_entropy), ref, rtol=1e-4, atol=1e-6)
    sq = P.sum_grad_squared(model, params, x, y, F.cross_entropy)
    _close(sq, {n: (g**2).sum(0) for n, g in ref.items()}, rtol=1e-4, atol=1e-6)


def test_model_state_untouched(tiny_cnn, cnn_data):
    x, y = cnn_data[0]
    tiny_cnn.conv.weight.requires_grad_(False)
    stale = torch.ones_like(tiny_cnn.fc.weight)
    tiny_cnn.fc.weight.grad = stale
    params = dict(tiny_cnn.named_parameters())
    g = P.per_sample_grads(tiny_cnn, params, x, y, F.cross_entropy)
    assert g["conv.weight"].abs().sum() > 0
    assert not tiny_cnn.conv.weight.requires_grad and tiny_cnn.fc.weight.grad is stale
    assert all(not m._forward_hooks for m in tiny_cnn.modules())


def test_batchnorm_in_train_mode_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    with pytest.raises(ValueError, match="BatchNorm1d in train mode.*model.eval"):
        P.per_sample_grads(model, dict(model.named_parameters()), x, y, F.cross_entropy)
    model.eval()
    g = P.per_sample_grads(model, dict(model.named_parameters()), x, y, F.cross_entropy)
    assert g["1.weight"].shape == (4, 4)


def test_bad_params_refused(tiny_mlp, tiny_data):
    x, y = tiny_data[0]
    with pytest.raises(ValueError, match="not the parameter of that name"):
        P.per_sample_grads(tiny_mlp, {"w": torch.zeros(3)}, x, y, F.cross_entropy)
    with pytest.raises(ValueError, match="non-empty dict"):
        P.per_sample_grads(tiny_mlp, {}, x, y, F.cross_entropy)
    with pytest.raises(ValueError, match="8 samples but targets hold 3"):
        P.per_sample_grads(tiny_mlp, dict(tiny_mlp.named_parameters()), x, y[:3], F.cross_entropy)


# ----------------------------------------------------------------------------- diagonal curvatures


def _flat_fn(model, names):
    """Loss of the flattened parameters ``names``: for autograd.functional references."""
    shapes = [dict(model.named_parameters())[n].shape for n in names]

    def unflat(v):
        out, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            out[n] = v[i : i + s.numel()].view(s)
            i += s.numel()
        return out

    return unflat


def _reference_hessian_diag(model, params, data, loss_fn):
    """diag of the Hessian of (1/N) sum_n l_n, from torch.autograd.functional.hessian."""
    names = list(params)
    unflat = _flat_fn(model, names)
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    w0 = torch.cat([params[n].detach().reshape(-1) for n in names])

    def f(v):
        out = torch.func.functional_call(model, unflat(v), (x,))
        return torch.stack([loss_fn(out[i : i + 1], y[i : i + 1]) for i in range(len(x))]).mean()

    return unflat(torch.autograd.functional.hessian(f, w0).diagonal())


def _reference_ggn_diag(model, params, data, loss_fn):
    """diag of (1/N) sum_n J_n^T H_n J_n with J_n, H_n built explicitly."""
    names = list(params)
    unflat = _flat_fn(model, names)
    w0 = torch.cat([params[n].detach().reshape(-1) for n in names])
    G, N = 0, 0
    for x, y in data:
        for i in range(len(x)):
            xi, yi = x[i : i + 1], y[i : i + 1]
            shape = (1, *model(xi).shape[1:])

            def f(v, xi=xi):
                return torch.func.functional_call(model, unflat(v), (xi,)).reshape(-1)

            def loss(o, yi=yi, shape=shape):
                return loss_fn(o.view(shape), yi)

            J = torch.autograd.functional.jacobian(f, w0)  # [D, P]
            H = torch.autograd.functional.hessian(loss, f(w0).detach())  # [D, D]
            G = G + J.T @ H @ J
            N += 1
    return unflat((G / N).diagonal())


def _data64(n_batches=2, b=6, d=4, c=3, seed=0, regression=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        x = torch.randn(b, d, generator=g, dtype=torch.float64)
        y = (
            torch.randn(b, c, generator=g, dtype=torch.float64)
            if regression
            else torch.randint(0, c, (b,), generator=g)
        )
        out.append((x, y))
    return out


def _tiny(act=nn.Tanh):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), act(), nn.Linear(5, 3)).double()


def _close(a, b, **kw):
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], msg=n, **kw)


def test_exact_diag_hessian_matches_autograd_functional():
    model, data = _tiny(), _data64()
    params = dict(model.named_parameters())
    ref = _reference_hessian_diag(model, params, data, F.cross_entropy)
    got = C.diag_hessian_exact(model, params, data, backend="autograd", chunk_size=7)
    _close(got, ref)
    assert got.samples == 12 and got.backward_passes == 2 * sum(p.numel() for p in params.values())
    # a custom (non-Sequential) model goes to autograd under "auto"
    mdl = C.diag_hessian_exact(model, params, data, F.cross_entropy, n_samples=6)
    assert mdl.samples == 6


def test_exact_diag_hessian_size_guard_says_why():
    model, data = _tiny(), _data64()
    with pytest.raises(
        ValueError, match="one Hessian-vector product per weight: 43 weights > max_params=10"
    ):
        C.diag_hessian_exact(
            model, dict(model.named_parameters()), data, backend="autograd", max_params=10
        )


@pytest.mark.parametrize("loss", ["ce", "mse", "custom"])
def test_ggn_matches_explicit_jacobians(loss):
    model = _tiny()
    data = _data64(regression=loss != "ce")
    # "custom": a loss without a closed form here (loss Hessians through torch.func.hessian)
    custom = lambda o, t: (torch.log(torch.cosh(o - t))).mean()
    loss_fn = {"ce": F.cross_entropy, "mse": F.mse_loss, "custom": custom}[loss]
    params = dict(model.named_parameters())
    ref = _reference_ggn_diag(model, params, data, loss_fn)
    got = C.diag_ggn(model, params, data, loss_fn, backend="torch")
    _close(got, ref)
    # CE with 3 classes has rank-2 output Hessians: 2 backward passes per batch; the others 3
    assert got.backward_passes == 2 * (2 if loss == "ce" else 3)
    mc = C.diag_ggn(model, params, data, loss_fn, exact=False, mc_samples=200, seed=1)
    for n in ref:
        assert (mc[n] - ref[n]).norm() < 0.2 * ref[n].norm(), n


def test_relu_net_exact_hessian_equals_ggn():
    model, data = _tiny(nn.ReLU), _data64()
    params = dict(model.named_parameters())
    _close(
        C.diag_hessian_exact(model, params, data, backend="autograd"),
        C.diag_ggn(model, params, data, backend="torch"),
    )


def test_empirical_fisher_matches_loop(mixed):
    model, x, y = mixed
    params = dict(model.named_parameters())
    data = [(x[:3], y[:3]), (x[3:], y[3:])]
    ref = _loop_grads(model, params, x, y, F.cross_entropy)
    got = C.diag_fisher(model, params, data, F.cross_entropy)
    _close(got, {n: (g**2).mean(0) for n, g in ref.items()})
    assert got.samples == 5 and got.backward_passes >= 2


def test_true_fisher_categorical_matches_expectation():
    model, data = _tiny(), _data64(n_batches=1, b=100)
    params = dict(model.named_parameters())
    x, y = data[0]
    probs = torch.softmax(model(x), 1).detach()
    exp = {n: 0 for n in params}
    for c in range(3):  # E_y[g(y)^2] = sum_c p_c g(c)^2, per sample
        gs = P.per_sample_grads(model, params, x, torch.full_like(y, c), F.cross_entropy)
        for n, g in gs.items():
            exp[n] = exp[n] + (probs[:, c].view(-1, *[1] * (g.dim() - 1)) * g**2).mean(0)
    got = C.diag_fisher(model, params, data, kind="true", mc_samples=30, seed=0)
    assert got.backward_passes == 30
    for n in params:
        assert (got[n] - exp[n]).norm() < 0.15 * exp[n].norm(), n
    # for cross-entropy the expected Fisher is the GGN
    _close(exp, dict(C.diag_ggn(model, params, data, backend="torch")))
    again = C.diag_fisher(model, params, data, kind="true", mc_samples=30, seed=0)
    _close(got, again, rtol=0, atol=0)


def test_true_fisher_gaussian_tends_to_ggn():
    model, data = _tiny(), _data64(n_batches=1, b=100, regression=True)
    params = dict(model.named_parameters())
    ggn = C.diag_ggn(model, params, data, F.mse_loss, backend="torch")
    got = C.diag_fisher(model, params, data, F.mse_loss, kind="true", mc_samples=30, seed=0)
    for n in params:
        assert (got[n] - ggn[n]).norm() < 0.2 * ggn[n].norm(), n
    with pytest.raises(ValueError, match="likelihood='gaussian' needs a squared-error"):
        C.diag_fisher(model, params, _data64(n_batches=1), kind="true", likelihood="gaussian")


def test_hutchinson_error_shrinks_with_probes():
    model, data = _tiny(), _data64(n_batches=1)
    params = dict(model.named_parameters())
    exact = C.diag_hessian_exact(model, params, data, backend="autograd")
    ref = torch.cat([v.reshape(-1) for v in exact.values()])

    def err(k):
        e = []
        for seed in range(2):
            h = C.diag_hessian_hutchinson(model, params, data, n_probes=k, seed=seed)
            e.append((torch.cat([v.reshape(-1) for v in h.values()]) - ref).norm() / ref.norm())
        return sum(e) / 2

    e2, e128 = err(2), err(128)  # the error falls like 1/sqrt(probes): 8x here
    assert e128 < 0.4 * e2, (e2, e128)
    h = C.diag_hessian_hutchinson(model, params, data, n_probes=3, seed=5)
    _close(h, C.diag_hessian_hutchinson(model, params, data, n_probes=3, seed=5), rtol=0, atol=0)
    assert h.backward_passes == 1 + 3


def test_backpack_paths_agree_with_autograd():
    pytest.importorskip("backpack")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3)
    ).double()
    g = torch.Generator().manual_seed(0)
    data = [
        (
            torch.randn(4, 1, 6, 6, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (4,), generator=g),
        )
        for _ in range(2)
    ]
    params = dict(model.named_parameters())
    assert C.backpack_unsupported(model) is None
    bp = C.diag_hessian_exact(model, params, data, backend="backpack")
    _close(bp, C.diag_hessian_exact(model, params, data, backend="autograd"))
    assert bp.backward_passes == 2
    _close(
        C.diag_ggn(model, params, data, backend="backpack"),
        C.diag_ggn(model, params, data, backend="torch"),
    )
    # MSE: BackPACK's sum-reduced curvature rescaled to the per-sample mean loss
    reg = [(x, torch.randn(4, 3, generator=g, dtype=torch.float64)) for x, _ in data]
    _close(
        C.diag_ggn(model, params, reg, F.mse_loss, backend="backpack"),
        C.diag_ggn(model, params, reg, F.mse_loss, backend="torch"),
    )
    assert all(not hasattr(p, "diag_h") for p in model.parameters())  # the copy was extended


def test_backpack_refusals_name_the_reason(tiny_cnn, cnn_data):
    pytest.importorskip("backpack")
    params = dict(tiny_cnn.named_parameters())
    assert "nn.Sequential" in C.backpack_unsupported(tiny_cnn)
    with pytest.raises(
        ValueError, match="backend='backpack' cannot be used: BackPACK needs an nn.Sequential"
    ):
        C.diag_hessian_exact(tiny_cnn, params, cnn_data, backend="backpack")
    seq = nn.Sequential(nn.Linear(3, 3), nn.GELU())
    assert "GELU" in C.backpack_unsupported(seq)
    assert "cross-entropy and MSE" in C.backpack_unsupported(
        nn.Sequential(nn.Linear(3, 3)), F.l1_loss
    )


def test_bad_arguments(tiny_mlp, tiny_data):
    params = dict(tiny_mlp.named_parameters())
    with pytest.raises(ValueError, match="kind must be 'empirical' or 'true'; got 'model'"):
        C.diag_fisher(tiny_mlp, params, tiny_data, kind="model")
    with pytest.raises(ValueError, match="likelihood must be"):
        C.diag_fisher(tiny_mlp, params, tiny_data, kind="true", likelihood="poisson")
    with pytest.raises(ValueError, match="n_probes must be a positive int; got 0"):
        C.diag_hessian_hutchinson(tiny_mlp, params, tiny_data, n_probes=0)
    with pytest.raises(ValueError, match="mc_samples must be a positive int"):
        C.diag_ggn(tiny_mlp, params, tiny_data, exact=False, mc_samples=0)
    with pytest.raises(ValueError, match="n_samples must be a positive int or None"):
        C.diag_fisher(tiny_mlp, params, tiny_data, n_samples=0)
    with pytest.raises(ValueError, match="needs data"):
        C.diag_fisher(tiny_mlp, params, None)
    with pytest.raises(ValueError, match="max_outputs=2"):
        C.diag_ggn(tiny_mlp, params, tiny_data, backend="torch", max_outputs=2)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 4, (3, 2), stride=(2, 1), dilation=(2, 3), padding=(1, 2)),
        nn.Conv2d(4, 4, 3, padding="same", padding_mode="circular", groups=2),
        nn.Conv1d(3, 2, 3, stride=2, dilation=2, padding=1),
    ],
)
def test_unfold_matches_im2col(conv):
    x = torch.randn(2, conv.in_channels, *([11, 9] if isinstance(conv, nn.Conv2d) else [13]))
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    if isinstance(conv, nn.Conv1d):
        k, d, s = (1, *conv.kernel_size), (1, *conv.dilation), (1, *conv.stride)
        ref = F.unfold(xp.unsqueeze(2), k, dilation=d, stride=s)
    else:
        ref = F.unfold(xp, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    assert torch.equal(P._unfold(conv, x), ref)
    assert ref.shape[-1] == conv(x)[0, 0].numel()


def test_ggn_batched_and_looped_backward_paths(mixed, tiny_cnn, cnn_data):
    """K backward passes run vmapped when no layer output is modified in place (tiny_cnn), and
    one by one otherwise (Mixed: relu_ after a Linear); both against explicit Jacobians."""
    model, x, y = mixed
    params = dict(model.named_parameters())
    data = [(x, y)]
    _close(
        C.diag_ggn(model, params, data, backend="torch"),
        _reference_ggn_diag(model, params, data, F.cross_entropy),
    )
    cnn = tiny_cnn.double()
    data = [(xb[:4].double(), yb[:4]) for xb, yb in cnn_data]
    params = dict(cnn.named_parameters())
    got = C.diag_ggn(cnn, params, data, backend="torch")
    _close(got, _reference_ggn_diag(cnn, params, data, F.cross_entropy))
    assert got.backward_passes == 2 * 2


def test_weight_used_outside_its_layer_falls_back():
    """Without in-place ops the fast path (backward to layer outputs only) is taken unless a
    hooked weight has more uses in the graph than calls of its layer (here: tied)."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            return self.b(h) + h @ self.a.weight.T

    torch.manual_seed(0)
    model = Tied().double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    params = dict(model.named_parameters())
    hooked, _ = P._split(model, params)
    with P._Capture(hooked) as cap:
        out = model(x)
    assert cap.untouched_outputs() and not P._sole_uses(out, hooked, cap)
    assert P._sole_uses(out, {model.b: hooked[model.b]}, cap)
    ref = _loop_grads(model, params, x, y, F.cross_entropy)
    _close(
        P.sum_grad_squared(model, params, x, y, F.cross_entropy),
        {n: (g**2).sum(0) for n, g in ref.items()},
    )
    _close(P.per_sample_grads(model, params, x, y, F.cross_entropy), ref)


@pytest.mark.parametrize("budget", [1, 10_000])
def test_exact_ggn_targets_in_groups_give_the_same_diagonal(
    budget, tiny_cnn, cnn_data, monkeypatch
):
    """The C - 1 backward passes of an exact GGN go in groups that fit `_TARGET_BYTES` (1: one
    target at a time; 10 000: a few), the hooks checked on the first group: the same diagonal
    as explicit Jacobians, also where a tied weight sends a layer to the generic path."""
    monkeypatch.setattr(P, "_TARGET_BYTES", budget)
    cnn = tiny_cnn.double()
    data = [(xb[:4].double(), yb[:4]) for xb, yb in cnn_data]
    params = dict(cnn.named_parameters())
    got = C.diag_ggn(cnn, params, data, backend="torch")
    _close(got, _reference_ggn_diag(cnn, params, data, F.cross_entropy))

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 4)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            return self.b(h) + h @ self.b.weight.T

    torch.manual_seed(0)
    model = Tied().double()
    data = [(torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 4, (6,)))]
    params = dict(model.named_parameters())
    _close(
        C.diag_ggn(model, params, data, backend="torch"),
        _reference_ggn_diag(model, params, data, F.cross_entropy),
    )
