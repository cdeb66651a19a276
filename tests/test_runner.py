"""The sweep runner end to end on a tiny dataset and model (seconds): records, caching,
score reuse, update / schedule criteria, predicted loss increase, workers, submitit."""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import sweep_fixtures  # noqa: E402
from sweep_fixtures import clean_zoo  # noqa: E402, F401  (autouse)

import saliency  # noqa: E402
from saliency.criteria import _REGISTRY, Scores, register_criterion  # noqa: E402
from saliency.sweep.config import parse_config, tomllib  # noqa: E402
from saliency.sweep.records import read_records  # noqa: E402
from saliency.sweep.report import markdown, summarize  # noqa: E402
from saliency.sweep.runner import plan, run_sweep  # noqa: E402

SCHEMA = {
    "run_id",
    "sweep",
    "config_hash",
    "model",
    "dataset",
    "task",
    "criterion",
    "hparams",
    "seed",
    "mode",
    "scope",
    "granularity",
    "sparsity_target",
    "sparsity",
    "layer_sparsity",
    "phase",
    "split",
    "metric",
    "value",
    "params_total",
    "params_remaining",
    "flops_dense",
    "flops_nonzero",
    "gzip_bytes",
    "score_seconds",
    "score_samples",
    "score_backward_passes",
    "predicted_loss_increase",
    "predicted_first_order",
    "predicted_joint",
    "predicted_single",
    "emptied_layers",
    "input_connected",
    "time",
    "saliency_version",
    "label",
    "settings",
    "threads",
    "unit_records",
}
CALLS: Counter = Counter()


@dataclass(frozen=True)
class HalfSquare:
    """Test criterion: 0.5 w^2 in loss units, counting its scoring passes, with an update."""

    name: ClassVar[str] = "t_halfsq"
    loss_units: ClassVar[bool] = True
    bump: float = 0.0

    def score(self, model, params, data, loss_fn):
        CALLS[self.name] += 1
        s = Scores({n: 0.5 * p.detach() ** 2 for n, p in params.items()})
        s.cost.samples, s.cost.backward_passes = 0, 0
        return s

    def apply_update(self, model, params, masks, scores):
        with torch.no_grad():  # shift the kept weights: visible if the dense copy leaked
            for n, p in params.items():
                p.add_(self.bump * masks[n])


@dataclass(frozen=True)
class Rounds:
    """Test criterion with a 3-round schedule (like SynFlow's), counting its passes."""

    name: ClassVar[str] = "t_rounds"

    def schedule(self, sparsity):
        return [sparsity / 3, 2 * sparsity / 3, sparsity]

    def score(self, model, params, data, loss_fn):
        CALLS[self.name] += 1
        return Scores({n: p.detach().abs() for n, p in params.items()})


@dataclass(frozen=True)
class Broken:
    """Test criterion that always fails."""

    name: ClassVar[str] = "t_broken"

    def score(self, model, params, data, loss_fn):
        raise RuntimeError("boom")


@dataclass(frozen=True)
class FirstLayerLast:
    """Test criterion that scores the first layer below everything else: at 90% it empties it."""

    name: ClassVar[str] = "t_first_last"

    def score(self, model, params, data, loss_fn):
        return Scores(
            {n: torch.full_like(p, float(i + 1)) for i, (n, p) in enumerate(params.items())}
        )


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is ~10x faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def test_criteria():
    classes = [HalfSquare, Rounds, Broken, FirstLayerLast]
    for c in classes:
        register_criterion(c, overwrite=True)
    CALLS.clear()
    yield
    for c in classes:
        _REGISTRY.pop(c.name, None)


def cfg_of(**changes):
    raw = tomllib.loads(sweep_fixtures.TINY)
    for k, v in changes.items():
        if isinstance(v, dict) and isinstance(raw.get(k), dict):
            raw[k] = {**raw[k], **v}
        else:
            raw[k] = v
    return parse_config(raw)


