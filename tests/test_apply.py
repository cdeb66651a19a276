import copy
import io
import pickle

import pytest
import torch
import torch.nn.utils.prune as tprune
from torch import nn

import saliency
from saliency import Masks, attach, attached_masks, prunable_parameters, remove


def random_masks(model, sparsity=0.5, seed=0):
    scores = saliency.score(model, "random", seed=seed)
    return saliency.allocate(scores, sparsity)


def pruned_values(model, masks):
    params = dict(model.named_parameters())
    return torch.cat([params[n].detach()[~m] for n, m in masks.items()])


# every optimizer with weight decay (it pulls on pruned entries too) and state (momentum, moments)
MAKE_OPTIMIZER = {
    "sgd-momentum-wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "nesterov": lambda p: torch.optim.SGD(
        p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3
    ),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.9, weight_decay=1e-3),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1, weight_decay=1e-3),
}
OPTIMIZERS = pytest.mark.parametrize(
    "make_opt", list(MAKE_OPTIMIZER.values()), ids=list(MAKE_OPTIMIZER)
)


@OPTIMIZERS
def test_pruned_weights_stay_exactly_zero_through_training(tiny_mlp, make_opt):
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    opt = make_opt(tiny_mlp.parameters())
    # train first so the optimizer holds state for the soon-pruned entries
    for _ in range(20):
        opt.zero_grad()
        nn.functional.cross_entropy(tiny_mlp(x), y).backward()
        opt.step()
    masks = random_masks(tiny_mlp, 0.6)
    attach(tiny_mlp, masks, optimizer=opt)
    kept_before = {n: p.detach().clone() for n, p in prunable_parameters(tiny_mlp).items()}
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(tiny_mlp(x), y).backward()
        for n, p in prunable_parameters(tiny_mlp).items():
            assert not p.grad[~masks[n]].any()
        opt.step()
    assert not pruned_values(tiny_mlp, masks).any()
    # and the kept weights did train
    assert any(not torch.equal(kept_before[n], p) for n, p in prunable_parameters(tiny_mlp).items())


