import copy
import importlib
import math

import pytest
import torch
import torch.nn.utils.prune as tprune
from hypothesis import given, settings
from hypothesis import strategies as st

import saliency
from saliency import Masks, allocate


def torch_masks(model):
    return {
        f"{n}.weight": m.weight_mask.bool()
        for n, m in model.named_modules()
        if hasattr(m, "weight_mask")
    }


def test_global_magnitude_matches_torch_global_unstructured(mlp):
    ref = copy.deepcopy(mlp)
    layers = [(m, "weight") for m in ref if isinstance(m, torch.nn.Linear)]
    tprune.global_unstructured(layers, pruning_method=tprune.L1Unstructured, amount=0.3)
    masks = saliency.prune(mlp, "magnitude", sparsity=0.3, scope="global")
    assert masks == Masks(torch_masks(ref))
    assert masks.zeros == round(0.3 * masks.numel)


def test_layer_magnitude_matches_l1_unstructured(mlp):
    ref = copy.deepcopy(mlp)
    for m in ref:
        if isinstance(m, torch.nn.Linear):
            tprune.l1_unstructured(m, "weight", amount=0.3)
    assert saliency.prune(mlp, "magnitude", sparsity=0.3, scope="layer") == Masks(torch_masks(ref))


def test_channel_magnitude_matches_ln_structured(mlp, tiny_cnn):
    for model in (mlp, tiny_cnn):
        ref = copy.deepcopy(model)
        for m in ref.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                tprune.ln_structured(m, "weight", amount=0.3, n=2, dim=0)
        masks = saliency.prune(
            model, "magnitude", sparsity=0.3, scope="layer", granularity="channel"
        )
        assert masks == Masks(torch_masks(ref))


def test_block_granularity_max_pooling_and_padding():
    s = torch.arange(24.0).reshape(4, 6)  # blocks (2, 4): columns 0-3 and a padded 4-5
    m = allocate({"w": s}, 0.5, granularity="block", block=(2, 4), pooling="max")
    # block max scores: rows 0-1 -> 9 (8 elements), 11 (4); rows 2-3 -> 21, 23; 12 zeros = two blocks
    assert m["w"][:2].logical_not().all() and m["w"][2:].all()
    conv = torch.rand(4, 2, 3, 3)
    m = allocate({"c": conv}, 0.5, granularity="block", block=(1, 9), pooling="avg")
    assert m.zeros == 36
    with pytest.raises(ValueError, match=r"block=\(h, w\)"):
        allocate({"w": s}, 0.5, granularity="block")


def test_n_m_keeps_n_largest_along_input():
    s = torch.tensor([[1.0, 4.0, 3.0, 2.0, 8.0, 5.0, 6.0, 7.0]])
    m = allocate({"w": s}, None, granularity="2:4")
    assert m["w"].tolist() == [[False, True, True, False, True, False, False, True]]
    conv = torch.rand(3, 8, 2, 2)
    m = allocate({"c": conv}, 0.5, granularity="2:4")
    assert (m["c"].movedim(1, -1).reshape(-1, 4).sum(1) == 2).all()
    with pytest.raises(ValueError, match="multiple of 4"):
        allocate({"w": torch.rand(2, 6)}, None, granularity="2:4")
    with pytest.raises(ValueError, match="implies sparsity 0.5"):
        allocate({"w": torch.rand(2, 8)}, 0.3, granularity="2:4")


def test_ties_are_spread_at_random_with_a_seed():
    # ties used to be taken in model order ("a" lost 2 of 4, "b" none): a layer whose scores
    # are all zero (upstream of a zero-initialised tensor) was then emptied first, whole
    scores = {"a": torch.zeros(1000), "b": torch.zeros(1000)}
    m = allocate(scores, 0.5)
    assert m.zeros == 1000
    assert 400 < int((~m["a"]).sum()) < 600  # spread over both layers, not "a" first
    assert allocate(scores, 0.5) == m  # deterministic for a seed
    other = allocate(scores, 0.5, tie_seed=1)
    assert other.zeros == 1000 and other != m
    # strict order still wins over ties: the lower scores go first
    m = allocate({"a": torch.tensor([0.0, 1, 1, 1]), "b": torch.ones(4)}, 0.25)
    assert not m["a"][0] and m.zeros == 2
    with pytest.raises(TypeError, match="tie_seed"):
        allocate(scores, 0.5, tie_seed=0.5)


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.integers(0, 3), min_size=1, max_size=40),
    st.floats(0, 0.99),
    st.integers(0, 2**31),
)
def test_ties_exact_count_and_threshold(values, sparsity, seed):
    s = torch.tensor(values, dtype=torch.float32)
    m = allocate({"w": s}, sparsity, tie_seed=seed)["w"]
    k = round(sparsity * len(values))
    assert int((~m).sum()) == k
    if 0 < k < len(values):  # every pruned score <= every kept score
        assert s[~m].max() <= s[m].min()


