"""Layer-wise solvers on models: capture layouts, sequential propagation, what is left untouched."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import saliency
from saliency import capture, solvers
from saliency.zoo.text import CharGPT


def _mlp_data(n=128, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, d, generator=g), torch.zeros(n, dtype=torch.long))]


def test_sequential_propagation_calibrates_layer_two_on_pruned_layer_one():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8))
    ref = copy.deepcopy(model).double()
    data = _mlp_data()
    saliency.prune(model, "sparsegpt", 0.5, data=data, scope="layer", keep=False, block_size=8)
    # reference, by hand: solve layer 1 on X, then layer 2 on the outputs of the pruned layer 1
    x = data[0][0].double()
    W1, _ = solvers.sparsegpt(ref[0].weight, 2 * x.T @ x / len(x), (0.5, None), block_size=8)
    h = F.relu(x @ W1.T + ref[0].bias)
    W2, _ = solvers.sparsegpt(ref[2].weight, 2 * h.T @ h / len(h), (0.5, None), block_size=8)
    torch.testing.assert_close(model[0].weight, W1.float())
    torch.testing.assert_close(model[2].weight, W2.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("conv", [
    nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, (3, 2), stride=2, dilation=(1, 2)),
    nn.Conv2d(3, 4, 3, padding="same"),
])  # fmt: skip
def test_conv_rows_times_weight_matrix_is_the_convolution(conv):
    x = torch.randn(2, 3, 9, 8)
    y = conv(x) - conv.bias[None, :, None, None]
    rows = capture.input_rows(conv, x)
    got = (rows @ capture.weight_matrix(conv).T).view(2, y.shape[2], y.shape[3], 4)
    torch.testing.assert_close(got.permute(0, 3, 1, 2), y, rtol=1e-5, atol=1e-5)
    W = capture.weight_matrix(conv)
    assert torch.equal(capture.from_matrix(conv, W), conv.weight)


def test_conv_nm_groups_run_along_input_channels_as_allocate():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 4))
    data = [(torch.randn(16, 4, 6, 6), torch.zeros(16, dtype=torch.long))]
    masks = saliency.prune(model, "obc", None, data=data, scope="layer", granularity="2:4")
    keep = masks["0.weight"]  # [out, in, kh, kw]: 2 of every 4 input channels at each position
    assert bool((keep.sum(1) == 2).all())
    assert bool((model[0].weight[~keep] == 0).all())


def _gpt():
    torch.manual_seed(0)
    return CharGPT(vocab=20, seq_len=16, d=16, layers=2, heads=2)


def _tokens(n=32):
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 20, (n, 16), generator=g)
    return [(x, x)]


def test_attention_q_k_v_share_one_capture_and_blocks_run_in_order():
    from saliency.layerwise import _groups
    from saliency.model_io import Batch

    model = _gpt()
    params = saliency.prunable_parameters(model, exclude=["head.weight"])
    batch = Batch.of(_tokens()[0])
    groups, _ = _groups(model, capture.layer_modules(model, params), batch)
    assert groups[:4] == [
        ["blocks.0.attn.q.weight", "blocks.0.attn.k.weight", "blocks.0.attn.v.weight"],
        ["blocks.0.attn.o.weight"], ["blocks.0.fc1.weight"], ["blocks.0.fc2.weight"],
    ]  # fmt: skip
    assert len(groups) == 8


@pytest.mark.parametrize(
    ("crit", "granularity"),
    [("obc", "element"), ("sparsegpt", "element"), ("sparsegpt", "2:4"), ("wanda", "4:8")],
)
def test_transformer_pruned_layers_only_and_state_restored(crit, granularity):
    model = _gpt()
    model.train()
    before = copy.deepcopy(model.state_dict())
    params = saliency.prunable_parameters(model, exclude=["head.weight"])
    sparsity = 0.5 if granularity == "element" else None
    masks = saliency.prune(model, crit, sparsity, data=_tokens(), scope="layer",
                           granularity=granularity, params=params, keep=False)  # fmt: skip
    assert masks.sparsity == 0.5 and set(masks) == set(params)
    after = model.state_dict()
    for k, v in before.items():
        if k in params:
            assert not torch.equal(v, after[k]) and bool((after[k][~masks[k]] == 0).all()), k
        else:
            assert torch.equal(v, after[k]), k  # biases, norms, embeddings, head: untouched
    assert model.training and all(m.training for m in model.modules())
    assert not any(m._forward_pre_hooks for m in model.modules())  # no hooks left


def test_layer_sparsity_overrides_and_old_zeros():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8))
    data = _mlp_data()
    first = saliency.prune(model, "wanda", 0.25, data=data, scope="layer")
    masks = saliency.prune(model, "sparsegpt", 0.5, data=data, scope="layer",
                           layer_sparsity={"2.weight": 0.75})  # fmt: skip
    assert masks.layer_sparsity() == {"0.weight": 0.5, "2.weight": 0.75}
    assert not any(bool((masks[n] & ~first[n]).any()) for n in masks)


def test_refusals_name_the_problem():
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    with pytest.raises(ValueError, match="in_proj_weight.*MultiheadAttention.*exclude it"):
        capture.layer_modules(mha, saliency.prunable_parameters(mha))
    model = nn.Sequential(nn.Linear(12, 4))
    with pytest.raises(ValueError, match="pass scope='layer'"):
        saliency.prune(model, "sparsegpt", 0.5, data=_mlp_data())
    with pytest.raises(ValueError, match="granularity 'element' or 'N:M'"):
        saliency.prune(model, "obc", 0.5, data=_mlp_data(), scope="layer", granularity="channel")
    with pytest.raises(ValueError, match="n_samples must be"):
        saliency.get_criterion("wanda", n_samples=0)
    with pytest.raises(ValueError, match="layer '0.weight'.*damp > 0"):
        saliency.prune(model, "obc", 0.5, data=_mlp_data(n=4), scope="layer", damp=0.0)


def test_pydoc_chars_and_char_gpt_shapes():
    from saliency import zoo

    ds = zoo.get_dataset("pydoc_chars")
    x, y = ds.train[:2]
    assert x.shape == y.shape == (2, 64) and torch.equal(x[0, 1:], y[0, :-1])
    model = zoo.get_model("char_gpt", input_shape=ds.input_shape, num_classes=ds.num_classes)
    assert model(x).shape == (2, ds.num_classes, 64)