def by_unit(records):
    units = {}
    for r in records:
        units.setdefault(r["run_id"], []).append(r)
    return units


def test_tiny_sweep_all_modes_end_to_end(tmp_path):
    cfg = cfg_of(
        modes=["oneshot", "finetune", "gradual", "iterative", "init"],
        gradual={"epochs": 1},
        iterative={"rounds": 2},
        save_scores=True,
    )
    res = run_sweep(cfg, tmp_path)
    records = read_records(res.out)
    n_units = len({u.run_id for j in plan(cfg) for u in j.units})
    # dense; dense baselines with the training of finetune, gradual, iterative (init trains as
    # long as the dense model: its baseline is the dense model); criteria x sparsities x modes
    assert res.units == n_units == 2 + 2 * 3 + 2 * 2 * 2 * 5
    assert res.ran == n_units and not res.failures
    units = by_unit(records)
    assert len(units) == n_units
    for r in records:
        assert set(r) == SCHEMA, set(r) ^ SCHEMA
        assert r["sweep"] == "tiny" and r["task"] == "classification"
        assert r["split"] == ("scoring" if r["metric"] == "scoring_loss" else "test")
        assert abs(r["sparsity"] - r["sparsity_target"]) < 0.02
        assert r["params_total"] == 6 * 12 + 12 * 3
        assert r["params_remaining"] == round(r["params_total"] * (1 - r["sparsity"]))
        assert r["flops_nonzero"] <= r["flops_dense"] == 6 * 12 + 12 * 3
        assert r["gzip_bytes"] > 0 and r["metric"] in ("accuracy", "loss", "scoring_loss")
    phases = Counter((r["mode"], r["phase"]) for r in records if r["metric"] == "accuracy")
    assert phases == {
        ("dense", "dense"): 2,
        ("oneshot", "pruned"): 8,
        ("finetune", "pruned"): 8,
        ("finetune", "final"): 8 + 2,
        ("gradual", "final"): 8 + 2,
        ("iterative", "final"): 8 + 2,
        ("init", "pruned"): 8,
        ("init", "final"): 8,
    }
    dense = [r for r in records if r["criterion"] == "dense"]
    assert {(r["mode"], r["sparsity_target"], r["score_seconds"]) for r in dense} == {
        (m, 0.0, None) for m in ("dense", "finetune", "gradual", "iterative")
    }
    # every pruning mode records what its scoring cost (gradual: summed over pruning steps)
    pruned = [r for r in records if r["criterion"] != "dense"]
    assert all(r["score_seconds"] is not None and r["score_seconds"] >= 0 for r in pruned)
    # the dense model is trained once per seed and cached; scores saved per criterion and seed
    assert len(list((res.out / "cache").glob("dense-seed*.pt"))) == 2
    saved = torch.load(res.out / "scores" / "oneshot-seed1" / "magnitude.pt")
    assert set(saved) == {"1.weight", "3.weight"} and saved["1.weight"].dtype == torch.float32
    # magnitude keeps the largest weights: at least as good as random on average, pruned
    acc = {
        (r["mode"], r["label"], r["sparsity"]): r["mean"] for r in summarize(records, ("accuracy",))
    }
    assert acc[("oneshot", "magnitude", 0.5)] >= acc[("oneshot", "random", 0.5)] - 0.05
    # rerunning is a no-op
    again = run_sweep(cfg, tmp_path)
    assert again.ran == 0 and again.skipped == n_units
    assert len(read_records(res.out)) == len(records)


