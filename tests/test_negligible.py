"""Curvature of round-off (``saliency.negligible``): the same answer on every machine.

The model holds tensors whose gradient is zero analytically: an attention key bias (the softmax
removes a constant added to every logit of a row), a branch that never reaches the loss, and an
input feature that is round-off ((x a + x b) - x (a + b)). Every criterion (with each of its
curvatures) gives the same scores and masks with 1 and 2 threads, and float32 agrees with
float64. Before the rule, OBS inverted the key bias's Fisher block (~1e-34) and the result
depended on the BLAS build (issue 24). Tolerances, relative to the largest score (weight) of the
call: 1e-5 between thread counts (float32 reductions in another order; 4e-7 seen), 1e-4 between
float32 and float64 (float32 round-off times the condition number of the damped curvature;
8e-6 seen, OBS with WoodFisher blocks).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import saliency
from saliency import negligible, solvers

D, L, C, N = 6, 5, 3, 24


class ZeroCurvature(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("a", torch.randn(D, generator=g))
        self.register_buffer("b", torch.randn(D, generator=g))
        self.q = nn.Linear(D + 1, D)
        self.k = nn.Linear(D + 1, D)  # its bias: gradient zero analytically
        self.v = nn.Linear(D + 1, D)
        self.unused = nn.Linear(D + 1, D)  # a branch that never reaches the loss
        self.head = nn.Linear(D, C)

    def forward(self, x):  # [B, L, D]
        noise = (x @ self.a + x @ self.b) - x @ (self.a + self.b)  # round-off, not zero
        x = torch.cat([x, noise[..., None]], -1)
        att = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2) / math.sqrt(D), -1)
        self.unused(x)
        return self.head((att @ self.v(x)).mean(1))


def _data(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, L, D, generator=g).to(dtype)
    y = torch.randint(0, C, (N,), generator=g)
    return [(x[:12], y[:12]), (x[12:], y[12:])]


def _model(dtype):
    torch.manual_seed(0)
    return ZeroCurvature().to(dtype).eval()


ALL = None  # every parameter, biases included
WEIGHTS = ["q.weight", "k.weight", "v.weight", "unused.weight", "head.weight"]
CONFIGS = [
    ("magnitude", {}, ALL),
    ("random", {}, ALL),
    ("snip", {}, ALL),
    ("grasp", {}, ALL),
    ("synflow", {}, ALL),
    ("taylor", {}, WEIGHTS),
    ("taylor_weight", {}, ALL),
    ("obd", {"hessian": "fisher"}, ALL),
    ("obd", {"hessian": "ggn"}, ALL),
    ("obd", {"hessian": "hutchinson"}, ALL),
    ("obd", {"hessian": "exact"}, ALL),
    ("obd", {"hessian": "kfac"}, WEIGHTS),
    ("obs", {"hessian": "fisher", "block_size": 16}, ALL),
    ("obs", {"hessian": "fisher", "selection": "single", "method": "woodbury"}, ALL),
    ("obs", {"hessian": "exact", "damp_absolute": 1.0}, ALL),
    ("obs", {"hessian": "kfac"}, WEIGHTS),
    ("obs_channel", {"hessian": "kfac"}, WEIGHTS),
    ("obs_channel", {"hessian": "fisher", "block_size": 16}, WEIGHTS),
    ("obc", {"scope": "layer"}, WEIGHTS),
    ("sparsegpt", {"scope": "layer"}, WEIGHTS),
    ("wanda", {"scope": "layer"}, WEIGHTS),
]


def _run(name, hp, targets, dtype, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = _model(dtype)
        params = dict(model.named_parameters()) if targets is None else None
        kw = {"params": params} if params else {}
        if targets is not None:
            kw["params"] = {n: p for n, p in model.named_parameters() if n in targets}
        hp = dict(hp)
        scope = hp.pop("scope", "global")
        scores = saliency.score(model, name, data=_data(dtype), **kw, **hp)
        pruned = copy.deepcopy(model)
        kw2 = dict(kw)
        kw2["params"] = {n: dict(pruned.named_parameters())[n] for n in kw["params"]}
        masks = saliency.prune(
            pruned, name, 0.5, data=_data(dtype), scope=scope, keep=False, **kw2, **hp
        )
        weights = {n: p.detach().double().clone() for n, p in kw2["params"].items()}
        return {n: s.double() for n, s in scores.items()}, masks, weights
    finally:
        torch.set_num_threads(before)


def _rel(a, b):
    scale = max(float(v.abs().max()) for v in b.values()) + 1e-300
    return max(float((a[n] - b[n]).abs().max()) for n in b) / scale


@pytest.mark.parametrize(
    "name,hp,targets", CONFIGS, ids=[f"{n}-{'-'.join(map(str, h.values()))}" for n, h, _ in CONFIGS]
)
def test_same_answer_across_threads_and_precisions(name, hp, targets):
    s1, m1, w1 = _run(name, hp, targets, torch.float32, 1)
    s2, m2, w2 = _run(name, hp, targets, torch.float32, 2)
    s64, m64, w64 = _run(name, hp, targets, torch.float64, 2)
    assert _rel(s1, s2) <= 1e-5, f"1 vs 2 threads: scores differ by {_rel(s1, s2):.1e}"
    assert all(torch.equal(m1[n], m2[n]) for n in m1), "1 vs 2 threads: masks differ"
    assert _rel(w1, w2) <= 1e-5, f"1 vs 2 threads: pruned weights differ by {_rel(w1, w2):.1e}"
    assert _rel(s1, s64) <= 1e-4, f"float32 vs float64: scores differ by {_rel(s1, s64):.1e}"
    assert _rel(w1, w64) <= 1e-4, f"float32 vs float64: weights differ by {_rel(w1, w64):.1e}"


def test_key_bias_scores_exactly_zero_under_second_order_criteria():
    for hp in ({"hessian": "fisher"}, {"hessian": "exact"}):
        model = _model(torch.float64)
        params = dict(model.named_parameters())
        for name in ("obs", "obd"):
            kw = {"damp_absolute": 1.0} if name == "obs" and hp["hessian"] == "exact" else {}
            s = saliency.score(model, name, data=_data(torch.float64), params=params, **hp, **kw)
            assert torch.equal(s["k.bias"], torch.zeros(D)), (name, hp, s["k.bias"])
            assert torch.equal(s["unused.weight"], torch.zeros(D, D + 1)), (name, hp)


def test_obs_update_leaves_the_others_alone_for_a_negligible_weight():
    """Pruning only the key bias with OBS moves no other weight."""
    model = _model(torch.float64)
    params = dict(model.named_parameters())
    scores = saliency.score(model, "obs", data=_data(torch.float64), params=params)
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()}
    masks["k.bias"] = torch.zeros(D, dtype=torch.bool)
    before = {n: p.detach().clone() for n, p in params.items()}
    saliency.get_criterion("obs").apply_update(model, params, masks, scores)
    assert torch.equal(params["k.bias"].detach(), torch.zeros(D))
    assert all(torch.equal(params[n].detach(), before[n]) for n in params if n != "k.bias")


def test_dead_input_of_a_layerwise_solver_costs_nothing_and_moves_nothing():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 5, generator=g, dtype=torch.float64)
    X[:, 2] = 1e-19 * torch.randn(40, generator=g, dtype=torch.float64)  # round-off only
    H, W = 2 * X.T @ X / 40, torch.randn(4, 5, generator=g, dtype=torch.float64)
    assert solvers.dead_inputs(torch.diagonal(H)).tolist() == [False, False, True, False, False]
    for solve in (solvers.obc, solvers.sparsegpt):
        W2, keep = solve(W, H, (0.2, None))
        assert not keep[:, 2].any()  # the four weights of the dead input go first, at cost 0
        assert torch.allclose(W2[:, [0, 1, 3, 4]], W[:, [0, 1, 3, 4]])  # and move nothing
    W2, keep = solvers.wanda(W, torch.diagonal(H).sqrt(), (0.2, None))
    assert not keep[:, 2].any()


def test_negligible_threshold_is_relative_to_all_targets():
    d = {"a": torch.tensor([1.0, 2.0, 1e-30]), "b": torch.tensor([1e-12, 3.0])}
    z = negligible.zero_negligible(d)
    assert z["a"].tolist() == [1.0, 2.0, 0.0] and z["b"].tolist() == [0.0, 3.0]
    assert negligible.floored(torch.tensor(1e-40), 1.0) == pytest.approx(negligible.SQUARES)
    z = negligible.zero_negligible(d, negligible.SECOND_DERIVATIVES)
    assert z["b"].tolist() == [0.0, 3.0] and z["a"].tolist() == [1.0, 2.0, 0.0]