def test_identity_mask_is_a_no_op(tiny_mlp):
    x = torch.randn(5, 6)
    ref = copy.deepcopy(tiny_mlp)
    attach(tiny_mlp, Masks.ones_like(prunable_parameters(tiny_mlp)))
    torch.testing.assert_close(tiny_mlp(x), ref(x), rtol=0, atol=0)
    tiny_mlp(x).sum().backward()
    ref(x).sum().backward()
    for p, q in zip(tiny_mlp.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


def test_parameter_identity_and_state_dict_keys_are_stable(tiny_mlp):
    ids = [id(p) for p in tiny_mlp.parameters()]
    keys = list(tiny_mlp.state_dict())
    attach(tiny_mlp, random_masks(tiny_mlp))
    assert [id(p) for p in tiny_mlp.parameters()] == ids
    assert list(tiny_mlp.state_dict()) == keys


def test_remove_then_load_into_unpruned_copy(mlp):
    fresh = copy.deepcopy(mlp)
    masks = saliency.prune(mlp, "magnitude", 0.7)
    remove(mlp)
    assert attached_masks(mlp) is None and not mlp._forward_pre_hooks
    assert not any("mask" in k for k in mlp.state_dict())
    fresh.load_state_dict(mlp.state_dict())
    assert not pruned_values(fresh, masks).any()
    assert all(not p._post_accumulate_grad_hooks for p in mlp.parameters())


@pytest.mark.parametrize("copier", ["deepcopy", "pickle", "torch.save"])
def test_copies_of_an_attached_model_keep_masks_enforced(tiny_mlp, copier):
    masks = random_masks(tiny_mlp, 0.5)
    attach(tiny_mlp, masks)
    if copier == "deepcopy":
        other = copy.deepcopy(tiny_mlp)
    elif copier == "pickle":
        other = pickle.loads(pickle.dumps(tiny_mlp))
    else:
        buf = io.BytesIO()
        torch.save(tiny_mlp, buf)
        buf.seek(0)
        other = torch.load(buf, weights_only=False)
    assert attached_masks(other) == masks
    opt = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(other(x), y).backward()
        opt.step()
    assert not pruned_values(other, masks).any()
    # the original's hooks were not disturbed
    assert attached_masks(tiny_mlp) == masks


def test_export_to_and_import_from_torch_prune(mlp):
    masks = saliency.prune(mlp, "magnitude", 0.4)
    exported = copy.deepcopy(mlp)
    saliency.to_torch_prune(exported, masks)
    assert hasattr(exported[1], "weight_orig") and hasattr(exported[1], "weight_mask")
    assert saliency.from_torch_prune(exported) == masks
    ref = copy.deepcopy(mlp)
    saliency.remove(ref)
    tprune.l1_unstructured(ref[3], "weight", amount=0.25)
    imported = saliency.from_torch_prune(ref)
    assert list(imported) == ["3.weight"] and imported.sparsity == pytest.approx(0.25, abs=1e-4)
    with pytest.raises(ValueError, match="no torch.nn.utils.prune masks"):
        saliency.from_torch_prune(nn.Linear(2, 2))


def test_masks_follow_to_and_functional_call_is_untouched(tiny_mlp):
    masks = random_masks(tiny_mlp)
    attach(tiny_mlp, masks)
    dense = {n: torch.ones_like(p) for n, p in tiny_mlp.named_parameters()}
    out = torch.func.functional_call(tiny_mlp, dense, (torch.randn(2, 6),))
    assert out.shape == (2, 3) and all(t.eq(1).all() for t in dense.values())
    tiny_mlp.to(torch.float64)
    tiny_mlp(torch.randn(2, 6, dtype=torch.float64))
    assert not pruned_values(tiny_mlp, masks).any()


def test_weight_used_twice_before_backward(tiny_mlp):
    """Siamese / weight-tied use: several forwards, one backward; pruned grads still zero."""
    masks = saliency.prune(tiny_mlp, "magnitude", 0.5)
    x1, x2 = torch.randn(4, 6), torch.randn(4, 6)
    (tiny_mlp(x1).sum() + tiny_mlp(x2).sum()).backward()
    layer = tiny_mlp[0]
    h = x1
    for _ in range(3):  # one module called in a loop
        h = torch.tanh(nn.functional.linear(h[:, :6], layer.weight, layer.bias))
        h = torch.cat([h, h], 1)
    h.sum().backward()
    for n, p in prunable_parameters(tiny_mlp).items():
        assert not p.grad[~masks[n]].any()


@OPTIMIZERS
def test_stale_optimizer_state_cannot_revive_weights_without_optimizer_arg(tiny_mlp, make_opt):
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    opt = make_opt(tiny_mlp.parameters())
    for _ in range(10):
        opt.zero_grad()
        nn.functional.cross_entropy(tiny_mlp(x), y).backward()
        opt.step()
    masks = saliency.prune(tiny_mlp, "magnitude", 0.6)  # no optimizer=: its state is stale
    for _ in range(10):
        opt.zero_grad()
        nn.functional.cross_entropy(tiny_mlp(x), y).backward()
        opt.step()
        # right after the step, before any forward: already exactly zero
        sd = tiny_mlp.state_dict()
        assert not torch.cat([sd[n][~m] for n, m in masks.items()]).any()
    remove(tiny_mlp)
    from saliency import apply as apply_module

    assert not apply_module._ENFORCED and not apply_module._step_hook


def test_tied_weights_are_masked_once_and_every_use_sees_the_zeros():
    from arch_zoo import TiedLM

    torch.manual_seed(0)
    model = TiedLM()
    fresh = copy.deepcopy(model)
    masks = saliency.prune(model, "magnitude", sparsity=0.5)
    assert list(masks) == ["mix.weight", "emb.weight"]
    assert list(attached_masks(model)) == ["emb.weight", "mix.weight"]
    keep = masks["emb.weight"]
    h = torch.randn(2, 4)
    torch.testing.assert_close(model.head(h), h @ (fresh.emb.weight * keep).T)
    # a dense reload is re-zeroed before either use runs, the head's alone included
    model.load_state_dict(fresh.state_dict())
    torch.testing.assert_close(model.head(h), h @ (fresh.emb.weight * keep).T)
    assert not model.emb.weight[~keep].any()
    # gradients from both uses are masked; training keeps the tied zeros
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    tokens = torch.randint(0, 5, (3, 4))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(tokens), tokens).backward()
        assert not model.emb.weight.grad[~keep].any()
        opt.step()
    assert not pruned_values(model, masks).any()
    with pytest.raises(ValueError, match="'head.weight' is 'emb.weight'"):
        attach(model, Masks({"head.weight": keep}))
    # export masks both uses; import gives back the canonical name
    exported = copy.deepcopy(model)
    saliency.to_torch_prune(exported, masks)
    assert saliency.from_torch_prune(exported) == masks
    torch.testing.assert_close(exported.head(h), model.head(h))
    remove(model)
    assert not model._forward_pre_hooks and not model.head._forward_pre_hooks
    fresh.load_state_dict(model.state_dict())
    assert not pruned_values(fresh, masks).any()


def test_weights_used_without_their_module_forward_are_rezeroed():
    """MultiheadAttention reads out_proj.weight without calling out_proj, and in eval mode under
    no_grad a TransformerEncoderLayer runs a fused kernel that calls none of its submodules."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=0.0, batch_first=True)
    model = nn.Sequential(layer).eval()
    dense = copy.deepcopy(model)
    masks = saliency.prune(model, "magnitude", sparsity=0.5)
    assert "0.self_attn.in_proj_weight" in masks
    baked = remove(copy.deepcopy(model))
    model.load_state_dict(dense.state_dict())
    x = torch.randn(3, 5, 4)
    with torch.no_grad():
        torch.testing.assert_close(model(x), baked(x))
    assert not pruned_values(model, masks).any()


def test_frozen_layers_can_be_masked_and_unfrozen_later(tiny_mlp):
    tiny_mlp[0].requires_grad_(False)  # torch refuses gradient hooks on such tensors
    masks = saliency.prune(tiny_mlp, "magnitude", 0.5)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    tiny_mlp[0].requires_grad_(True)
    opt = torch.optim.SGD(tiny_mlp.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(tiny_mlp(x), y).backward()
        assert not tiny_mlp[0].weight.grad[~masks["0.weight"]].any()
        opt.step()
    assert not pruned_values(tiny_mlp, masks).any()