def test_one_scoring_pass_per_curve_update_on_copies_and_predicted_loss(tmp_path, test_criteria):
    cfg = cfg_of(
        criteria=[{"name": "t_halfsq", "bump": 0.25}, "t_rounds"], sparsities=[0.3, 0.6, 0.9]
    )
    run_sweep(cfg, tmp_path)
    # one pass of t_halfsq per seed for 3 sparsities x 2 modes; t_rounds re-scores every round
    assert CALLS["t_halfsq"] == 2
    assert CALLS["t_rounds"] == 2 * 3 * 3
    records = read_records(tmp_path / "tiny")
    dense_model = saliency.sweep.jobs.dense_model(cfg, tmp_path / "tiny", 0)
    params = saliency.prunable_parameters(dense_model)
    full = torch.cat([0.5 * p.detach().flatten() ** 2 for p in params.values()]).sort().values
    for r in records:
        if r["criterion"] == "t_halfsq" and r["seed"] == 0 and r["phase"] == "pruned":
            k = round(r["sparsity_target"] * full.numel())
            assert r["predicted_loss_increase"] == pytest.approx(float(full[:k].sum()), rel=1e-5)
            assert r["hparams"] == {"bump": 0.25}
            assert isinstance(r["predicted_first_order"], float)
        if r["criterion"] == "t_rounds":
            assert r["predicted_loss_increase"] is None and r["predicted_first_order"] is None
    # the update ran on a copy per sparsity: pruned loss differs from a no-update run, and
    # each sparsity started from the same dense weights (cache untouched)
    loss = {
        (r["criterion"], r["sparsity_target"]): r["value"]
        for r in records
        if r["seed"] == 0
        and r["phase"] == "pruned"
        and r["metric"] == "loss"
        and r["mode"] == "oneshot"
    }
    cfg2 = cfg_of(criteria=[{"name": "t_halfsq", "bump": 0.0}], sparsities=[0.3, 0.6, 0.9])
    run_sweep(cfg2, tmp_path / "b")
    loss2 = {
        r["sparsity_target"]: r["value"]
        for r in read_records(tmp_path / "b" / "tiny")
        if r["seed"] == 0
        and r["phase"] == "pruned"
        and r["metric"] == "loss"
        and r["mode"] == "oneshot"
    }
    assert all(loss[("t_halfsq", s)] != pytest.approx(loss2[s]) for s in (0.3, 0.6, 0.9))
    after = saliency.sweep.jobs.dense_model(cfg, tmp_path / "tiny", 0).state_dict()
    assert all(torch.equal(after[k], v) for k, v in dense_model.state_dict().items())


def test_records_say_which_layers_were_emptied_and_whether_the_input_still_counts(
    tmp_path, test_criteria, caplog
):
    cfg = cfg_of(criteria=["t_first_last", "magnitude"], seeds=[0], modes=["oneshot", "finetune"])
    records = read_records(run_sweep(cfg, tmp_path).out)
    facts = {
        (r["criterion"], r["mode"], r["sparsity_target"]): (
            r["emptied_layers"],
            r["input_connected"],
        )
        for r in records
    }
    assert facts[("dense", "dense", 0.0)] == ([], True)
    assert facts[("magnitude", "oneshot", 0.9)] == ([], True)
    # 72 + 36 weights: 50% prunes 54 of the first layer's 72, 90% all of them and 25 more
    assert facts[("t_first_last", "oneshot", 0.5)] == ([], True)
    for mode in ("oneshot", "finetune"):  # fine-tuning with the masks attached cannot reconnect
        assert facts[("t_first_last", mode, 0.9)] == (["1.weight"], False)
    assert "layer collapse at sparsity 0.9" in caplog.text and "'1.weight'" in caplog.text
    # records written before these fields existed still read, and report
    old = [{k: v for k, v in r.items() if k not in ("emptied_layers", "input_connected")}
           for r in records]  # fmt: skip
    assert markdown(old) == markdown(records)


