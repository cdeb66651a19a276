"""Sweeps of transformer units (granularity head / neuron / width / depth) on a tiny LLaMA:
one-shot and fine-tuned units, `[compact] measure` with compact_transformer (parameters, MACs per
token, prefill and decode speed at 1 and 2 threads), resume, figures; the config's checks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import sweep_fixtures  # noqa: E402
from sweep_fixtures import clean_zoo  # noqa: E402, F401  (autouse)

from saliency.sweep.config import ConfigError, parse_config, tomllib  # noqa: E402

pytest.importorskip("transformers")

TINY_LM = """
imports = ["sweep_plugin"]
name = "tiny_lm"
model = "tiny_llama"
dataset = "tiny_text"
sparsities = [0.5]
modes = ["oneshot", "finetune"]
scope = "layer"
granularity = "width"
criteria = ["magnitude", "flap"]

[train]
epochs = 1
batch_size = 32
lr = 0.003
optimizer = "adam"

[finetune]
steps = 3
batch_size = 8

[scoring]
n_samples = 16
batch_size = 8

[evaluate]
n_samples = 8

[compact]
measure = true
repeats = 1
prefill_tokens = 16
decode_tokens = 3
threads = [1, 2]
"""

PER_THREAD = ("latency_prefill_ms", "latency_prefill_dense_ms", "latency_prefill_ratio",
              "decode_tok_s", "decode_tok_s_dense", "decode_tok_s_ratio")  # fmt: skip
FIELDS = ("params", "params_dense", "params_blocks", "params_blocks_dense", "macs_per_token",
          "macs_per_token_dense", "macs_seq_len", "prefill_tokens", "decode_tokens",
          "latency_batch", "compact_loads_plain")  # fmt: skip


@pytest.fixture
def one_thread():
    """Train and evaluate on one torch thread: tiny models on shared, loaded cores run many
    times slower on two (the measurement still sets 1 and 2 threads itself)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def lm_cfg(**changes):
    raw = tomllib.loads(TINY_LM)
    for key, value in changes.items():
        section, _, k = key.partition("__")
        if k:
            raw.setdefault(section, {})[k] = value
        else:
            raw[key] = value
    return parse_config(raw)


def test_width_sweep_oneshot_finetune_measured_resumed_and_drawn(tmp_path, one_thread):
    from saliency.cli import main
    from saliency.plotting import accuracy_vs_sparsity
    from saliency.sweep.records import read_records
    from saliency.sweep.runner import run_sweep

    cfg = lm_cfg()
    res = run_sweep(cfg, tmp_path)
    assert not res.failures and res.ran == res.units == 6  # dense, baseline, 2 x (oneshot, ft)
    assert torch.get_num_threads() == 1  # the measurement restored the thread count
    records = read_records(res.out)
    for r in records:
        assert all(k in r for k in FIELDS), r["criterion"]
        assert all(f"{k}_t{t}" in r and r[f"{k}_t{t}"] > 0 for k in PER_THREAD for t in (1, 2))
        assert r["params_dense"] - r["params_blocks_dense"] == r["params"] - r["params_blocks"]
        assert r["granularity"] == "width" and r["scope"] == "layer"
    pruned = [r for r in records if r["criterion"] != "dense" and r["metric"] == "perplexity"]
    assert {(r["criterion"], r["mode"]) for r in pruned} == {
        (c, m) for c in ("magnitude", "flap") for m in ("oneshot", "finetune")
    }
    for r in pruned:
        assert r["params"] < r["params_dense"] and r["macs_per_token"] < r["macs_per_token_dense"]
        assert r["sparsity"] == pytest.approx(0.5, abs=0.1)
        assert torch.isfinite(torch.tensor(r["value"]))
    # the masks stayed attached through fine-tuning: the removed units are still removable
    size = {(r["criterion"], r["mode"]): r["params"] for r in pruned}
    assert size[("magnitude", "finetune")] == size[("magnitude", "oneshot")]
    assert size[("flap", "finetune")] == size[("flap", "oneshot")]
    final = {r["phase"] for r in pruned if r["mode"] == "finetune"}
    assert final == {"pruned", "final"}
    # resuming finds every unit done and runs nothing
    again = run_sweep(cfg, tmp_path)
    assert again.ran == 0 and again.skipped == 6
    # perplexity against the parameters removed and the measured prefill latency
    for x in ("params", "prefill"):
        paths = accuracy_vs_sparsity(records, tmp_path / "figs", xaxis=x)
        assert [p.name for p in paths if p.suffix == ".png"] == [f"perplexity_vs_{x}.png"]
        text = next(p for p in paths if p.suffix == ".txt").read_text()
        assert "granularity width, scope layer" in text
    assert main(["figs", str(res.out), "--out", str(tmp_path / "cli"), "--x", "prefill"]) == 0
    assert list((tmp_path / "cli").glob("perplexity_vs_prefill*.png"))