def test_layer_overrides_and_cap():
    scores = {"a": torch.arange(10.0), "b": torch.arange(10.0) + 100}
    m = allocate(scores, 0.5, layer_sparsity={"b": 0.2})
    assert m["a"].logical_not().sum() == 5 and m["b"].logical_not().sum() == 2
    m = allocate(scores, 0.6, max_layer_sparsity=0.8)
    assert m["a"].logical_not().sum() == 8 and m["b"].logical_not().sum() == 4


def test_bad_input_messages():
    s = {"w": torch.rand(4, 4)}
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            allocate(s, bad)
    with pytest.raises(ValueError, match="unknown scope 'net'.*global, layer"):
        allocate(s, 0.5, scope="net")
    with pytest.raises(ValueError, match="unknown granularity 'row'"):
        allocate(s, 0.5, granularity="row")
    with pytest.raises(ValueError, match="NaN or inf"):
        allocate({"w": torch.tensor([1.0, float("nan")])}, 0.5)
    with pytest.raises(ValueError, match="different tensors"):
        allocate(s, 0.5, current=Masks({"v": torch.ones(4, 4, dtype=torch.bool)}))
    with pytest.raises(ValueError, match="unknown criterion 'nope'; available: .*magnitude"):
        saliency.prune(torch.nn.Linear(2, 2), "nope", 0.5)


shapes = st.lists(
    st.tuples(st.integers(1, 9), st.integers(1, 9), st.sampled_from([1, 4])), min_size=1, max_size=3
)


@settings(max_examples=60, deadline=None)
@given(
    shapes=shapes,
    sparsity=st.floats(0, 0.99),
    scope=st.sampled_from(["global", "layer"]),
    seed=st.integers(0, 99),
)
def test_exact_counts_element(shapes, sparsity, scope, seed):
    g = torch.Generator().manual_seed(seed)
    scores = {
        f"l{i}": torch.randint(0, 5, (o, c, k), generator=g).float()
        for i, (o, c, k) in enumerate(shapes)
    }
    m = allocate(scores, sparsity, scope=scope)
    if scope == "global":
        assert m.zeros == round(sparsity * m.numel)
    else:
        for n, s in scores.items():
            assert int((~m[n]).sum()) == round(sparsity * s.numel())


@settings(max_examples=60, deadline=None)
@given(shapes=shapes, sparsity=st.floats(0, 0.99), seed=st.integers(0, 99))
def test_exact_counts_channel_layer(shapes, sparsity, seed):
    g = torch.Generator().manual_seed(seed)
    scores = {f"l{i}": torch.rand(o, c, k, generator=g) for i, (o, c, k) in enumerate(shapes)}
    m = allocate(scores, sparsity, scope="layer", granularity="channel")
    for n, s in scores.items():
        dead_channels = (~m[n]).reshape(s.shape[0], -1).all(1)
        # the collapse guard keeps one channel where rounding would take them all
        assert int(dead_channels.sum()) == min(round(sparsity * s.shape[0]), s.shape[0] - 1)
        assert int((~m[n]).sum()) == int(dead_channels.sum()) * s[0].numel()  # whole channels only


