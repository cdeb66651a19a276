"""The batch formats model_io owns: tensors, tuples, mappings of model keyword arguments (Hugging
Face dicts with labels), their losses, and padding left out of every statistic."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import saliency
from saliency import curvature, fastpaths, layerwise, per_sample
from saliency.model_io import (
    Batch,
    batch_loss,
    causal_lm_loss,
    default_loss,
    forward,
    iter_batches,
    per_sample_losses,
    resolve_loss,
)

# ----------------------------------------------------------------------------- Batch, no HF


class TwoInputs(nn.Module):
    """``f(a, b=..., scale=...)``: keyword inputs, one of them shared by all samples."""

    def __init__(self) -> None:
        super().__init__()
        self.fa, self.fb = nn.Linear(3, 4), nn.Linear(2, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, a, b, scale=None):
        h = self.fa(a) + self.fb(b)
        return self.norm(h if scale is None else h * scale)


def _two_inputs(n=6):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, 3, generator=g), torch.randn(n, 2, generator=g)
    return a, b, torch.randint(0, 4, (n,), generator=g), torch.tensor([1.5, 0.5, 1.0, 2.0])


def test_a_batch_slices_its_sample_tensors_and_keeps_the_shared_ones():
    a, b, y, scale = _two_inputs()
    batch = Batch.of(({"a": a, "b": b, "scale": scale, "flag": True}, y))
    assert len(batch) == 6 and set(batch.rows()) == {"a", "b"}
    part = batch[1:3]
    assert len(part) == 2 and torch.equal(part.inputs["a"], a[1:3])
    assert part.inputs["scale"] is scale and part.inputs["flag"] is True
    assert torch.equal(part.targets, y[1:3])
    assert torch.equal(batch[[0, 0]].inputs["b"], b[[0, 0]])
    x, t = Batch.of((a, y))  # unpacks as the former (x, y) pairs
    assert x is a and t is y
    assert Batch.of(((a, b), y)).call(TwoInputs()).shape == (6, 4)  # model(*inputs)


def test_hf_dicts_give_labels_as_targets_and_padding_as_a_token_mask():
    ids = torch.arange(12).view(2, 6)
    am = torch.ones(2, 6, dtype=torch.long)
    am[1, 4:] = 0
    labels = ids.masked_fill(am == 0, -100)
    labels[0, 0] = -100
    batch = Batch.of({"input_ids": ids, "attention_mask": am, "labels": labels})
    assert batch.from_labels and torch.equal(batch.targets, labels) and "labels" not in batch.inputs
    want = (am == 1) & (labels != -100)
    assert torch.equal(batch.token_mask, want)
    unmarked = Batch.of({"input_ids": ids, "attention_mask": am, "labels": ids})
    assert torch.equal(unmarked.targets, ids.masked_fill(am == 0, -100))  # padding: no loss
    assert Batch.of((ids, ids)).token_mask is None


@pytest.mark.parametrize(
    "raw, match",
    [
        ("text", "pairs or mappings of model keyword arguments"),
        ((torch.randn(4), torch.tensor(1)), "samples on dim 0"),
        ((torch.randn(4, 2), torch.zeros(3)), "inputs hold 4 samples but targets hold 3"),
        (([1, 2], torch.zeros(2)), "inputs must be a tensor, a tuple of tensors or a mapping"),
        ({"input_ids": torch.zeros(2, 3), "labels": [1, 2]}, "targets .labels. must be a tensor"),
    ],
)
def test_bad_batches_say_what_is_accepted(raw, match):
    with pytest.raises((TypeError, ValueError), match=match):
        list(iter_batches([raw]))


def test_mapping_inputs_take_the_generic_and_closed_form_paths_like_a_loop():
    torch.manual_seed(0)
    model = TwoInputs().double()
    a, b, y, scale = _two_inputs()
    batch = Batch.of(({"a": a.double(), "b": b.double(), "scale": scale.double()}, y))
    params = dict(model.named_parameters())  # Linear: closed forms; LayerNorm: vmap over kwargs
    hooked, _ = per_sample._split(model, params)
    assert fastpaths.probe(model, batch, hooked) == set(hooked)  # proven on the keyword call
    got = per_sample.per_sample_grads(model, params, batch, None, F.cross_entropy)
    for i in range(len(batch)):
        one = batch[i : i + 1]
        loss = F.cross_entropy(one.call(model), one.targets)
        ref = torch.autograd.grad(loss, list(params.values()))
        for (n, _), r in zip(params.items(), ref, strict=True):
            torch.testing.assert_close(got[n][i], r, rtol=1e-10, atol=1e-12, msg=n)


# ----------------------------------------------------------------------------- Hugging Face

transformers = pytest.importorskip("transformers")


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager",
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).double().eval()


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_embd=16, n_layer=2, n_head=2, vocab_size=64, n_positions=32, attn_implementation="eager"
    )
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=32, num_labels=3,
        attn_implementation="eager",
    )  # fmt: skip
    return transformers.BertForSequenceClassification(cfg).double().eval()


LENGTHS = (5, 8, 3)


def _sequences():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (n,), generator=g) for n in LENGTHS]


def _padded(seqs, side="right", mark_labels=True):
    """One dict batch: padded with token 0, attention_mask 0 there and labels -100 (or, without
    ``mark_labels``, the padded input ids themselves: attention_mask alone marks padding)."""
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    am = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[i, sl], am[i, sl] = s, 1
    labels = ids.masked_fill(am == 0, -100) if mark_labels else ids
    return {"input_ids": ids, "attention_mask": am, "labels": labels}


def _unpadded(seqs):
    """The same tokens as batches of one sequence each (no padding anywhere)."""
    return [{"input_ids": s[None], "labels": s[None]} for s in seqs]


@pytest.mark.parametrize("make", [_llama, _gpt2])
def test_causal_lm_loss_is_the_models_own_loss_and_its_per_sample_form_each_samples_own(make):
    model = make()
    raw = _padded(_sequences())
    batch = Batch.of(raw)
    out = model(**raw)
    assert resolve_loss(None, model, batch) is causal_lm_loss
    logits = out.logits.double()
    torch.testing.assert_close(causal_lm_loss(logits, raw["labels"]), out.loss.double())
    torch.testing.assert_close(batch_loss(model, batch), out.loss)  # the model's own loss
    per = per_sample_losses(causal_lm_loss, logits, raw["labels"])
    alone = [model(**b).loss for b in _unpadded(_sequences())]  # each sample's own mean
    torch.testing.assert_close(per, torch.stack(alone).double(), rtol=1e-6, atol=1e-6)
    loop = [causal_lm_loss(logits[i : i + 1], raw["labels"][i : i + 1]) for i in range(3)]
    torch.testing.assert_close(per, torch.stack(loop), rtol=1e-12, atol=1e-12)


def test_default_losses_of_hf_batches_and_ambiguous_ones_name_the_fix():
    llama, bert = _llama(), _bert()
    ids = torch.randint(0, 64, (2, 6))
    cls = Batch.of({"input_ids": ids, "labels": torch.tensor([0, 2])})
    assert resolve_loss(None, bert, cls) is default_loss
    torch.testing.assert_close(
        batch_loss(bert, cls), F.cross_entropy(cls.call(bert).logits, cls.targets)
    )
    with pytest.raises(ValueError, match="not recognised as a causal LM.*loss_fn="):
        resolve_loss(None, bert, Batch.of({"input_ids": ids, "labels": ids}))
    with pytest.raises(ValueError, match="loss_fn=saliency.causal_lm_loss"):
        saliency.score(llama, "obd", data=(ids, ids))
    with pytest.raises(ValueError, match="needs targets.*'labels'"):
        saliency.score(llama, "obd", data={"input_ids": ids})
    with pytest.raises(ValueError, match=r"shape \(2, 6, 64\).*loss_fn=saliency.causal_lm_loss"):
        saliency.score(llama, "snip", data=(ids, ids), loss_fn=F.cross_entropy)
    s = saliency.score(llama, "obd", data=(ids, ids), loss_fn=causal_lm_loss)
    t = saliency.score(llama, "obd", data={"input_ids": ids, "labels": ids})
    assert all(torch.allclose(s[n], t[n], rtol=1e-10, atol=0) for n in s)


@pytest.mark.parametrize("mark_labels", [True, False])
def test_a_padded_batch_gives_exactly_the_statistics_of_the_same_tokens_unpadded(mark_labels):
    # right padding: with left padding, transformers 5.25's eager LLaMA in float64 returns NaN
    # logits for every position of a left-padded row (the model itself, before any statistic)
    model = _llama()
    params = saliency.prunable_parameters(model)
    padded, alone = _padded(_sequences(), mark_labels=mark_labels), _unpadded(_sequences())
    tight = {"rtol": 1e-9, "atol": 1e-13}
    # per-sample losses
    batch = Batch.of(padded)
    got = per_sample_losses(causal_lm_loss, forward(model, batch), batch.targets)
    ref = torch.stack([causal_lm_loss(model(**b).logits, b["labels"]) for b in alone])
    torch.testing.assert_close(got, ref, **tight)
    # Fisher diagonal: mean over samples of g_n^2, g_n the gradient of sample n's own mean loss
    F_pad = curvature.diag_fisher(model, params, padded)
    F_ref = curvature.diag_fisher(model, params, alone)
    assert F_pad.samples == F_ref.samples == 3
    for n in params:
        torch.testing.assert_close(F_pad[n], F_ref[n], **tight, msg=n)
    # layer-wise X^T X and its row count, and the Wanda norms built on it
    kw = {"n_samples": None, "diag_only": False}
    S_pad = layerwise.dense_stats(model, params, padded, **kw)
    S_ref = layerwise.dense_stats(model, params, alone, **kw)
    for n in params:
        assert S_pad[n].n == S_ref[n].n == sum(LENGTHS)
        torch.testing.assert_close(S_pad[n].sum, S_ref[n].sum, **tight, msg=n)
    w_pad = saliency.score(model, "wanda", data=padded)
    w_ref = saliency.score(model, "wanda", data=alone)
    for n in params:
        torch.testing.assert_close(w_pad[n], w_ref[n], msg=n)
    # K-FAC factors: A averages each sample's unpadded positions, G sums them
    from saliency import kfac

    K_pad = kfac.kfac_factors(model, params, padded).factors
    K_ref = kfac.kfac_factors(model, params, alone).factors
    for n in params:
        torch.testing.assert_close(K_pad[n].A, K_ref[n].A, **tight, msg=n)
        torch.testing.assert_close(K_pad[n].G, K_ref[n].G, **tight, msg=n)


def test_per_sample_grads_of_a_padded_dict_batch_match_a_loop_over_unpadded_samples():
    model = _llama()
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
             "model.layers.0.input_layernorm.weight", "model.embed_tokens.weight"]  # fmt: skip
    named = dict(model.named_parameters())
    params = {n: named[n] for n in names}  # Linear: closed forms; norm, embedding: vmap
    batch = Batch.of(_padded(_sequences()))
    hooked, generic = per_sample._split(model, params)
    assert len(hooked) == 2 and fastpaths.probe(model, batch, hooked) == set(hooked)
    got = per_sample.per_sample_grads(model, params, batch, None, None)
    for i, b in enumerate(_unpadded(_sequences())):
        loss = causal_lm_loss(model(**b).logits, b["labels"])
        for n, r in zip(names, torch.autograd.grad(loss, list(params.values())), strict=True):
            torch.testing.assert_close(got[n][i], r, rtol=1e-9, atol=1e-12, msg=n)


def test_sequence_classifier_dict_batches_score_with_cross_entropy_per_sample():
    model = _bert()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 64, (4, 7), generator=g)
    am = torch.ones_like(ids)
    am[1, 5:] = 0
    raw = {"input_ids": ids, "attention_mask": am, "labels": torch.tensor([0, 1, 2, 1])}
    params = saliency.prunable_parameters(model)
    got = per_sample.per_sample_grads(model, params, Batch.of(raw), None, None)
    for i in range(4):
        one = {k: v[i : i + 1] for k, v in raw.items()}
        ref = torch.autograd.grad(model(**one).loss, list(params.values()))
        for (n, _), r in zip(params.items(), ref, strict=True):
            torch.testing.assert_close(got[n][i], r, rtol=1e-9, atol=1e-12, msg=n)
    for crit in ("snip", "taylor_weight", "obd"):
        s = saliency.score(model, crit, data=raw)
        assert all(torch.isfinite(v).all() for v in s.values())


@pytest.mark.parametrize("crit", ["obd", "obs", "taylor", "sparsegpt", "obc"])
def test_criteria_score_a_padded_batch_as_the_same_tokens_unpadded(crit):
    model = _llama()
    params = saliency.prunable_parameters(model)
    if crit == "taylor":  # channel scores of the MLP (its activations carry the samples on dim 0)
        params = {n: p for n, p in params.items() if "mlp" in n}
    kw = {"params": params, **({"dtype": "float64"} if crit == "obs" else {})}  # float64 inverses
    got = saliency.score(model, crit, data=_padded(_sequences()), **kw)
    ref = saliency.score(model, crit, data=_unpadded(_sequences()), **kw)
    for n in params:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-6, atol=1e-12, msg=n)


@pytest.mark.parametrize("crit", ["wanda", "sparsegpt"])
def test_layerwise_solvers_prune_an_hf_model_from_dict_batches(crit):
    model = _llama()
    masks = saliency.prune(model, crit, 0.5, data=_padded(_sequences()), scope="layer")
    assert abs(masks.sparsity - 0.5) < 1e-6
    named = dict(model.named_parameters())
    assert all(not named[n].detach()[~m].any() for n, m in masks.items())


def test_true_fisher_draws_the_next_token_from_the_previous_positions_logits():
    logits = torch.full((2, 5, 7), -50.0, dtype=torch.float64)
    want = torch.tensor([[3, 1, 4, 1, 5], [2, 6, 5, 3, 5]])
    logits.scatter_(2, want[..., None], 50.0)  # position t predicts want[t] with certainty
    labels = torch.tensor([[9, 9, 9, -100, 9], [9, 9, 9, 9, -100]])
    gen = torch.Generator().manual_seed(0)
    draw = curvature._sample_targets(logits, labels, causal_lm_loss, "auto", gen)
    assert torch.equal(draw[:, 0], labels[:, 0])  # no prediction for the first token
    expect = torch.where(labels[:, 1:] == -100, labels[:, 1:], want[:, :-1])
    assert torch.equal(draw[:, 1:], expect)  # shifted; padding stays out of the loss


def test_a_tokenizers_batch_encoding_is_a_mapping_batch():
    raw = _padded(_sequences())
    enc = Batch.of(transformers.BatchEncoding(raw))
    assert enc.from_labels and len(enc) == 3
    assert torch.equal(enc.token_mask, Batch.of(raw).token_mask)
