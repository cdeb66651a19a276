"""What users pass as data and losses: accepted in every common form, or a clear error."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import saliency

CRITERIA = ["obd", "obs", "snip", "taylor", "taylor_weight", "grasp"]


@pytest.fixture
def regression():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    return model, torch.randn(24, 4), torch.randn(24, 1)


@pytest.mark.parametrize("crit", CRITERIA)
def test_a_dataset_a_loader_and_one_pair_give_the_same_scores(regression, crit):
    model, x, y = regression
    loss = nn.MSELoss()
    ways = [TensorDataset(x, y), DataLoader(TensorDataset(x, y), batch_size=24), (x, y)]
    got = [saliency.score(model, crit, data=d, loss_fn=loss, n_samples=24) for d in ways]
    for s in got[1:]:
        assert all(torch.allclose(s[n], got[0][n]) for n in s)


@pytest.mark.parametrize("crit", CRITERIA)
def test_regression_targets_with_the_default_cross_entropy_say_what_to_pass(regression, crit):
    model, x, y = regression
    with pytest.raises(ValueError, match="default loss is cross-entropy.*MSELoss"):
        saliency.score(model, crit, data=(x, y))


@pytest.mark.parametrize("crit", CRITERIA)
def test_an_unreduced_loss_is_refused_before_any_work(regression, crit):
    model, x, y = regression
    with pytest.raises(ValueError, match="must return a scalar"):
        saliency.score(model, crit, data=(x, y), loss_fn=nn.MSELoss(reduction="none"))


def test_single_samples_instead_of_batches_are_explained():
    with pytest.raises(ValueError, match="samples on dim 0"):
        list(saliency.criteria.iter_batches([(torch.randn(4), torch.tensor(1))]))