@settings(max_examples=60, deadline=None)
@given(
    shapes=shapes,
    s1=st.floats(0, 0.95),
    s2=st.floats(0, 0.95),
    granularity=st.sampled_from(["element", "channel"]),
    scope=st.sampled_from(["global", "layer"]),
    seed=st.integers(0, 99),
)
def test_monotone_with_current(shapes, s1, s2, granularity, scope, seed):
    g = torch.Generator().manual_seed(seed)
    first = {f"l{i}": torch.rand(o, c, k, generator=g) for i, (o, c, k) in enumerate(shapes)}
    second = {n: torch.rand(s.shape, generator=g) for n, s in first.items()}
    lo, hi = sorted((s1, s2))
    m1 = allocate(first, lo, scope=scope, granularity=granularity)
    m2 = allocate(second, hi, scope=scope, granularity=granularity, current=m1)
    for n in m1:
        assert not (m2[n] & ~m1[n]).any()  # pruned stays pruned
    if granularity == "element" and scope == "global":
        assert m2.zeros == max(round(hi * m2.numel), m1.zeros)


def test_global_channel_counts_are_closest_reachable():
    scores = {"a": torch.rand(10, 3), "b": torch.rand(4, 5)}
    for s in (0.1, 0.33, 0.5, 0.9):
        m = allocate(scores, s, granularity="channel", min_layer_channels=0)
        target = round(s * m.numel)
        # every reachable count is a sum of whole channels; ours is at most half a channel off
        assert abs(m.zeros - target) <= 2.5 or math.isclose(m.zeros, target)


def test_bad_settings_fail_before_scoring():
    class Exploding:
        name = "exploding"

        def score(self, *a):
            raise AssertionError("scored before checking the settings")

    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    for kw, msg in [
        ({"scope": "net"}, "unknown scope 'net'"),
        ({"granularity": "row"}, "unknown granularity 'row'"),
        ({"granularity": "block", "block": (0, 2)}, "block=\\(h, w\\)"),
        ({"granularity": "channel", "reduce": "median"}, "unknown reduce"),
        ({"granularity": "2:4", "scope": "net"}, "unknown scope"),
    ]:
        with pytest.raises(ValueError, match=msg):
            saliency.prune(model, Exploding(), 0.5, **kw)
    with pytest.raises(ValueError, match="must be in \\[0, 1\\)"):
        saliency.prune(model, Exploding(), 1.0)
    with pytest.raises(ValueError, match="unknown scope"):
        saliency.GradualPruner(model, "magnitude", saliency.OneShot(0.5, step=0), scope="net")


def test_block_larger_than_a_tensor_is_refused():
    scores = {"w": torch.rand(4, 6)}
    with pytest.raises(ValueError, match="larger than 'w' viewed as"):
        saliency.allocate(scores, 0.5, granularity="block", block=(10, 10))
    edge = saliency.allocate(scores, 0.5, granularity="block", block=(3, 4))  # padded edges
    assert edge["w"].shape == (4, 6)


