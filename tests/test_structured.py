"""Structured pruning of transformers: units found from the data flow, each criterion against an
independent reference (least squares, explicit statistics, hidden states), allocation counts."""

import pytest
import torch

import saliency
from saliency import capture
from saliency.structured import allocate_units
from saliency.structures import find_structure, removed_units

transformers = pytest.importorskip("transformers")
V = 32


def llama(kv=2, layers=3):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=24,
                                   num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=kv, max_position_embeddings=16)  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).double().eval()


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=16, n_layer=2, n_head=4, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=24,
                                  max_position_embeddings=16, num_labels=3)  # fmt: skip
    return transformers.BertForSequenceClassification(cfg).double().eval()


IDS = torch.randint(0, V, (4, 8), generator=torch.Generator().manual_seed(1))
DATA = [{"input_ids": IDS, "labels": IDS}]
MODELS = {"llama_gqa": llama, "llama_mha": lambda: llama(kv=4), "gpt2": gpt2, "bert": bert}


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("arch", list(MODELS))
def test_units_rows_match_columns(arch):
    """Zeroing a unit's value rows (heads) or its in rows (neurons: gate/up, c_fc) silences it
    exactly as zeroing its out columns does: the rows and columns found belong together."""
    model = MODELS[arch]()
    s = find_structure(model, IDS)
    assert len(s.groups) == 2 * len(s.blocks)
    params = dict(model.named_parameters())
    for g in s.groups:
        u = g.n - 1
        cols = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            dim, ix = g.slices[f"{g.output}.weight"]
            params[f"{g.output}.weight"].index_fill_(dim, ix[u], 0.0)
        by_cols = _logits(model)
        model.load_state_dict(cols)
        with torch.no_grad():
            rows = [p for p in g.slices if p != f"{g.output}.weight"]
            if g.kind == "head":  # the value rows (and bias): the last in projection, or the
                rows = [p for p in rows if "v_proj" in p or "value" in p or "c_attn" in p]
            for p in rows:
                dim, ix = g.slices[p]
                sel = ix[u]
                if "c_attn" in p:  # fused q/k/v: the value third only
                    sel = sel[2 * len(sel) // 3 :]
                params[p].index_fill_(dim, sel, 0.0)
        by_rows = _logits(model)
        model.load_state_dict(cols)
        torch.testing.assert_close(by_rows, by_cols, rtol=1e-10, atol=1e-12)
        assert (by_cols - _logits(model)).abs().max() > 1e-8  # the unit did something


def test_unit_counts_and_widths():
    s = find_structure(llama(kv=2), IDS)
    heads = [g for g in s.groups if g.kind == "head"]
    assert all(g.n == 2 and g.queries_per_unit == 2 for g in heads)  # 2 KV groups of 2 heads
    assert s.params_per_unit(heads[0]) == 16 * (2 * 4 + 4 + 4) + 2 * 4 * 16
    s = find_structure(gpt2(), IDS)
    assert [g.n for g in s.groups] == [4, 64, 4, 64]


@pytest.mark.parametrize("crit", ["magnitude", "taylor_weight", "flap", "structured_obs"])
@pytest.mark.parametrize("gran,scope", [("head", "layer"), ("neuron", "layer"),
                                        ("width", "layer"), ("width", "global")])  # fmt: skip
def test_budget_in_parameters(crit, gran, scope):
    model = llama()
    s = find_structure(model, IDS)
    saliency.prune(model, crit, 0.4, data=DATA, granularity=gran, scope=scope)
    gone = removed_units(model, s)
    kinds = {"head": {"head"}, "neuron": {"neuron"}, "width": {"head", "neuron"}}[gran]
    pools = [[gi for gi, g in enumerate(s.groups) if g.kind in kinds
              and (scope == "global" or g.block == b)] for b in range(len(s.blocks))]  # fmt: skip
    for pool in pools[: 1 if scope == "global" else None]:
        total = sum(s.params_per_unit(s.groups[gi]) * s.groups[gi].n for gi in pool)
        cut = sum(s.params_per_unit(s.groups[gi]) * len(gone[gi]) for gi in pool)
        biggest = max(s.params_per_unit(s.groups[gi]) for gi in pool)
        assert abs(cut - 0.4 * total) <= biggest / 2 + 1e-9
    assert all(len(gone[gi]) < g.n for gi, g in enumerate(s.groups))  # no branch emptied
    for gi, g in enumerate(s.groups):
        if g.kind not in kinds:
            assert len(gone[gi]) == 0


def test_allocate_units_keeps_one_and_goes_cheapest_first():
    s = find_structure(llama(), IDS)
    costs = {gi: torch.arange(g.n, dtype=torch.float64).flip(0) for gi, g in enumerate(s.groups)
             if g.kind == "neuron"}  # fmt: skip
    got = allocate_units(s, costs, 0.5, "layer")
    assert all(got[gi].tolist() == list(range(12, 24)) for gi in costs)
    got = allocate_units(s, costs, 0.999, "global")
    assert all(len(got[gi]) == s.groups[gi].n - 1 for gi in costs)


@pytest.mark.parametrize("crit", ["magnitude", "flap"])
def test_layer_scope_gives_one_width_per_kind(crit, tmp_path):
    """scope="layer": every block keeps the same heads and neurons count, so the compacted model
    is described by its config and plain from_pretrained reloads it."""
    model = llama(kv=4)
    saliency.prune(model, crit, 0.4, data=DATA, granularity="width", scope="layer")
    small = saliency.compact_transformer(model, IDS)
    layers = small.model.layers
    assert len({b.self_attn.q_proj.out_features for b in layers}) == 1
    assert len({b.mlp.up_proj.out_features for b in layers}) == 1
    assert layers[0].self_attn.q_proj.out_features < 16 and layers[0].mlp.up_proj.out_features < 24
    small.save_pretrained(tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    torch.testing.assert_close(_logits(again), _logits(small), rtol=1e-10, atol=1e-12)


def test_structured_obs_is_the_least_squares_refit():
    """Block 0's out projections after structured OBS: the kept columns are the least-squares
    refit ``W H_K (H_KK)^-1`` on the damped H of the inputs the solver saw: o_proj's are the
    dense ones (block 0's attention does not depend on the pruning); down_proj's come after
    o_proj was solved (a dense copy given the solved o_proj), the removed columns zero."""
    import copy

    model = llama()
    dense = copy.deepcopy(model)
    s = find_structure(model, IDS)
    attn, mlp = (f"{g.output}.weight" for g in s.groups if g.block == 0)
    saliency.prune(model, "structured_obs", 0.4, data=DATA, granularity="width", scope="layer")
    gone = removed_units(model, s)
    params, dparams = dict(model.named_parameters()), dict(dense.named_parameters())
    assert all(len(gone[gi]) for gi in (0, 1))  # a head group and neurons went in block 0
    for gi, n in ((0, attn), (1, mlp)):
        stats = saliency.layerwise.dense_stats(dense, {n: dparams[n]}, DATA, n_samples=None,
                                               diag_only=False)  # fmt: skip
        H = stats[n].H
        H = H + 0.01 * H.diagonal().mean() * torch.eye(len(H), dtype=H.dtype)
        R = set(s.groups[gi].columns[gone[gi]].reshape(-1).tolist())
        K = torch.tensor([j for j in range(len(H)) if j not in R])
        W = dparams[n].detach()
        ref = torch.zeros_like(W)
        ref[:, K] = torch.linalg.solve(H[K][:, K], (W @ H[:, K]).T).T
        torch.testing.assert_close(params[n].detach(), ref, rtol=1e-8, atol=1e-10)
        with torch.no_grad():
            dparams[n].copy_(params[n])  # what down_proj's inputs saw: the solved o_proj


def test_flap_keeps_the_mean_output():
    """FLAP's compensation: each out projection of block 0, applied to its dense calibration
    inputs (FLAP's statistics are the dense model's), has the mean output it had."""
    model = llama()
    s = find_structure(model, IDS)
    mods = dict(model.named_modules())
    outs = [g.output for g in s.groups if g.block == 0]
    xs = {n: [] for n in outs}
    hs = [mods[n].register_forward_pre_hook(lambda _m, a, n=n: xs[n].append(a[0].detach()))
          for n in outs]  # fmt: skip
    _logits(model)
    for h in hs:
        h.remove()
    dense = {n: mods[n](torch.cat(xs[n])).detach().reshape(-1, 16).mean(0) for n in outs}
    saliency.prune(model, "flap", 0.4, data=DATA, granularity="width", scope="layer")
    gone = removed_units(model, s)
    assert all(len(gone[gi]) for gi in (0, 1))
    kinds = {s.groups[gi].kind for gi, r in gone.items() if len(r)}
    assert model.config.mlp_bias == ("neuron" in kinds)  # saves and reloads as it is
    assert model.config.attention_bias == ("head" in kinds)
    mods = dict(model.named_modules())
    for n in outs:
        got = mods[n](torch.cat(xs[n])).detach().reshape(-1, 16).mean(0)
        torch.testing.assert_close(got, dense[n], rtol=1e-9, atol=1e-12)


def test_flap_scores_against_explicit_inputs():
    model = llama()
    s = find_structure(model, IDS)
    crit = saliency.get_criterion("flap")
    got = crit.unit_scores(model, s, DATA)
    g = s.groups[1]  # block 0's MLP: down_proj's inputs
    xs = []
    h = dict(model.named_modules())[g.output].register_forward_pre_hook(
        lambda _m, a: xs.append(a[0].detach().reshape(-1, a[0].shape[-1])))  # fmt: skip
    _logits(model)
    h.remove()
    X = torch.cat(xs)
    W = capture.weight_matrix(dict(model.named_modules())[g.output]).detach()
    f = X.var(0, unbiased=False) * W.square().sum(0)
    z = (f - f.mean()) / f.std()
    torch.testing.assert_close(got[1], z, rtol=1e-8, atol=1e-10)


def test_block_influence_against_hidden_states():
    model = llama(layers=4)
    s = find_structure(model, IDS)
    bi = saliency.get_criterion("block_influence").block_scores(model, s, DATA)
    with torch.no_grad():
        hs = model(input_ids=IDS, output_hidden_states=True).hidden_states
    for i in range(3):  # the last entry of hidden_states is after the final norm
        cos = torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1)
        assert float(bi[i]) == pytest.approx(float(1 - cos.mean()), rel=1e-9)


@pytest.mark.parametrize("crit", ["block_influence", "magnitude"])
def test_depth_removes_blocks_exactly(crit):
    """A removed block is an identity: the pruned model equals the model without that block."""
    model = llama(layers=4)
    s = find_structure(model, IDS)
    saliency.prune(model, crit, 0.25, data=DATA, granularity="depth")
    gone = removed_units(model, s)
    blocks = sorted({s.groups[gi].block for gi, r in gone.items() if len(r) == s.groups[gi].n})
    assert len(blocks) == 1
    pruned = _logits(model)
    del model.model.layers[blocks[0]]
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = i
    model.config.num_hidden_layers = 3
    torch.testing.assert_close(_logits(model), pruned, rtol=1e-10, atol=1e-12)


def test_depth_refuses_post_norm_blocks():
    """BERT normalizes each residual sum: an emptied block is LayerNorm(x), an identity only
    while the norm's gain is 1 and shift 0 (at initialisation), so trained norms are refused."""
    model = bert()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "LayerNorm" in n:
                p.uniform_(0.5, 1.5)
    with pytest.raises(ValueError, match="not identities.*post-norm"):
        saliency.prune(model, "magnitude", 0.5, data=[{"input_ids": IDS, "labels":
                       torch.zeros(4, dtype=torch.long)}], granularity="depth")  # fmt: skip


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="scope must be 'global'"):
        saliency.prune(llama(), "magnitude", 0.3, data=DATA, granularity="depth", scope="layer")
    with pytest.raises(ValueError, match=r"sparsity in \[0, 1\)"):
        saliency.prune(llama(), "magnitude", 1.0, data=DATA, granularity="head")
    with pytest.raises(ValueError, match="granularity='depth'"):
        saliency.prune(llama(), "block_influence", 0.3, data=DATA)
    with pytest.raises(ValueError, match="needs model.config"):
        saliency.prune(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)),
                       "magnitude", 0.3, data=[(torch.randn(2, 4), torch.tensor([0, 1]))],
                       granularity="head")  # fmt: skip