def test_transformer_macs_and_parameters_count_by_hand():
    """Linear in*out per token plus h*d*(T+1) for the two causal attention products."""
    import sweep_plugin

    import saliency
    from saliency.sweep.metrics import block_parameters, transformer_macs

    torch.manual_seed(0)
    model = sweep_plugin.tiny_llama((24,), 256).eval()
    ids = torch.randint(0, 256, (2, 12))
    T, hidden, vocab, d = 16, 32, 256, 8
    found = saliency.find_structure(model, ids)
    per_layer = 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64  # q, k and v (GQA), o, MLP
    attention = 4 * d * (T + 1)
    assert transformer_macs(model, found, T) == 2 * (per_layer + attention) + hidden * vocab
    assert transformer_macs(model, found, T, causal=False) == (
        2 * (per_layer + 2 * 4 * d * T) + hidden * vocab
    )
    # half the units' parameters of each block removed, then cut out
    saliency.prune(model, "magnitude", 0.5, data=[(ids, ids)], loss_fn=saliency.causal_lm_loss,
                   scope="layer", granularity="width")  # fmt: skip
    small = saliency.compact_transformer(model, ids)
    found = saliency.find_structure(small, ids)
    expected = hidden * vocab
    for layer in small.model.layers:
        a, m = layer.self_attn, layer.mlp
        expected += sum(p.weight.numel() for p in (a.q_proj, a.k_proj, a.v_proj, a.o_proj))
        expected += sum(p.weight.numel() for p in (m.gate_proj, m.up_proj, m.down_proj))
        expected += a.o_proj.in_features * (T + 1)
    assert transformer_macs(small, found, T) == expected < transformer_macs(model, found, T)
    outside = sum(p.numel() for p in small.parameters()) - block_parameters(small, found)
    assert outside == vocab * hidden * 2 + hidden  # embedding, LM head, final norm


def test_lm_latency_restores_threads_and_checks_its_arguments():
    import sweep_plugin

    from saliency.sweep.metrics import lm_latency

    model = sweep_plugin.tiny_llama((24,), 256).eval()
    ids = torch.randint(0, 256, (1, 8))
    before = torch.get_num_threads()
    out = lm_latency({"a": model}, ids, decode_tokens=2, threads=[1, 2], repeats=1, warmup=0)
    assert set(out["a"]) == {f"{k}_t{t}" for k in ("prefill_ms", "decode_tok_s") for t in (1, 2)}
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="decode_tokens"):
        lm_latency({"a": model}, ids, decode_tokens=1)
    with pytest.raises(ValueError, match="one prompt"):
        lm_latency({"a": model}, ids.repeat(2, 1), decode_tokens=2)


