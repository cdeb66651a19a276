"""OBD: saliency 1/2 H_qq w_q^2 from every curvature, against closed forms and the contract."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import saliency
from saliency import curvature as C

HESSIANS = ["fisher", "true_fisher", "ggn", "hutchinson", "exact"]


def _snapshot(model):
    return (
        copy.deepcopy(model.state_dict()),
        [m.training for m in model.modules()],
        [(p.grad, p.requires_grad) for p in model.parameters()],
        [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
    )


@pytest.mark.parametrize("hessian", HESSIANS)
@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_contract_every_hessian(hessian, which, tiny_mlp, tiny_cnn, tiny_data, cnn_data):
    model, data = (tiny_mlp, tiny_data) if which == "mlp" else (tiny_cnn, cnn_data)
    model.train()
    model(data[0][0]).sum().backward()
    grads = [p.grad for p in model.parameters()]
    before = _snapshot(model)
    params = saliency.prunable_parameters(model)
    kw = {"hessian": hessian, "n_probes": 4, "seed": 3}
    s1 = saliency.score(model, "obd", data=data, **kw)
    s2 = saliency.score(model, "obd", data=data, **kw)
    after = _snapshot(model)
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1] == after[1] and before[3] == after[3]
    assert all(g is a for g, (a, _) in zip(grads, after[2], strict=True))  # .grad objects kept
    assert set(s1) == set(params)
    for n, p in params.items():
        assert s1[n].shape == p.shape and s1[n].is_floating_point()
        assert torch.isfinite(s1[n]).all()
        torch.testing.assert_close(s1[n], s2[n], rtol=0, atol=0)
    assert s1.cost.samples == 16 and s1.cost.backward_passes >= 2
    if hessian in ("fisher", "true_fisher", "ggn"):
        assert all((s >= 0).all() for s in s1.values())


def test_scores_are_half_curvature_times_w2(tiny_mlp, tiny_data):
    params = saliency.prunable_parameters(tiny_mlp)
    F_ = C.diag_fisher(tiny_mlp, params, tiny_data)
    s = saliency.score(tiny_mlp, "obd", data=tiny_data, hessian="fisher")
    for n, p in params.items():
        torch.testing.assert_close(s[n], 0.5 * F_[n] * p.detach() ** 2)
        torch.testing.assert_close(s.extra["hessian_diag"][n], F_[n])


def test_predicts_single_weight_loss_increase_on_least_squares():
    """Quadratic loss at its optimum: zeroing one weight raises the loss by 1/2 H_qq w_q^2."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 3, generator=g, dtype=torch.float64)
    y = X @ torch.tensor([[1.5], [-0.7], [0.2]], dtype=torch.float64) + 0.3 * torch.randn(
        40, 1, generator=g, dtype=torch.float64
    )
    model = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(X, y).solution.T)
    data = [(X[:20], y[:20]), (X[20:], y[20:])]
    loss = lambda: float(F.mse_loss(model(X), y))
    base = loss()
    for hessian in ("exact", "ggn", "true_fisher"):
        kw = {"mc_samples": 2000} if hessian == "true_fisher" else {}
        s = saliency.score(model, "obd", data, F.mse_loss, hessian=hessian, **kw)["weight"]
        for q in range(3):
            w = model.weight.detach().clone()
            with torch.no_grad():
                model.weight[0, q] = 0
            rise = loss() - base
            with torch.no_grad():
                model.weight.copy_(w)
            tol = 1e-9 if hessian != "true_fisher" else 0.1 * rise
            assert abs(float(s[0, q]) - rise) <= tol, (hessian, q)


def test_eval_mode_for_batchnorm_and_train_mode_refusal():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    model.train()
    running = model[1].running_mean.clone()
    s = saliency.score(model, "obd", data=data, hessian="fisher")
    assert model.training and torch.equal(model[1].running_mean, running)
    assert s["0.weight"].shape == (5, 4)
    with pytest.raises(ValueError, match="BatchNorm1d in train mode"):
        saliency.score(model, "obd", data=data, hessian="fisher", eval_mode=False)


def test_with_attached_masks(tiny_mlp, tiny_data):
    masks = saliency.prune(tiny_mlp, "magnitude", 0.5)
    s = saliency.score(tiny_mlp, "obd", data=tiny_data, hessian="fisher")
    for n, m in masks.items():
        assert (s[n][~m] == 0).all()  # pruned weights are zero: no saliency left


def test_bad_hyperparameters(tiny_mlp, tiny_data):
    with pytest.raises(ValueError, match="hessian must be one of fisher, .*kfac_true; got 'diag'"):
        saliency.get_criterion("obd", hessian="diag")
    with pytest.raises(ValueError, match="backend must be"):
        saliency.get_criterion("obd", backend="jax")
    with pytest.raises(TypeError, match="no hyperparameter"):
        saliency.get_criterion("obd", probes=3)
    with pytest.raises(ValueError, match="needs data"):
        saliency.score(tiny_mlp, "obd")
    with pytest.raises(ValueError, match="max_params=10"):
        saliency.score(
            tiny_mlp, "obd", data=tiny_data, hessian="exact", backend="torch", max_params=10
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("hessian", HESSIANS)
def test_cuda_matches_cpu(hessian, tiny_cnn, cnn_data):
    kw = {"hessian": hessian, "n_probes": 4, "seed": 0}
    cpu = saliency.score(
        tiny_cnn.double(), "obd", data=[(x.double(), y) for x, y in cnn_data], **kw
    )
    gpu_model = copy.deepcopy(tiny_cnn).cuda()
    gpu = saliency.score(gpu_model, "obd", data=[(x.double(), y) for x, y in cnn_data], **kw)
    for n in cpu:
        assert gpu[n].is_cuda
        if hessian in ("fisher", "ggn", "exact"):  # random draws differ between devices
            torch.testing.assert_close(gpu[n].cpu(), cpu[n])