def test_max_layer_sparsity_counts_zeros_already_in_force():
    torch.manual_seed(0)
    scores = {"a": torch.rand(10, 10), "b": torch.rand(10, 10) + 1}
    current = saliency.allocate({"a": scores["a"], "b": torch.rand(10, 10)}, 0.3, scope="layer")
    fresh = {"a": torch.rand(10, 10), "b": scores["b"]}  # re-scored: other weights look weak
    masks = saliency.allocate(fresh, 0.5, current=current, max_layer_sparsity=0.6)
    assert masks.layer_sparsity()["a"] <= 0.6 + 1e-9
    assert all(not (masks[n] & ~current[n]).any() for n in masks)  # monotone


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("dims", [1, 2])
def test_channel_pruning_of_transposed_convolutions_zeroes_output_channels(dims, groups):
    """ConvTranspose weights are [in, out/groups, *k]: an output channel is a column of a group."""
    torch.manual_seed(0)
    up = (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d)[dims - 1](4, 6, 3, groups=groups)
    model = torch.nn.Sequential(up)
    masks = saliency.prune(model, "magnitude", 0.5, scope="layer", granularity="channel")
    out = model(torch.randn(2, 4, *[5] * dims))
    bias_only = [torch.equal(out[:, c], up.bias[c].expand_as(out[:, c])) for c in range(6)]
    assert sum(bias_only) == 3 and masks.zeros == 3 * up.weight[: 4 // groups, 0].numel()
    # whole output channels, and the lowest-norm ones (the norm over each channel's weights)
    w = up.weight.detach()
    norms = torch.stack(
        [
            w[g * (4 // groups) : (g + 1) * (4 // groups), j].norm()
            for g in range(groups)
            for j in range(6 // groups)
        ]  # fmt: skip
    )
    assert [c for c in range(6) if bias_only[c]] == sorted(norms.argsort()[:3].tolist())


def test_channel_layout_is_checked():
    s = {"w": torch.rand(4, 3, 2)}
    with pytest.raises(ValueError, match="unknown tensor 'v'"):
        allocate(s, 0.5, granularity="channel", channel_layout={"v": (1, 1)})
    with pytest.raises(ValueError, match=r"must be \(dim, groups\).*got \(2, 1\)"):
        allocate(s, 0.5, granularity="channel", channel_layout={"w": (2, 1)})
    with pytest.raises(ValueError, match="does not split into 3 groups"):
        allocate(s, 0.5, granularity="channel", channel_layout={"w": (1, 3)})
    m = allocate(s, 0.5, granularity="channel", channel_layout={"w": (1, 2)})
    assert m.zeros == 12 and (~m["w"]).reshape(2, 2, 3, 2).all(dim=(1, 3)).sum() == 3


def test_global_channel_pruning_never_empties_a_layer(caplog):
    # a small second layer scored far below the first: unguarded, it goes entirely
    scores = {"fc1": torch.rand(8, 4) + 10, "fc2": torch.rand(4, 4), "head": torch.rand(3, 4) + 10}
    bare = allocate(scores, 0.3, granularity="channel", min_layer_channels=0)
    assert bare["fc2"].logical_not().all()
    with caplog.at_level("WARNING", logger="saliency.allocate"):
        m = allocate(scores, 0.3, granularity="channel")
    assert "fewer than 1 output channel(s)" in caplog.text and "'fc2'" in caplog.text
    assert "min_layer_channels=0" in caplog.text
    # one channel of fc2 survives (its best); the zeros go to fc1's lowest channels instead
    alive = {n: int(m[n].reshape(len(m[n]), -1).any(1).sum()) for n in m}
    assert alive["fc2"] == 1 and m["fc2"][scores["fc2"].norm(dim=1).argmax()].all()
    assert m.zeros == bare.zeros == round(0.3 * 15) * 4  # equal channel sizes: exact count
    # a guard that is not needed changes nothing, and says nothing
    caplog.clear()
    with caplog.at_level("WARNING", logger="saliency.allocate"):
        assert allocate(scores, 0.1, granularity="channel") == allocate(
            scores, 0.1, granularity="channel", min_layer_channels=0
        )
    assert not caplog.text
    # layer scope: rounding would take all of a 3-channel layer; the guard keeps one
    m = allocate({"w": torch.rand(3, 2)}, 0.9, scope="layer", granularity="channel")
    assert m.zeros == 4
    with pytest.raises(ValueError, match="min_layer_channels must be an int >= 0"):
        allocate(scores, 0.3, granularity="channel", min_layer_channels=-1)


def test_channel_guard_on_models_keeps_every_layer_alive(mlp, tiny_cnn):
    for model in (mlp, tiny_cnn):
        masks = saliency.prune(model, "magnitude", 0.9, granularity="channel", keep=False)
        for n, keep in masks.items():
            assert keep.reshape(len(keep), -1).any(1).sum() >= 1, n


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=30), min_size=1, max_size=4),
    st.integers(0, 120),
    st.booleans(),
)
def test_selection_is_exact_across_tensors_even_when_the_sample_misses(lists, k, miss):
    alloc_mod = importlib.import_module("saliency.allocate")  # the module, not the function
    keys = [torch.tensor(v, dtype=torch.float64) for v in lists]
    k = min(k, sum(len(x) for x in keys))
    real = alloc_mod._bracket
    if miss:  # a bracket that holds nothing: the exact fallback path
        alloc_mod._bracket = lambda *a: (100.0, 101.0)
    try:
        pruned = alloc_mod.lowest(keys, k, 0)
    finally:
        alloc_mod._bracket = real
    flat, flags = torch.cat(keys), torch.cat(pruned)
    assert int(flags.sum()) == k
    if 0 < k < len(flat):
        assert flat[flags].max() <= flat[~flags].min()