@pytest.mark.parametrize("granularity", ["head", "neuron", "width", "depth"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_config_accepts_transformer_granularities(granularity, scope):
    changes = {"granularity": granularity, "scope": scope}
    if granularity == "depth" and scope == "layer":
        with pytest.raises(ConfigError, match="scope must be 'global'"):
            lm_cfg(**changes)
        return
    cfg = lm_cfg(**changes)
    assert (cfg.granularity, cfg.scope) == (granularity, scope)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"modes": ["gradual"]}, "runs modes oneshot and finetune"),
        ({"criteria": ["wanda"]}, "layer-wise solver"),
        ({"criteria": ["block_influence"]}, "scores only depth"),
        ({"allocate__pooling": "max"}, "allocate.pooling does not apply"),
        ({"targets__keep_output_dense": True}, "targets.keep_output_dense does not apply"),
        ({"compact__batch_size": 4}, "compact.batch_size does not apply"),
        ({"compact__threads": []}, "compact.threads must be"),
        ({"compact__decode_tokens": 1}, "compact.decode_tokens must be"),
        ({"finetune__steps": 0}, "finetune.steps must be"),
    ],
)
def test_config_refuses_what_transformer_units_cannot_do(changes, match):
    with pytest.raises(ConfigError, match=match):
        lm_cfg(**changes)


def test_new_keys_leave_run_ids_of_other_sweeps_unchanged():
    """`finetune.steps` unset and the transformer-only [compact] keys are not hashed, so the run
    ids of existing sweeps stay what they were; set, they are."""
    from saliency.sweep.units import unit_config

    raw = tomllib.loads(sweep_fixtures.TINY)
    channel = parse_config({**raw, "granularity": "channel", "compact": {"measure": True}})
    spec = channel.criteria[0]
    unit = unit_config(channel, 0, "finetune", spec, 0.5)
    assert set(unit["compact"]) == {"measure", "batch_size", "repeats"}
    assert "steps" not in unit["finetune"]
    with pytest.raises(ConfigError, match="compact.prefill_tokens does not apply"):
        parse_config({**raw, "granularity": "channel", "compact": {"prefill_tokens": 8}})
    assert "evaluate" not in unit
    lm = lm_cfg(evaluate__n_samples=4)
    unit = unit_config(lm, 0, "finetune", lm.criteria[0], 0.5)
    assert unit["finetune"]["steps"] == 3 and unit["compact"]["threads"] == [1, 2]
    assert "batch_size" not in unit["compact"] and unit["evaluate"] == {"n_samples": 4}


def test_a_figure_never_mixes_settings(tmp_path):
    from saliency.plotting import accuracy_vs_sparsity, plot_accuracy_vs_sparsity

    base = {"dataset": "d", "model": "m", "scope": "layer", "metric": "perplexity", "seed": 0,
            "mode": "oneshot", "phase": "pruned", "criterion": "magnitude"}  # fmt: skip
    recs = [{**base, "granularity": g, "sparsity_target": s, "value": 10 + s}
            for g in ("width", "depth") for s in (0.25, 0.5)]  # fmt: skip
    with pytest.raises(ValueError, match="mix 2 settings"):
        plot_accuracy_vs_sparsity(recs)
    paths = accuracy_vs_sparsity(recs, tmp_path)
    names = sorted(p.name for p in paths if p.suffix == ".png")
    assert names == ["perplexity_vs_sparsity_depth.png", "perplexity_vs_sparsity_width.png"]
    fig = plot_accuracy_vs_sparsity([r for r in recs if r["granularity"] == "depth"])
    assert fig.legends[0].get_title().get_text() == "granularity depth, scope layer"


def test_train_stops_after_max_steps():
    from torch.utils.data import TensorDataset

    from saliency.sweep.train import train

    model = torch.nn.Linear(3, 2)
    ds = TensorDataset(torch.randn(40, 3), torch.randint(0, 2, (40,)))
    out = train(model, ds, epochs=5, batch_size=4, max_steps=3, device="cpu")
    assert out["steps"] == 3 and len(out["epoch_loss"]) == 1
    with pytest.raises(ValueError, match="max_steps"):
        train(model, ds, epochs=1, max_steps=0, device="cpu")
