import copy

import pytest
import torch
from torch import nn

import saliency
from saliency import GradualPruner, PolynomialDecay, attached_masks, prunable_parameters


def test_prune_attaches_and_reprune_is_monotone(mlp):
    m1 = saliency.prune(mlp, "random", 0.5, seed=1)
    m2 = saliency.prune(mlp, "random", 0.8, seed=2)  # continues from the attached masks
    assert m2.zeros == round(0.8 * m2.numel)
    assert all(not (m2[n] & ~m1[n]).any() for n in m1)
    assert attached_masks(mlp) == m2


def test_prune_one_layer_keeps_other_layers_masks(mlp):
    saliency.prune(mlp, "magnitude", 0.5)
    first = prunable_parameters(mlp, include="1.weight")
    saliency.prune(mlp, "magnitude", 0.9, params=first)
    report = {r["name"]: r["sparsity"] for r in attached_masks(mlp).layer_report()}
    assert report["1.weight"] == pytest.approx(0.9, abs=1e-5) and report["3.weight"] > 0


def test_keep_false_only_zeros(tiny_mlp):
    masks = saliency.prune(tiny_mlp, "magnitude", 0.5, keep=False)
    assert attached_masks(tiny_mlp) is None and masks.sparsity == pytest.approx(0.5, abs=0.05)


def test_hparams_and_allocate_kwargs_are_routed(tiny_mlp):
    with pytest.raises(TypeError, match="no hyperparameter.*bogus.*accepted: per, seed"):
        saliency.prune(tiny_mlp, "random", 0.5, bogus=1)
    masks = saliency.prune(tiny_mlp, "random", 0.5, seed=3, max_layer_sparsity=0.6, scope="global")
    assert max(masks.layer_sparsity().values()) <= 0.6


def test_score_reports_cost_and_checks_criterion_output(tiny_mlp):
    s = saliency.score(tiny_mlp, "magnitude")
    assert s.cost.seconds >= 0 and set(s) == {"0.weight", "2.weight"}

    class Broken:
        name = "broken"

        def score(self, model, params, data, loss_fn):
            return {"0.weight": torch.zeros(1)}

    with pytest.raises(ValueError, match="broken"):
        saliency.score(tiny_mlp, Broken())


def test_gradual_pruner_follows_polynomial_schedule(tiny_mlp):
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    opt = torch.optim.SGD(tiny_mlp.parameters(), lr=0.05, momentum=0.9)
    sched = PolynomialDecay(0.2, 0.8, begin_step=10, end_step=50, frequency=10)
    pruner = GradualPruner(tiny_mlp, "magnitude", sched, optimizer=opt)
    seen = []
    for _ in range(80):
        opt.zero_grad()
        nn.functional.cross_entropy(tiny_mlp(x), y).backward()
        opt.step()
        masks = pruner.step()
        seen.append(0.0 if masks is None else masks.sparsity)
    assert seen[9] == 0.0 and seen[10] == pytest.approx(0.2, abs=0.03)
    assert seen[-1] == pytest.approx(0.8, abs=0.03)
    assert all(a <= b + 1e-12 for a, b in zip(seen, seen[1:], strict=False))
    params = prunable_parameters(tiny_mlp)
    assert all(not params[n].detach()[~m].any() for n, m in masks.items())


def test_gradual_pruner_rejects_non_schedules(tiny_mlp):
    with pytest.raises(TypeError, match="should_prune"):
        GradualPruner(tiny_mlp, "magnitude", 0.5)


def test_prune_and_gradual_pruner_report_their_scoring_cost(mlp):
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    cost = saliency.Cost(backward_passes=0)
    saliency.prune(mlp, "snip", 0.3, data=[(x, y)], cost=cost, keep=False)
    assert cost.samples == 32 and cost.backward_passes >= 1 and cost.seconds > 0
    pruner = saliency.GradualPruner(
        mlp, "snip", saliency.PolynomialDecay(0.1, 0.5, 0, 4, frequency=2), data=[(x, y)]
    )
    for _ in range(5):
        pruner.step()
    assert pruner.cost.samples == 3 * 32  # pruned at steps 0, 2 and 4


def test_reduce_none_means_the_criterion_channel_reduce():
    """A sweep passes reduce=None; the criterion's channel_reduce must still apply."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6))
    x, y = torch.randn(16, 4), torch.randint(0, 6, (16,))
    scores = saliency.score(model, "obd", data=[(x, y)], hessian="fisher")
    by_sum = saliency.allocate(scores, 0.5, granularity="channel", reduce="sum")
    a = saliency.prune(copy.deepcopy(model), "obd", 0.5, data=[(x, y)], granularity="channel",
                       hessian="fisher", reduce=None, keep=False)  # fmt: skip
    assert a == by_sum
