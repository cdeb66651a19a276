"""Layer collapse is never silent (issue 23): emptied layers, outputs cut from the input and
all-zero scores are warned about; ties are not broken in model order."""

import warnings

import pytest
import torch
from torch import nn

import saliency
from saliency import LayerCollapseWarning, ZeroScoreWarning


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def _data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g))]


def test_emptied_layer_and_cut_output_are_warned_and_shown():
    model = _mlp()
    with torch.no_grad():
        model[0].weight.mul_(1e-3)  # the smallest scale: global magnitude takes it whole
    with pytest.warns(
        LayerCollapseWarning, match=r"emptied 1 layer\(s\): '0.weight'.*no longer depends"
    ):
        masks = saliency.prune(model, "magnitude", 0.5, data=_data())
    assert masks.emptied() == ["0.weight"]
    assert "EMPTIED" in masks.table().splitlines()[1]
    assert [r["emptied"] for r in masks.layer_report()] == [True, False, False, False]


def test_a_healthy_prune_is_quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        masks = saliency.prune(_mlp(), "magnitude", 0.5, data=_data())
    assert not masks.emptied() and "EMPTIED" not in masks.table()


def test_zero_scores_are_named_and_not_pruned_in_model_order():
    model = _mlp()
    with torch.no_grad():
        model[4].weight.zero_()  # a zero-initialised head: every gradient upstream is 0
    with pytest.warns(
        ZeroScoreWarning, match=r"'snip' scored every weight of '0.weight', '2.weight'"
    ):
        masks = saliency.prune(model, "snip", 0.5, data=_data())
    # 0.weight and 2.weight (96 of 120 weights) tie at 0 with the zeroed head: before, the first
    # layer in model order (0.weight, 32 weights) was emptied whole, now the zeros are spread
    assert not masks.emptied()
    assert 0.2 < masks.layer_sparsity()["0.weight"] < 0.8


def test_no_data_no_input_check():
    model = _mlp()
    with torch.no_grad():
        model[0].weight.mul_(1e-3)
    with pytest.warns(LayerCollapseWarning, match="emptied") as rec:
        saliency.prune(model, "magnitude", 0.5)
    assert "no longer depends" not in str(rec[0].message)


def test_one_pass_iterators_are_left_to_the_criterion():
    model = _mlp()
    masks = saliency.prune(model, "snip", 0.5, data=iter(_data()))
    assert masks.zeros == 60
