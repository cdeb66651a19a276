"""transformers' Conv1D (a Linear whose weight is stored [in, out]) as a target.

The oracle is layout: a model built with Conv1D layers and the same model with nn.Linear(W.T)
compute the same function, so every score, mask and solved weight of a Conv1D weight must be
the transpose of its Linear twin's.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import saliency
from saliency import fastpaths
from saliency.criteria import available_criteria
from saliency.per_sample import per_sample_grads

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

SOLVERS = ("obc", "sparsegpt", "wanda")


class Net(nn.Module):
    """[B, T, 4] -> Conv1D/Linear(4, 8) -> tanh -> Conv1D/Linear(8, 3) -> mean over T."""

    def __init__(self, conv1d: bool):
        super().__init__()
        make = (lambda i, o: Conv1D(o, i)) if conv1d else nn.Linear
        self.a, self.b = make(4, 8), make(8, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).mean(1)


def twins():
    """(Conv1D model, the same function with nn.Linear(W.T)), float64."""
    torch.manual_seed(0)
    conv = Net(True).double()
    lin = Net(False).double()
    with torch.no_grad():
        for name in ("a", "b"):
            c, lyr = getattr(conv, name), getattr(lin, name)
            c.weight.normal_()
            c.bias.normal_(std=0.1)
            lyr.weight.copy_(c.weight.T)
            lyr.bias.copy_(c.bias)
    return conv, lin


def batch(n=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 2, 4, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=g
    )


def transposed(d):
    return {n: v.T for n, v in d.items()}


def test_twins_compute_the_same_function():
    conv, lin = twins()
    x, _ = batch()
    torch.testing.assert_close(conv(x), lin(x))
    assert list(saliency.prunable_parameters(conv)) == ["a.weight", "b.weight"]
    assert saliency.targets.channel_layout(conv, saliency.prunable_parameters(conv)) == {
        "a.weight": (1, 1),
        "b.weight": (1, 1),
    }
    assert fastpaths.closed_form_reason(conv.a, "weight") is None  # the hooked closed form


def test_per_sample_gradients_are_the_transposed_linear_ones_and_exact():
    conv, lin = twins()
    x, y = batch()
    gc = per_sample_grads(conv, dict(conv.named_parameters()), x, y, F.cross_entropy)
    gl = per_sample_grads(lin, dict(lin.named_parameters()), x, y, F.cross_entropy)
    for n in ("a.weight", "b.weight"):
        torch.testing.assert_close(gc[n], gl[n].transpose(1, 2))
    for i in range(3):  # against one backward per sample
        loss = F.cross_entropy(conv(x[i : i + 1]), y[i : i + 1])
        ref = torch.autograd.grad(loss, [conv.a.weight, conv.b.weight, conv.a.bias])
        for n, r in zip(("a.weight", "b.weight", "a.bias"), ref, strict=True):
            torch.testing.assert_close(gc[n][i], r)


# random per element draws in storage order (no layout to match): its per-channel draws are
# layout-aware. OBS's WoodFisher blocks are runs of the flattened weight: a block of 32 covers
# each layer whole, so the blocks of both twins hold the same weights
HPARAMS = {"random": {"per": "channel"}, "obs": {"block_size": 32, "dtype": "float64"}}
EXTRA = [
    ("obs", {"hessian": "kfac"}),
    ("obs", {"hessian": "kfac", "selection": "greedy"}),
    ("obd", {"hessian": "kfac"}),
    ("obd", {"hessian": "ggn"}),
    ("obd", {"hessian": "true_fisher"}),
    ("obs_channel", {"hessian": "fisher", "block_size": 32, "dtype": "float64"}),
]
CASES = [(c, HPARAMS.get(c, {})) for c in available_criteria("element") if c not in SOLVERS] + EXTRA


@pytest.mark.parametrize(("criterion", "hparams"), CASES, ids=lambda v: str(v))
def test_scores_are_the_transposes_of_the_linear_twin(criterion, hparams):
    conv, lin = twins()
    data = [batch()]
    sc = saliency.score(conv, criterion, data, F.cross_entropy, **hparams)
    sl = saliency.score(lin, criterion, data, F.cross_entropy, **hparams)
    assert set(sc) == {"a.weight", "b.weight"}
    for n in sc:
        torch.testing.assert_close(sc[n], sl[n].T, rtol=1e-4, atol=1e-10)


@pytest.mark.parametrize(
    ("criterion", "granularity", "kw"),
    [
        ("magnitude", "channel", {}),
        ("magnitude", "2:4", {}),
        ("magnitude", "block", {"block": (2, 2)}),
        ("magnitude", "block", {"block": (3, 2), "pooling": "max"}),
        ("taylor", "channel", {}),
        ("obs_channel", "channel", {}),
        ("obs", "element", {"hessian": "kfac"}),  # the K-FAC OBS update, transposed
        ("obs", "2:4", {"block_size": 32, "dtype": "float64"}),
        ("random", "channel", {}),
    ],
)
def test_masks_and_updates_are_the_transposes(criterion, granularity, kw):
    conv, lin = twins()
    data = [batch()]
    sparsity = None if ":" in granularity else 0.5
    mc = saliency.prune(
        conv, criterion, sparsity, data, F.cross_entropy, granularity=granularity, **kw
    )
    ml = saliency.prune(
        lin, criterion, sparsity, data, F.cross_entropy, granularity=granularity, **kw
    )
    for n in mc:
        assert torch.equal(mc[n], ml[n].T), n
    torch.testing.assert_close(conv.a.weight, lin.a.weight.T)
    torch.testing.assert_close(conv.b.weight, lin.b.weight.T)
    if granularity == "channel":  # whole output channels: columns of a Conv1D weight
        for n in mc:
            cols = mc[n].all(0) | ~mc[n].any(0)
            assert bool(cols.all()) and not bool(mc[n].all())
    if granularity == "2:4":  # groups of 4 consecutive inputs: along dim 0 of [in, out]
        for n in mc:
            assert (mc[n].T.reshape(mc[n].shape[1], -1, 4).sum(-1) == 2).all()


def test_allocate_on_a_conv1d_layout_is_the_linear_allocation_transposed():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(8, 12, generator=g)  # a Linear's [out, in] scores
    layout = {"w": (1, 1)}
    for gran, kw in [("channel", {}), ("2:4", {}), ("block", {"block": (2, 3)}), ("element", {})]:
        sp = None if ":" in gran else 0.4
        ref = saliency.allocate({"w": s}, sp, granularity=gran, **kw)["w"]
        got = saliency.allocate({"w": s.T}, sp, granularity=gran, channel_layout=layout, **kw)["w"]
        assert torch.equal(got, ref.T), gran


@pytest.mark.parametrize("criterion", SOLVERS)
@pytest.mark.parametrize("granularity", ["element", "2:4"])
def test_layerwise_solvers_give_the_transposed_result(criterion, granularity):
    conv, lin = twins()
    data = [batch(64)]
    sparsity = None if granularity == "2:4" else 0.5
    kw = dict(scope="layer", granularity=granularity)
    mc = saliency.prune(conv, criterion, sparsity, data, **kw)
    ml = saliency.prune(lin, criterion, sparsity, data, **kw)
    for n in mc:
        assert torch.equal(mc[n], ml[n].T), n
    torch.testing.assert_close(conv.a.weight, lin.a.weight.T)
    torch.testing.assert_close(conv.b.weight, lin.b.weight.T)
    assert 0 < mc.sparsity < 1


# ----------------------------------------------------------------------------- GPT-2


def gpt2(tie=True):
    cfg = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64, n_positions=32,
                                  tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def last_token_loss(logits, targets):
    return F.cross_entropy(logits[:, -1], targets)


def lm_data(n=8):
    g = torch.Generator().manual_seed(2)
    return [(torch.randint(0, 64, (n, 6), generator=g), torch.randint(0, 64, (n,), generator=g))]


CONV1D = [f"transformer.h.{i}.{m}.weight" for i in range(2)
          for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]  # fmt: skip


def test_gpt2_targets_are_its_conv1d_weights_not_the_tied_head():
    model = gpt2()
    assert list(saliency.prunable_parameters(model)) == CONV1D
    with_head = saliency.prunable_parameters(model, include_head=True)
    assert list(with_head) == [*CONV1D, "transformer.wte.weight"]  # the head's place: last
    untied = gpt2(tie=False)
    assert list(saliency.prunable_parameters(untied)) == CONV1D
    assert list(saliency.prunable_parameters(untied, include_head=True)) == [
        *CONV1D,
        "lm_head.weight",
    ]
    # an explicit include is the user's choice: the head rule does not apply
    assert list(saliency.prunable_parameters(model, include="lm_head.weight")) == [
        "transformer.wte.weight"
    ]


def test_magnitude_on_gpt2_prunes_the_blocks_and_not_the_embedding():
    model = gpt2()
    wte = model.transformer.wte.weight.detach().clone()
    masks = saliency.prune(model, "magnitude", 0.5)
    assert list(masks) == CONV1D
    assert torch.equal(model.transformer.wte.weight, wte)
    params = dict(model.named_parameters())
    zeros = sum(int((params[n] == 0).sum()) for n in CONV1D)
    assert zeros == round(0.5 * sum(params[n].numel() for n in CONV1D))


@pytest.mark.parametrize("criterion", available_criteria("element"))
def test_every_criterion_prunes_gpt2s_conv1d_weights(criterion):
    model = gpt2()
    data = lm_data()
    if criterion == "synflow":  # an all-ones input has no meaning for token ids: refused
        with pytest.raises(ValueError, match="real-valued input"):
            saliency.prune(model, criterion, 0.5, data, last_token_loss, scope="layer")
        return
    masks = saliency.prune(model, criterion, 0.5, data, last_token_loss, scope="layer")
    assert list(masks) == CONV1D
    params = dict(model.named_parameters())
    for n in CONV1D:
        assert float((params[n] == 0).double().mean()) >= 0.5 - 1e-9, n
        assert masks.layer_sparsity()[n] == pytest.approx(0.5, abs=0.01), n


def test_gpt2_per_sample_gradients_use_the_closed_form_exactly():
    model = gpt2()
    ((x, y),) = lm_data(4)
    params = {n: p for n, p in model.named_parameters() if n in CONV1D}
    for n in params:  # every Conv1D weight is hooked (closed form), none generic
        mod = model.get_submodule(n.rsplit(".", 1)[0])
        assert fastpaths.closed_form_reason(mod, "weight") is None
    g = per_sample_grads(model, params, x, y, last_token_loss)
    for i in range(len(x)):
        loss = last_token_loss(model(x[i : i + 1]).logits, y[i : i + 1])
        ref = torch.autograd.grad(loss, list(params.values()))
        for n, r in zip(params, ref, strict=True):
            torch.testing.assert_close(g[n][i], r)


def test_layerwise_solvers_leave_the_untied_head_dense_unless_asked():
    model = gpt2(tie=False)
    head = model.lm_head.weight.detach().clone()
    masks = saliency.prune(model, "wanda", 0.5, lm_data(), scope="layer")
    assert list(masks) == CONV1D and torch.equal(model.lm_head.weight, head)
    model = gpt2(tie=False)
    params = saliency.prunable_parameters(model, include_head=True)
    masks = saliency.prune(model, "sparsegpt", 0.5, lm_data(), scope="layer", params=params)
    assert "lm_head.weight" in masks


def test_channel_groups_and_compact_refuse_conv1d_clearly():
    pytest.importorskip("torch_pruning")
    model = gpt2()
    ((x, _),) = lm_data(2)
    with pytest.raises(ValueError, match="Conv1D"):
        saliency.channel_groups(model, x)
    with pytest.raises(ValueError, match="Conv1D"):
        saliency.compact(model, x)
