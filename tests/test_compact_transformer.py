"""Physical removal of heads, MLP neurons and blocks of Hugging Face transformers.

Checked the way a user would: units are removed with masks attached through `saliency.attach`
(`unit_masks`), the compacted model's outputs and greedy generations equal the masked model's
in float64, and save_pretrained reloads it (plain transformers where the config states the
widths, `saliency.load_compacted` where they differ per layer).
"""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch
from torch import nn

import saliency
from saliency.structures import removed_units, unit_masks

transformers = pytest.importorskip("transformers")

V = 50  # vocabulary


def _random(model: nn.Module) -> nn.Module:
    """float64, eval, all parameters random (nonzero biases: a removed unit's in biases go)."""
    torch.manual_seed(0)
    model = model.double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


def llama(kv_heads: int = 2, layers: int = 3) -> nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=kv_heads, vocab_size=V, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    return _random(transformers.LlamaForCausalLM(config))


def gpt2(layers: int = 3) -> nn.Module:
    config = transformers.GPT2Config(
        n_embd=16, n_head=4, n_layer=layers, n_inner=24, vocab_size=V, n_positions=64,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    return _random(transformers.GPT2LMHeadModel(config))


def bert() -> nn.Module:
    config = transformers.BertConfig(
        hidden_size=16, num_attention_heads=4, num_hidden_layers=2, intermediate_size=24,
        vocab_size=V, max_position_embeddings=64, num_labels=3,
    )  # fmt: skip
    return _random(transformers.BertForSequenceClassification(config))


def _ids(n: int = 2, t: int = 6) -> torch.Tensor:
    return torch.randint(2, V, (n, t), generator=torch.Generator().manual_seed(1))


def _remove(model: nn.Module, example, removed: dict[tuple[int, str], list[int]]):
    """Attach masks removing units ``{(block, "head" | "neuron"): ids}``; the structure."""
    s = saliency.find_structure(model, example)
    index = {(g.block, g.kind): i for i, g in enumerate(s.groups)}
    by_group = {index[key]: torch.tensor(ids) for key, ids in removed.items()}
    saliency.attach(model, unit_masks(s, dict(model.named_parameters()), by_group))
    return s


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _same(a, b):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def _generate(model, ids, use_cache):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                          do_sample=False, use_cache=use_cache)  # fmt: skip


def _widths(model, layers):
    return [(m.weight.shape, d.weight.shape) for m, d in layers]


# ------------------------------------------------------------------ LLaMA (GQA and MHA)