def test_failing_criterion_is_skipped_or_raised(tmp_path, test_criteria):
    cfg = cfg_of(criteria=["t_broken", "magnitude"], seeds=[0])
    with pytest.raises(RuntimeError, match="boom"):
        run_sweep(cfg, tmp_path / "a")
    res = run_sweep(cfg, tmp_path / "b", on_error="skip")
    assert [(f["criterion"], f["error"]) for f in res.failures] == [
        ("t_broken", "RuntimeError: boom")
    ]
    crits = {r["criterion"] for r in read_records(res.out)}
    assert crits == {"dense", "magnitude"}


def test_report_markdown_mean_and_std(tmp_path):
    res = run_sweep(cfg_of(modes=["oneshot"]), tmp_path)
    md = markdown(read_records(res.out))
    assert "### oneshot: accuracy (%), mean ± std over 2 seed(s)" in md
    assert "| criterion | 0.5 | 0.9 |" in md and "| magnitude |" in md and "±" in md
    assert "### dense: loss" in md


def test_tensorboard_logging(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = cfg_of(modes=["oneshot", "gradual"], seeds=[0], tensorboard=True, gradual={"epochs": 1})
    res = run_sweep(cfg, tmp_path)
    tb = res.out / "tensorboard" / "magnitude"
    assert list((tb / "oneshot-seed0").glob("events.*"))
    assert list((tb / "gradual-s0.9-seed0").glob("events.*"))


def test_workers_give_the_same_records(tmp_path):
    cfg = cfg_of(modes=["oneshot", "finetune"])
    serial = read_records(run_sweep(cfg, tmp_path / "s").out)
    res = run_sweep(cfg, tmp_path / "p", workers=2)
    parallel = read_records(res.out)
    assert res.ran == res.units and len(parallel) == len(serial)

    def key(r):
        return (r["run_id"], r["phase"], r["metric"])

    a = {key(r): r["value"] for r in serial}
    b = {key(r): r["value"] for r in parallel}
    assert a.keys() == b.keys() and len(b) == len(parallel)  # no duplicates
    assert all(a[k] == pytest.approx(b[k], abs=1e-5) for k in a)


def test_submitit_local_executor(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    # submitit's local jobs are fresh interpreters: they import sweep_plugin from PYTHONPATH
    here = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", here + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cfg = cfg_of(modes=["oneshot"], seeds=[0], criteria=["magnitude"])
    res = run_sweep(cfg, tmp_path, executor="submitit", cluster="local")
    assert res.ran == res.units == 3 and not res.failures
    assert len(read_records(res.out)) == 3 * 3  # accuracy, loss, scoring_loss


def test_run_sweep_argument_errors(tmp_path):
    cfg = cfg_of()
    for kw, match in [
        ({"workers": 0}, "workers"),
        ({"on_error": "ignore"}, "on_error"),
        ({"executor": "ray"}, "executor"),
    ]:
        with pytest.raises(ValueError, match=match):
            run_sweep(cfg, tmp_path, **kw)
    # what allocation or the model would refuse is refused before any work, naming it
    from saliency.sweep.config import ConfigError

    for change, match in [
        ({"granularity": "blocks"}, "unknown granularity 'blocks'"),
        ({"granularity": "block"}, "block=\\(h, w\\)"),
        ({"granularity": "block", "allocate": {"block": [2, 2], "pooling": "min"}}, "pooling"),
        ({"targets": {"include": "nothing.*"}}, "nothing"),
        ({"model_kwargs": {"width": 3}}, "width"),
        ({"device": "tpu"}, "device"),
    ]:
        with pytest.raises((ConfigError, TypeError, ValueError), match=match):
            run_sweep(cfg_of(**change), tmp_path)
    assert not (tmp_path / "tiny").exists()
    assert dataclasses.is_dataclass(cfg)


def test_report_separates_sweeps(tmp_path):
    run_sweep(cfg_of(modes=["oneshot"], seeds=[0]), tmp_path)
    run_sweep(cfg_of(modes=["oneshot"], seeds=[0], name="other"), tmp_path)
    md = markdown(read_records(tmp_path / "tiny", tmp_path / "other"))
    assert "### tiny, oneshot: accuracy" in md and "### other, oneshot: accuracy" in md


def test_changed_config_is_reported_and_drawn_apart_never_mixed(tmp_path):
    """The issue's sequence: run; rerun with train.epochs changed; rerun the first config with
    one more sparsity. Nothing is lost, and no table mixes the two configurations."""
    from saliency.sweep.records import config_groups

    first = cfg_of(modes=["oneshot"], seeds=[0])
    run_sweep(first, tmp_path)
    n = len(read_records(tmp_path / "tiny"))
    run_sweep(cfg_of(modes=["oneshot"], seeds=[0], train={"epochs": 1}), tmp_path)
    third = run_sweep(cfg_of(modes=["oneshot"], seeds=[0], sparsities=[0.5, 0.9, 0.95]), tmp_path)
    assert third.ran == 2  # only the new sparsity: the first config's units are done
    assert any("differing in train.epochs" in note for note in third.notes), third.notes
    records = read_records(tmp_path / "tiny")
    assert len(records) == 2 * n + 2 * 3  # nothing written is lost
    groups = config_groups(records)
    assert [label for label, _ in groups] == ["train.epochs=2", "train.epochs=1"]  # newest first
    for label, members in groups:
        epochs = {r["settings"]["train"]["epochs"] for r in members}
        assert epochs == {int(label[-1])}
    assert {r["sparsity_target"] for r in groups[0][1]} == {0.0, 0.5, 0.9, 0.95}
    assert {r["sparsity_target"] for r in groups[1][1]} == {0.0, 0.5, 0.9}
    md = markdown(records)
    assert "## Configuration 1 of 2: train.epochs=2" in md
    assert "## Configuration 2 of 2: train.epochs=1" in md
    assert "mean ± std over 1 seed(s)" in md and "over 2 seed(s)" not in md
    # another seed of the same configuration joins it (no new configuration)
    run_sweep(cfg_of(modes=["oneshot"], seeds=[0, 1], sparsities=[0.5, 0.9, 0.95]), tmp_path)
    groups = config_groups(read_records(tmp_path / "tiny"))
    assert len(groups) == 2 and {r["seed"] for r in groups[0][1]} == {0, 1}


def test_changed_hparams_under_one_label_split_too(tmp_path, test_criteria):
    from saliency.sweep.records import config_groups

    run_sweep(cfg_of(modes=["oneshot"], seeds=[0], criteria=[{"name": "t_halfsq"}]), tmp_path)
    crit = [{"name": "t_halfsq", "bump": 0.5}]
    run_sweep(cfg_of(modes=["oneshot"], seeds=[0], criteria=crit), tmp_path)
    labels = [label for label, _ in config_groups(read_records(tmp_path / "tiny"))]
    assert labels == ["t_halfsq.bump=0.5", "t_halfsq.bump=0.0"]


def test_first_order_term_against_autograd():
    from saliency.sweep.units import first_order_change, loss_gradient

    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    x, y = torch.randn(20, 5), torch.randint(0, 3, (20,))
    pruned = copy.deepcopy(dense)
    with torch.no_grad():
        for p in pruned.parameters():
            p.mul_(torch.rand(p.shape) > 0.5).add_(0.01)
    names = [n for n, _ in dense.named_parameters()]
    w0 = {n: p.detach() for n, p in dense.named_parameters()}

    def full_batch_loss(w):
        return F.cross_entropy(torch.func.functional_call(dense, w, (x,)), y)

    g = torch.func.grad(full_batch_loss)(w0)
    after = dict(pruned.named_parameters())
    expected = sum(float((g[n] * (after[n].detach() - w0[n])).sum()) for n in names)
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]  # unequal batches: the mean is over samples
    got = first_order_change(loss_gradient(dense, batches, F.cross_entropy), dense, pruned)
    assert got == pytest.approx(expected, rel=1e-5)


def test_gradual_from_scratch(tmp_path):
    cfg = cfg_of(modes=["gradual"], seeds=[0], gradual={"start": "init", "epochs": 2})
    res = run_sweep(cfg, tmp_path)
    recs = [r for r in read_records(res.out) if r["mode"] == "gradual"]
    assert recs and all(abs(r["sparsity"] - r["sparsity_target"]) < 0.02 for r in recs)
    other = cfg_of(modes=["gradual"], seeds=[0], gradual={"start": "dense", "epochs": 2})
    assert {u.run_id for j in plan(cfg) for u in j.units if u.mode == "gradual"}.isdisjoint(
        u.run_id for j in plan(other) for u in j.units if u.mode == "gradual"
    )


def test_layerwise_solvers_run_in_a_sweep_on_its_scoring_data(tmp_path):
    """OBC / SparseGPT / Wanda get the sweep's scoring data (they ignore scores); the records
    hold the exact sparsity and the solve time."""
    cfg = cfg_of(seeds=[0], sparsities=[0.5], modes=["oneshot"], scope="layer",
                 criteria=["wanda", "sparsegpt", "obc"])  # fmt: skip
    res = run_sweep(cfg, tmp_path)
    assert res.ran == res.units == 4 and not res.failures
    pruned = [r for r in read_records(res.out) if r["criterion"] != "dense"]
    assert {r["criterion"] for r in pruned} == {"wanda", "sparsegpt", "obc"}
    assert all(abs(r["sparsity"] - 0.5) < 1e-6 and r["score_seconds"] > 0 for r in pruned)


def test_report_keeps_granularities_apart():
    from saliency.sweep.report import markdown

    def rec(g, v, seed=0):
        return {"run_id": f"{g}{seed}", "phase": "pruned", "mode": "oneshot", "granularity": g,
                "criterion": "wanda", "metric": "perplexity", "sparsity_target": 0.5, "value": v}  # fmt: skip

    text = markdown([rec("element", 6.0), rec("element", 8.0, 1), rec("2:4", 9.0)])
    assert "### oneshot, element: perplexity, mean ± std over 2 seed(s)" in text
    assert (
        "| wanda | 7 ± 1.4 |" in text and "### oneshot, 2:4" in text and "| wanda | 9 ± 0 |" in text
    )


def test_obs_records_carry_joint_and_single_predictions(tmp_path):
    """OBS records hold the joint quadratic 1/2 w_Q^T (Hinv_QQ)^-1 w_Q and the one-weight sum,
    recomputed here from OBS's own inverse on the dense model; OBD records neither."""
    from saliency.criteria.obs import OBS, predicted_increase
    from saliency.sweep.units import scoring_data, targets

    obs = {"name": "obs", "n_samples": 64, "block_size": 16}
    cfg = cfg_of(criteria=[obs, {"name": "obd", "n_samples": 64}], sparsities=[0.5, 0.8],
                 modes=["oneshot"], seeds=[0])  # fmt: skip
    run_sweep(cfg, tmp_path)
    records = [r for r in read_records(tmp_path / "tiny") if r["phase"] == "pruned"]
    dense = saliency.sweep.jobs.dense_model(cfg, tmp_path / "tiny", 0)
    crit = OBS(n_samples=64, block_size=16)
    scores = saliency.score(dense, crit, data=scoring_data(cfg, 0), params=targets(cfg, dense))
    for r in records:
        if r["criterion"] == "obd":
            assert r["predicted_joint"] is None and r["predicted_single"] is None
            continue
        masks = saliency.allocate(scores, r["sparsity_target"])
        want = predicted_increase(scores.extra["obs"], targets(cfg, dense), masks)
        assert r["predicted_joint"] == pytest.approx(want["joint"], rel=1e-4)
        assert r["predicted_single"] == pytest.approx(want["single"], rel=1e-4)
        assert r["predicted_joint"] > 0 and r["predicted_single"] > 0
