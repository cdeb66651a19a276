import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import saliency
from saliency.sweep.train import evaluate, make_loader, resolve_device, train


def blobs(n=96, seed=0):
    """Three separable Gaussian blobs in 6 dimensions."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 6, generator=g) * 0.3 + F.one_hot(y, 6).float() * 2
    return TensorDataset(x, y)


def small_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_make_loader_covers_everything_seeded():
    ds = TensorDataset(torch.arange(10).float(), torch.arange(10))
    order = lambda seed: torch.cat([y for _, y in make_loader(ds, 3, True, seed)]).tolist()
    assert sorted(order(0)) == list(range(10))
    assert order(0) == order(0) and order(0) != order(1)
    assert [len(y) for _, y in make_loader(ds, 4, False)] == [4, 4, 2]
    assert torch.cat([y for _, y in make_loader(ds, 4, False)]).tolist() == list(range(10))
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(ds, 0, False)


@pytest.mark.parametrize("optimizer,lr", [("adam", 1e-2), ("sgd", 0.1), ("adamw", 1e-2)])
def test_training_learns_and_is_deterministic(optimizer, lr):
    ds = blobs()
    a, b = small_mlp(), small_mlp()
    before = evaluate(a, ds, task="classification", device="cpu")
    hist = train(a, ds, epochs=8, batch_size=16, lr=lr, optimizer=optimizer, seed=1, device="cpu")
    train(b, ds, epochs=8, batch_size=16, lr=lr, optimizer=optimizer, seed=1, device="cpu")
    after = evaluate(a, ds, task="classification", device="cpu")
    assert hist["steps"] == 8 * 6 and len(hist["epoch_loss"]) == 8
    assert hist["epoch_loss"][-1] < hist["epoch_loss"][0]
    assert after["loss"] < before["loss"] and after["accuracy"] > 0.9
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert all(p.grad is None for p in a.parameters())


def test_on_step_gets_every_step_index():
    seen = []
    train(small_mlp(), blobs(40), epochs=3, batch_size=16, device="cpu", on_step=seen.append)
    assert seen == list(range(9))


def test_on_epoch_can_stop_training():
    seen = []
    hist = train(
        small_mlp(),
        blobs(40),
        epochs=10,
        batch_size=16,
        device="cpu",
        on_epoch=lambda e, loss: seen.append((e, loss)) or e == 2,
    )
    assert [e for e, _ in seen] == [0, 1, 2] and hist["steps"] == 9
    assert [loss for _, loss in seen] == hist["epoch_loss"]


def test_restores_training_mode():
    m = small_mlp().eval()
    train(m, blobs(16), epochs=1, batch_size=8, device="cpu")
    assert not m.training
    m.train()
    evaluate(m, blobs(16), device="cpu")
    assert m.training


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_attached_masks_stay_zero(optimizer):
    ds = blobs()
    m = small_mlp()
    train(m, ds, epochs=2, batch_size=16, optimizer=optimizer, lr=0.05, device="cpu")
    masks = saliency.prune(m, "magnitude", 0.6)
    train(
        m,
        ds,
        epochs=3,
        batch_size=16,
        optimizer=optimizer,
        lr=0.05,
        weight_decay=1e-2,
        momentum=0.9,
        device="cpu",
    )
    params = dict(m.named_parameters())
    for n, keep in masks.items():
        assert torch.all(params[n][~keep] == 0)
        assert torch.all(params[n][keep] != 0)


def test_gradual_pruning_through_on_step():
    ds = blobs()
    m = small_mlp()
    pruner = saliency.GradualPruner(
        m, "magnitude", saliency.PolynomialDecay(0.2, 0.8, 0, 10, frequency=2)
    )
    train(m, ds, epochs=3, batch_size=16, device="cpu", on_step=lambda s: pruner.step())
    assert pruner.masks.sparsity == pytest.approx(0.8, abs=0.01)
    params = dict(m.named_parameters())
    assert all(torch.all(params[n][~k] == 0) for n, k in pruner.masks.items())


def test_masks_returned_by_on_step_clear_optimizer_state():
    """Pruning mid-training with Adam: the moments of newly pruned weights are zeroed, so the
    weights stay exactly 0 after every step, not only at the next forward."""
    ds = blobs()
    m = small_mlp()
    pruner = saliency.GradualPruner(
        m, "magnitude", saliency.PolynomialDecay(0.3, 0.7, 2, 8, frequency=3)
    )
    params = dict(m.named_parameters())
    bad = []

    def on_step(step):
        masks = pruner.step()
        return masks

    def check(step):
        if pruner.masks is not None:
            bad.extend(n for n, k in pruner.masks.items() if torch.any(params[n][~k] != 0))

    # check right after the optimizer step that follows a pruning step, before any forward
    seen = []
    train(
        m,
        ds,
        epochs=2,
        batch_size=16,
        lr=0.05,
        device="cpu",
        on_step=lambda s: (check(s), seen.append(s), on_step(s))[-1],
    )
    assert seen and not bad


def test_evaluate_against_a_manual_loop():
    ds = blobs(50)
    m = small_mlp()
    x, y = ds.tensors
    with torch.no_grad():
        out = m(x)
    got = evaluate(m, ds, task="classification", batch_size=7, device="cpu")
    assert got["accuracy"] == pytest.approx(float((out.argmax(1) == y).float().mean()))
    assert got["loss"] == pytest.approx(float(F.cross_entropy(out, y)), rel=1e-5)


def test_regression_train_and_mse():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(128, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 3.0, 0.5]) + 0.5
    ds = TensorDataset(x, y)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    with torch.no_grad():
        ref = float(((m(x).squeeze(1) - y) ** 2).mean())
    before = evaluate(m, ds, task="regression", batch_size=50, device="cpu")
    assert set(before) == {"mse"} and before["mse"] == pytest.approx(ref, rel=1e-5)
    train(m, ds, epochs=30, batch_size=16, lr=1e-2, task="regression", device="cpu")
    assert evaluate(m, ds, task="regression", device="cpu")["mse"] < 0.1 * ref


def test_bad_arguments():
    with pytest.raises(ValueError, match="optimizer.*'rmsprop'"):
        train(small_mlp(), blobs(8), epochs=1, optimizer="rmsprop", device="cpu")
    with pytest.raises(ValueError, match="task.*'ranking'"):
        train(small_mlp(), blobs(8), epochs=1, task="ranking", device="cpu")
    with pytest.raises(ValueError, match="epochs"):
        train(small_mlp(), blobs(8), epochs=-1, device="cpu")
