"""The registry, and the contract every registered criterion must honour (tested the moment it registers)."""

import copy
import dataclasses

import pytest
import torch

import saliency
from saliency import available_criteria, get_criterion, register_criterion
from saliency.criteria import _REGISTRY


def test_register_with_overwrite_guard():
    @register_criterion
    @dataclasses.dataclass(frozen=True)
    class Ones:
        name = "test_ones"

        def score(self, model, params, data=None, loss_fn=None):
            return {n: torch.ones_like(p) for n, p in params.items()}

    try:
        assert "test_ones" in available_criteria()
        with pytest.raises(ValueError, match="already registered.*overwrite=True"):

            @register_criterion
            class Other:
                name = "test_ones"

                def score(self, model, params, data, loss_fn): ...

        assert register_criterion(Ones, overwrite=True) is Ones
        with pytest.raises(TypeError, match="string class attribute `name`"):
            register_criterion(type("NoName", (), {"score": lambda *a: None}))
    finally:
        _REGISTRY.pop("test_ones", None)


def test_unknown_name_lists_known_ones():
    with pytest.raises(
        ValueError, match="unknown criterion 'nope'; available: .*magnitude.*random"
    ):
        get_criterion("nope")


def test_descriptions_are_one_line():
    for name, text in saliency.describe_criteria().items():
        assert text and "\n" not in text, name


@pytest.mark.parametrize("name", available_criteria())
def test_criterion_contract(name):
    saliency.check_criterion(name)  # the public checker: a new criterion is checked on registering


@dataclasses.dataclass(frozen=True)
class _LeavesGrad:
    name = "t_leaves_grad"

    def score(self, model, params, data, loss_fn):
        x, y = data[0]
        loss_fn(model(x), y).backward()  # and never clears .grad
        return {n: p.detach().abs() for n, p in params.items()}


@dataclasses.dataclass(frozen=True)
class _LeavesTrainMode:
    name = "t_train_mode"

    def score(self, model, params, data, loss_fn):
        model.train()
        return {n: p.detach().abs() for n, p in params.items()}


@dataclasses.dataclass(frozen=True)
class _Nondeterministic:
    name = "t_nondet"

    def score(self, model, params, data, loss_fn):
        return {n: torch.rand(p.shape) for n, p in params.items()}


@pytest.mark.parametrize(
    "crit, rule",
    [
        (_LeavesGrad(), "changed the model's .grad"),
        (_LeavesTrainMode(), "changed the model's training modes"),
        (_Nondeterministic(), "differ between two calls"),
    ],
)
def test_check_criterion_catches_broken_criteria(crit, rule):
    with pytest.raises(saliency.CriterionContractError, match=rule):
        saliency.check_criterion(crit)
    assert isinstance(saliency.CriterionContractError("x"), AssertionError)


def test_check_criterion_accepts_a_class_and_a_name_with_hparams():
    saliency.check_criterion(type(get_criterion("magnitude")))
    saliency.check_criterion("random", seed=3)


def test_entry_point_plugins_register(monkeypatch):
    import saliency.criteria as reg

    @dataclasses.dataclass(frozen=True)
    class Plugged:
        name = "test_plugged"

        def score(self, model, params, data=None, loss_fn=None):
            return {n: p.detach().abs() for n, p in params.items()}

    class FakeEntryPoint:
        name = "test_plugged"

        def load(self):
            return Plugged

    class BrokenEntryPoint:
        name = "test_broken"

        def load(self):
            raise ImportError("plug-in not importable")

    monkeypatch.setattr(reg, "_ENTRY_POINTS_LOADED", False)
    monkeypatch.setattr(
        reg.importlib.metadata, "entry_points", lambda group: [FakeEntryPoint(), BrokenEntryPoint()]
    )
    try:
        assert "test_plugged" in available_criteria() and "test_broken" not in available_criteria()
        assert isinstance(get_criterion("test_plugged"), Plugged)
    finally:
        _REGISTRY.pop("test_plugged", None)


def test_random_scores_are_not_a_copy_of_the_seeded_initialization():
    """torch.manual_seed(s) then default init draws the stream a Generator seeded with s would."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(200, 100)
    scores = saliency.score(layer, "random", seed=0)["weight"].flatten()
    r = torch.corrcoef(torch.stack([layer.weight.detach().flatten(), scores]))[0, 1]
    assert abs(float(r)) < 0.05


def test_sweep_seeds_give_seeded_criteria_their_own_draws():
    from saliency.sweep.config import CriterionSpec
    from saliency.sweep.units import build_criterion

    spec = CriterionSpec("random", {}, "random")
    assert build_criterion(spec, 3).seed == 3 and build_criterion(spec, 4).seed == 4
    assert build_criterion(CriterionSpec("random", {"seed": 7}, "random"), 3).seed == 7
    assert build_criterion(CriterionSpec("magnitude", {}, "magnitude"), 3).name == "magnitude"


def test_random_at_channel_granularity_draws_per_channel(mlp):
    """Per-weight draws reduced over channels favour pruning small layers (output classes)."""
    crit = get_criterion("random", per="channel", seed=1)
    s = crit.score(mlp, saliency.prunable_parameters(mlp), None)
    assert all(bool((v == v[:, :1]).all()) for v in s.values())
    fc3 = []
    for seed in range(4):
        masks = saliency.prune(copy.deepcopy(mlp), "random", 0.3, granularity="channel", seed=seed)
        fc3.append(masks.layer_sparsity()["5.weight"])
    assert sum(fc3) / len(fc3) < 0.6, fc3  # per-weight draws + L2 would prune all of it
    from saliency.sweep.config import CriterionSpec
    from saliency.sweep.units import build_criterion

    sweep_crit = build_criterion(CriterionSpec("random", {}, "random"), 0, "channel")
    assert sweep_crit.per == "channel"
    with pytest.raises(ValueError, match="per must be"):
        get_criterion("random", per="block")
