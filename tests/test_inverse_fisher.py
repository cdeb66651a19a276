"""Block inverse Fisher (WoodFisher) and exact inverse Hessian against explicit references."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from saliency.inverse_fisher import alive_masks, block_inverse_fisher, exact_inverse_hessian


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _data(n=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=g
    )


def _weights(model):
    return {n: p for n, p in model.named_parameters() if n.endswith("weight")}


def _explicit_fisher(model, p, x, y):
    """(1/m) sum_n g_n g_n^T of one tensor, from a per-sample autograd loop."""
    gs = []
    for i in range(len(x)):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        gs.append(torch.autograd.grad(loss, p)[0].reshape(-1))
    G = torch.stack(gs)
    return G.T @ G / len(x)


@pytest.mark.parametrize("scope", ["layer", "block"])
@pytest.mark.parametrize("B", [8, 35, 64])
def test_blocks_match_inverse_of_explicit_damped_fisher(B, scope):
    model, (x, y) = _mlp(), _data()
    params = _weights(model)
    inv = block_inverse_fisher(
        model, params, [(x[:10], y[:10]), (x[10:], y[10:])], block_size=B, damp=0.05,
        dtype="float64", chunk_size=7, damp_scope=scope,
    )  # fmt: skip
    for blk in inv.blocks:
        (n,) = blk.names
        Fx = _explicit_fisher(model, params[n], x, y)
        P = Fx.shape[0]
        for b in range(blk.Hinv.shape[0]):
            sl = slice(b * B, min(P, (b + 1) * B))  # the last block is partial (5*7=35, 7*3=21)
            Fb = Fx[sl, sl]
            lam = 0.05 * (Fb if scope == "block" else Fx).diagonal().mean()
            ref = torch.linalg.inv(Fb + lam * torch.eye(len(Fb), dtype=Fb.dtype))
            k = sl.stop - sl.start
            torch.testing.assert_close(blk.Hinv[b, :k, :k], ref, rtol=1e-8, atol=1e-10)
            torch.testing.assert_close(blk.damping[b], lam)
    assert inv.samples == 24


def test_woodbury_matches_cholesky_and_absolute_damping():
    model, (x, y) = _mlp(), _data()
    kw = dict(block_size=16, damp=0.0, damp_absolute=1e-3, dtype="float64")
    a = block_inverse_fisher(model, _weights(model), [(x, y)], **kw)
    b = block_inverse_fisher(model, _weights(model), [(x, y)], method="woodbury", **kw)
    for ba, bb in zip(a.blocks, b.blocks, strict=True):
        torch.testing.assert_close(ba.Hinv, bb.Hinv, rtol=1e-7, atol=1e-9)
        assert torch.all(ba.damping == 1e-3)


def test_float32_close_to_float64():
    model, (x, y) = _mlp(), _data()
    a = block_inverse_fisher(model, _weights(model), [(x, y)], block_size=16, dtype="float64")
    b = block_inverse_fisher(model, _weights(model), [(x, y)], block_size=16, dtype="float32")
    for ba, bb in zip(a.blocks, b.blocks, strict=True):
        assert bb.Hinv.dtype == torch.float32
        err = (bb.Hinv.double() - ba.Hinv).abs().max() / ba.Hinv.abs().max()
        assert err < 1e-4


def test_pruned_weights_are_conditioned_out():
    model, (x, y) = _mlp(), _data()
    params = _weights(model)
    with torch.no_grad():
        params["0.weight"].view(-1)[[1, 4, 9]] = 0.0
    alive = alive_masks(model, params)
    assert int((~alive["0.weight"]).sum()) == 3
    Fx = _explicit_fisher(model, params["0.weight"], x, y)[:16, :16]
    inv = block_inverse_fisher(
        model, params, [(x, y)], block_size=16, dtype="float64", damp_scope="block"
    )
    K = torch.tensor([i for i in range(16) if i not in (1, 4, 9)])
    FK = Fx[K][:, K]
    ref = torch.linalg.inv(FK + 0.01 * FK.diagonal().mean() * torch.eye(len(K), dtype=Fx.dtype))
    H0 = inv.blocks[0].Hinv[0]
    torch.testing.assert_close(H0[K][:, K], ref)
    assert torch.all(H0[[1, 4, 9]][:, K] == 0) and torch.all(H0[[1, 4, 9], [1, 4, 9]] == 1)


def test_exact_inverse_matches_autograd_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(30, 3, dtype=torch.float64), torch.randn(30, 2, dtype=torch.float64)
    params = _weights(model)
    names, shapes = list(params), [p.shape for p in params.values()]

    def loss(flat):
        parts = [t.view(s) for t, s in zip(flat.split([12, 8]), shapes, strict=True)]
        w = dict(zip(names, parts, strict=True))
        return F.mse_loss(torch.func.functional_call(model, w, (x,)), y)

    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
    H = torch.autograd.functional.hessian(loss, flat)
    damp = 0.1 + 2 * float((-torch.linalg.eigvalsh(H)[0]).clamp(min=0) / H.diagonal().mean())
    lam = damp * H.diagonal().mean()
    inv = exact_inverse_hessian(model, params, [(x, y)], F.mse_loss, damp=damp)
    ref = torch.linalg.inv(H + lam * torch.eye(20, dtype=H.dtype))
    torch.testing.assert_close(inv.blocks[0].Hinv[0], ref)
    if damp > 0.1:  # indefinite (not at a minimum): refused without enough damping
        with pytest.raises(ValueError, match="not positive definite"):
            exact_inverse_hessian(model, params, [(x, y)], F.mse_loss)
    with pytest.raises(ValueError, match="max_params"):
        exact_inverse_hessian(model, params, [(x, y)], F.mse_loss, max_params=10)


def test_model_state_untouched():
    model, (x, y) = _mlp(), _data()
    model.train()
    params = _weights(model)
    params["0.weight"].requires_grad_(False)
    g = torch.ones_like(params["2.weight"])
    params["2.weight"].grad = g
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    block_inverse_fisher(model, params, [(x, y)], block_size=8)
    assert model.training and params["2.weight"].grad is g and params["2.weight"].grad.eq(1).all()
    assert not params["0.weight"].requires_grad and params["2.weight"].requires_grad
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"block_size": 0}, "block_size"),
        ({"damp": -1.0}, "damp"),
        ({"method": "lu"}, "method"),
        ({"dtype": "half"}, "dtype"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"damp": 0.0, "block_size": 35}, "positive definite"),  # 35 > 24 samples: singular
    ],
)
def test_bad_input(kw, match):
    model, (x, y) = _mlp(), _data()
    with pytest.raises(ValueError, match=match):
        block_inverse_fisher(model, _weights(model), [(x, y)], **kw)
    with pytest.raises(ValueError, match="data"):
        block_inverse_fisher(model, _weights(model), None)
