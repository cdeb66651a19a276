"""Non-uniform layer sparsities (OWL, a global OBS budget) for the layer-wise solvers."""

from __future__ import annotations

import pytest
import torch

import saliency
from saliency import capture, layer_sparsity

transformers = pytest.importorskip("transformers")


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).double().eval()
    with torch.no_grad():  # outliers: a few large input channels in block 1
        model.model.layers[1].self_attn.q_proj.weight[:, :2] *= 30
    ids = torch.randint(0, 40, (6, 10), generator=torch.Generator().manual_seed(1))
    return model, [{"input_ids": ids, "labels": ids}]


def _weighted_mean(sp, params):
    return sum(sp[n] * params[n].numel() for n in sp) / sum(params[n].numel() for n in sp)


def test_block_of_names_the_repeated_block():
    assert layer_sparsity.block_of("model.layers.3.mlp.up_proj.weight") == "model.layers.3"
    assert layer_sparsity.block_of("transformer.h.10.attn.c_attn.weight") == "transformer.h.10"
    assert layer_sparsity.block_of("head.weight") == "head.weight"


def test_owl_averages_to_the_target_and_keeps_more_of_the_outlier_block():
    model, data = _llama()
    params = saliency.prunable_parameters(model)
    sp = layer_sparsity.owl_sparsity(model, params, data, 0.6, lam=0.1)
    assert _weighted_mean(sp, params) == pytest.approx(0.6, abs=1e-12)
    by_block = {layer_sparsity.block_of(n): v for n, v in sp.items()}
    assert len(set(by_block.values())) == 3 and max(by_block.values()) - min(
        by_block.values()
    ) == pytest.approx(0.2)
    assert by_block["model.layers.1"] == min(by_block.values())  # the most outliers


def test_owl_outlier_ratio_by_hand():
    """One block's ratio: the share of |W_ij| ||X_j|| above M times the layer's mean."""
    model, data = _llama()
    params = saliency.prunable_parameters(model)
    stats = saliency.layerwise.dense_stats(model, params, data, n_samples=None, diag_only=True)
    mods = capture.layer_modules(model, params)
    ratios = {}
    for n, st in stats.items():
        s = capture.weight_matrix(mods[n]).detach().abs() * st.H.sqrt()[None]
        b = layer_sparsity.block_of(n)
        k, t = ratios.get(b, (0, 0))
        ratios[b] = (k + int((s > 5 * s.mean()).sum()), t + s.numel())
    r = {b: k / t for b, (k, t) in ratios.items()}
    lo, hi = min(r.values()), max(r.values())
    D = {b: (v - lo) / (hi - lo) * 0.16 for b, v in r.items()}
    mean = _weighted_mean({n: D[layer_sparsity.block_of(n)] for n in params}, params)
    got = layer_sparsity.owl_sparsity(model, params, data, 0.5, n_samples=None)
    for n in params:
        assert got[n] == pytest.approx(0.5 - D[layer_sparsity.block_of(n)] + mean, abs=1e-12)


def test_obs_budget_is_exact_and_prune_takes_the_allocation_option():
    model, data = _llama()
    params = saliency.prunable_parameters(model)
    sp = layer_sparsity.obs_budget_sparsity(model, params, data, 0.5)
    total = sum(p.numel() for p in params.values())
    assert round(_weighted_mean(sp, params) * total) == round(0.5 * total)
    assert len(set(sp.values())) > 1  # not uniform
    assert all(0.42 - 1e-9 <= v <= 0.58 + 1e-9 for v in sp.values())  # lam = 0.08
    free = layer_sparsity.obs_budget_sparsity(model, params, data, 0.5, lam=None)
    assert round(_weighted_mean(free, params) * total) == round(0.5 * total)
    assert max(free.values()) - min(free.values()) >= max(sp.values()) - min(sp.values())
    for how in ("owl", "obs"):
        m = saliency.prune(model, "wanda", 0.5, data=data, scope="layer", allocation=how,
                           keep=False)  # fmt: skip
        zeros = sum(int((~v).sum()) for v in m.values())
        assert abs(zeros - 0.5 * total) <= len(params)  # each layer rounds to whole weights
        model, data = _llama()


def test_allocation_is_refused_where_it_does_not_apply():
    model, data = _llama()
    with pytest.raises(ValueError, match="layer-wise solvers"):
        saliency.prune(model, "magnitude", 0.5, data=data, allocation="owl")
    with pytest.raises(ValueError, match="allocation must be"):
        saliency.prune(model, "wanda", 0.5, data=data, scope="layer", allocation="nope")
    with pytest.raises(ValueError, match="outside"):
        layer_sparsity.owl_sparsity(model, saliency.prunable_parameters(model), data, 0.02)