def test_llama_gqa_nonuniform_kv_group_neurons_and_block(tmp_path):
    model, ids = llama(kv_heads=2), _ids()
    # block 0: KV group 1 of 2 (query heads 2, 3) and 5 neurons; block 1: everything; block 2:
    # 8 neurons
    cut = {(0, "head"): [1], (0, "neuron"): list(range(5)), (1, "head"): [0, 1]}
    cut |= {(1, "neuron"): list(range(24)), (2, "neuron"): list(range(3, 11))}
    _remove(model, ids, cut)
    small = saliency.compact_transformer(model, ids)
    assert saliency.attached_masks(model) is not None  # the original is untouched
    assert saliency.attached_masks(small) is None
    assert len(model.model.layers) == 3 and len(small.model.layers) == 2
    assert small.config.num_hidden_layers == 2 and model.config.num_hidden_layers == 3
    a0, a1 = (layer.self_attn for layer in small.model.layers)
    assert [a0.layer_idx, a1.layer_idx] == [0, 1]
    assert a0.q_proj.weight.shape == (8, 16) and a0.k_proj.weight.shape == (4, 16)
    assert a0.o_proj.weight.shape == (16, 8) and a0.o_proj.in_features == 8
    assert a0.num_key_value_groups == 2 == a1.num_key_value_groups
    assert small.model.layers[0].mlp.down_proj.weight.shape == (16, 19)
    assert small.model.layers[1].mlp.intermediate_size == 16
    assert small.config.saliency_layer_widths == [
        {"num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 19},
        {"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 16},
    ]
    _same(_logits(small, ids), _logits(model, ids))
    for use_cache in (True, False):
        assert torch.equal(_generate(small, ids, use_cache), _generate(model, ids, use_cache))

    small.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="mismatch"):  # plain transformers refuses, loudly
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    again = saliency.load_compacted(tmp_path)
    assert not again.training and again.dtype == torch.float64
    _same(_logits(again, ids), _logits(model, ids))
    assert torch.equal(_generate(again, ids, True), _generate(model, ids, True))
    via, masks = saliency.load_pretrained(tmp_path)
    assert masks is None
    _same(_logits(via, ids), _logits(model, ids))


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_llama_uniform_reloads_in_plain_transformers(kv_heads, tmp_path):
    model, ids = llama(kv_heads=kv_heads), _ids()
    heads = [1] if kv_heads == 2 else [0, 3]  # two query heads either way
    cut = {(b, "head"): heads for b in range(3)}
    cut |= {(b, "neuron"): list(range(b, b + 8)) for b in range(3)}
    _remove(model, ids, cut)
    small = saliency.compact_transformer(model, ids)
    cfg = small.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (2, kv_heads // 2)
    assert (cfg.head_dim, cfg.intermediate_size, cfg.num_hidden_layers) == (4, 16, 3)
    assert not hasattr(cfg, "saliency_layer_widths")
    small.save_pretrained(tmp_path)
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert plain.dtype == torch.float64
    _same(_logits(plain, ids), _logits(model, ids))
    assert torch.equal(_generate(plain, ids, True), _generate(model, ids, True))
    assert saliency.load_compacted(tmp_path).config.num_attention_heads == 2


def test_llama_three_of_four_heads_needs_the_loader(tmp_path):
    """LlamaConfig refuses hidden_size % num_attention_heads != 0 (16 % 3): widths recorded."""
    model, ids = llama(kv_heads=4, layers=2), _ids()
    _remove(model, ids, {(0, "head"): [2], (1, "head"): [0]})
    small = saliency.compact_transformer(model, ids)
    assert small.config.num_attention_heads == 4  # the config keeps its (valid) widths
    assert [w["num_attention_heads"] for w in small.config.saliency_layer_widths] == [3, 3]
    small.save_pretrained(tmp_path)
    _same(_logits(saliency.load_compacted(tmp_path), ids), _logits(model, ids))


def test_qwen2_block_removal_shortens_layer_types(tmp_path):
    """A per-layer config list (sliding-window layers) follows the removed block."""
    config = transformers.Qwen2Config(
        hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=V, use_sliding_window=True, sliding_window=4,
        max_window_layers=1, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    model, ids = _random(transformers.Qwen2ForCausalLM(config)), _ids()
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    _remove(model, ids, {(0, "head"): [1], (1, "head"): [0, 1], (1, "neuron"): list(range(24))})
    small = saliency.compact_transformer(model, ids)
    assert small.config.layer_types == ["full_attention", "sliding_attention"]
    assert [layer.self_attn.layer_idx for layer in small.model.layers] == [0, 1]
    for use_cache in (True, False):  # 6 + 5 tokens: past the sliding window of 4
        assert torch.equal(_generate(small, ids, use_cache), _generate(model, ids, use_cache))
    small.save_pretrained(tmp_path)
    again = saliency.load_compacted(tmp_path, transformers.AutoModelForCausalLM)
    assert again.config.layer_types == small.config.layer_types
    _same(_logits(again, ids), _logits(model, ids))


# ------------------------------------------------------------------ GPT-2 (Conv1D, fused c_attn)


def test_gpt2_heads_neurons_and_block(tmp_path):
    model, ids = gpt2(), _ids()
    with torch.no_grad():  # block 1 is an identity only if its out biases are zero too
        model.transformer.h[1].attn.c_proj.bias.zero_()
        model.transformer.h[1].mlp.c_proj.bias.zero_()
    _remove(model, ids, {(0, "head"): [1, 2], (0, "neuron"): [0, 5, 7], (1, "head"): [0, 1, 2, 3],
                         (1, "neuron"): list(range(24)), (2, "head"): [3]})  # fmt: skip
    small = saliency.compact_transformer(model, ids)
    assert len(small.transformer.h) == 2 and small.config.n_layer == 2
    a0, a1 = (block.attn for block in small.transformer.h)
    assert a0.c_attn.weight.shape == (16, 24) and a0.c_attn.nf == 24
    assert (a0.num_heads, a0.split_size, a0.head_dim) == (2, 8, 4)
    assert a0.c_proj.weight.shape == (8, 16) and a0.c_proj.nx == 8
    assert (a1.num_heads, a1.layer_idx) == (3, 1)
    assert small.transformer.h[0].mlp.c_fc.weight.shape == (16, 21)
    assert small.config.n_head == 4  # a GPT-2 config cannot hold fewer heads of width 4
    _same(_logits(small, ids), _logits(model, ids))
    for use_cache in (True, False):
        assert torch.equal(_generate(small, ids, use_cache), _generate(model, ids, use_cache))
    small.save_pretrained(tmp_path)
    again = saliency.load_compacted(tmp_path)
    assert again.lm_head.weight is again.transformer.wte.weight  # still tied
    _same(_logits(again, ids), _logits(model, ids))


def test_gpt2_uniform_neurons_reload_in_plain_transformers(tmp_path):
    model, ids = gpt2(layers=2), _ids()
    _remove(model, ids, {(b, "neuron"): list(range(2 * b, 2 * b + 6)) for b in range(2)})
    small = saliency.compact_transformer(model, ids)
    assert small.config.n_inner == 18 and not hasattr(small.config, "saliency_layer_widths")
    small.save_pretrained(tmp_path)
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    _same(_logits(plain, ids), _logits(model, ids))


def test_gpt2_block_with_an_out_bias_is_kept():
    model, ids = gpt2(layers=2), _ids()  # random c_proj biases: the block adds them
    _remove(model, ids, {(0, "head"): [0, 1, 2, 3], (0, "neuron"): list(range(24))})
    small = saliency.compact_transformer(model, ids)
    assert len(small.transformer.h) == 2
    assert small.transformer.h[0].attn.num_heads == 1  # one zero head kept
    assert small.transformer.h[0].mlp.c_fc.nf == 1
    _same(_logits(small, ids), _logits(model, ids))


# ------------------------------------------------------------------ BERT (post-norm)


def test_bert_units_removed_blocks_kept(tmp_path):
    model, ids = bert(), _ids()
    with torch.no_grad():  # zero out biases: still no identity, LayerNorm follows the sum
        for layer in model.bert.encoder.layer:
            layer.attention.output.dense.bias.zero_()
            layer.output.dense.bias.zero_()
    _remove(model, ids, {(0, "head"): [0, 1, 2, 3], (0, "neuron"): list(range(24)),
                         (1, "head"): [2], (1, "neuron"): [1, 4, 9]})  # fmt: skip
    small = saliency.compact_transformer(model, ids)
    assert small.config.num_hidden_layers == 2 == len(small.bert.encoder.layer)
    s0, s1 = (layer.attention.self for layer in small.bert.encoder.layer)
    assert (s0.num_attention_heads, s0.all_head_size, s0.query.out_features) == (1, 4, 4)
    assert (s1.num_attention_heads, s1.all_head_size) == (3, 12)
    assert small.bert.encoder.layer[1].intermediate.dense.weight.shape == (21, 16)
    _same(_logits(small, ids), _logits(model, ids))
    small.save_pretrained(tmp_path)
    _same(_logits(saliency.load_compacted(tmp_path), ids), _logits(model, ids))


# ------------------------------------------------------------------ what is kept, what is refused


def test_unit_cut_unevenly_is_kept():
    model, ids = llama(kv_heads=4, layers=2), _ids()
    s = saliency.find_structure(model, ids)
    with torch.no_grad():  # half of head 1's o_proj columns: not a removed unit
        model.model.layers[0].self_attn.o_proj.weight[:, 4:6] = 0
    assert removed_units(model, s)[0].numel() == 0
    small = saliency.compact_transformer(model, ids, s)
    assert small.model.layers[0].self_attn.o_proj.weight.shape == (16, 16)
    _same(_logits(small, ids), _logits(model, ids))


def test_nothing_removed_is_a_plain_copy():
    model, ids = llama(layers=2), _ids()
    small = saliency.compact_transformer(model, ids)
    assert small is not model
    assert {n: p.shape for n, p in small.named_parameters()} == {
        n: p.shape for n, p in model.named_parameters()
    }
    assert small.config.num_attention_heads == 4 and small.config.intermediate_size == 24


def test_refuses_a_model_without_blocks():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = types.SimpleNamespace(head_dim=2)
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 4)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    with pytest.raises(ValueError, match="no repeated blocks"):
        saliency.compact_transformer(Flat(), torch.randn(2, 4))


def test_refuses_another_models_structure():
    ids = _ids()
    other = saliency.find_structure(gpt2(layers=2), ids)
    with pytest.raises(ValueError, match="structure does not fit the model"):
        saliency.compact_transformer(llama(layers=2), ids, other)


def test_a_structure_that_is_not_the_models_fails_the_check():
    model, ids = llama(kv_heads=4, layers=2), _ids()
    s = _remove(model, ids, {(0, "head"): [1]})
    g = s.groups[0]
    q = f"{g.inputs[0]}.weight"
    dim, ix = g.slices[q]
    wrong = dataclasses.replace(g, slices={**g.slices, q: (dim, ix.roll(1, 0))})
    with pytest.raises(saliency.CompactError, match="differ"):
        saliency.compact_transformer(
            model, ids, dataclasses.replace(s, groups=(wrong, *s.groups[1:]))
        )


def test_float32_round_off_is_checked_again_in_float64(monkeypatch):
    """A float32 check that fails (a model near collapse amplifies round-off) is repeated on
    float64 copies: a right structure passes there, a wrong one still fails."""
    import importlib

    ct = importlib.import_module("saliency.compact_transformer")

    exact = ct._check_same

    def strict_in_float32(reference, got):
        if reference.dtype == torch.float32:
            raise saliency.CompactError("differ (float32 round-off, simulated)")
        exact(reference, got)

    monkeypatch.setattr(ct, "_check_same", strict_in_float32)
    model, ids = llama(kv_heads=4, layers=2).float(), _ids()
    s = _remove(model, ids, {(0, "head"): [1]})
    small = saliency.compact_transformer(model, ids, s)
    assert next(small.parameters()).dtype == torch.float32
    g = s.groups[0]
    q = f"{g.inputs[0]}.weight"
    dim, ix = g.slices[q]
    wrong = dataclasses.replace(g, slices={**g.slices, q: (dim, ix.roll(1, 0))})
    with pytest.raises(saliency.CompactError, match="differ"):
        saliency.compact_transformer(
            model, ids, dataclasses.replace(s, groups=(wrong, *s.groups[1:]))
        )


def test_public_api():
    for name in ("find_structure", "compact_transformer", "load_compacted"):
        assert name in saliency.__all__ and callable(getattr(saliency, name))
