"""Every figure and table renders from a small synthetic records file (schema of notes/records.md)."""

from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path

import matplotlib
import pytest
import torch

from saliency.plotting import (
    accuracy_vs_sparsity,
    build_all,
    criterion_style,
    plot_accuracy_vs_sparsity,
)
from saliency.sweep.records import append_records, read_records

CRITERIA = ["magnitude", "random", "obd", "obs"]
SPARSITIES = [0.5, 0.8, 0.9, 0.95]
SEEDS = [0, 1, 2]
LAYERS = {"fc1.weight": (16, 8), "fc2.weight": (4, 16)}


def _base(crit, seed, mode, target, task="classification"):
    cfg = json.dumps([crit, seed, mode, target])
    return {
        "run_id": hashlib.sha256(cfg.encode()).hexdigest()[:12],
        "sweep": "synthetic",
        "config_hash": "x",
        "model": "mlp",
        "dataset": "toy",
        "task": task,
        "criterion": crit,
        "hparams": {},
        "seed": seed,
        "mode": mode,
        "scope": "global",
        "granularity": "element",
        "sparsity_target": target,
        "sparsity": target,
        "split": "test",
        "time": 0.0,
        "saliency_version": "0.1.0",
    }


def make_records(task="classification", criteria=CRITERIA, modes=("oneshot", "finetune")):
    """Accuracy falls with sparsity, faster for worse criteria; OBD/OBS carry a predicted loss."""
    rng = random.Random(0)
    quality = {"magnitude": 1.0, "random": 3.0, "obd": 0.8, "obs": 0.6, "snip": 1.2}
    metric = "accuracy" if task == "classification" else "mse"
    recs = []
    for seed in SEEDS:
        dense = _base("dense", seed, "dense", 0.0, task)
        dense.update(phase="dense", layer_sparsity={n: 0.0 for n in LAYERS})
        acc0 = 0.95 + 0.01 * rng.random()
        recs += [
            {**dense, "metric": metric, "value": acc0 if task == "classification" else 0.1},
            {**dense, "metric": "loss", "value": 0.2},
        ]
        for crit in criteria:
            q = quality.get(crit, 1.5)
            for mode in modes:
                for s in SPARSITIES:
                    r = _base(crit, seed, mode, s, task)
                    drop = q * s**4 * (0.3 if mode == "finetune" else 1.0) + 0.01 * rng.random()
                    ls = {"fc1.weight": min(1.0, s * (1.1 - 0.1 * q)), "fc2.weight": s * 0.7}
                    pred = 0.5 * q * s**3 if crit in ("obd", "obs") else None
                    r.update(
                        layer_sparsity=ls,
                        params_total=192,
                        params_remaining=round(192 * (1 - s)),
                        score_seconds=0.01 * q * (3 if crit == "obs" else 1),
                        score_samples=0 if crit in ("magnitude", "random") else 256,
                        score_backward_passes=0,
                        predicted_loss_increase=pred,
                    )
                    val = max(0.1, acc0 - drop) if task == "classification" else 0.1 + drop
                    phases = ["pruned", "final"] if mode == "finetune" else ["pruned"]
                    for ph in phases:
                        v = val if ph == "final" or mode == "oneshot" else val - 0.1
                        recs += [
                            {**r, "phase": ph, "metric": metric, "value": v},
                            {**r, "phase": ph, "metric": "loss", "value": 0.2 + q * s**3 * 0.6},
                        ]
    return recs


def write_results(root: Path, task="classification", criteria=CRITERIA, scores=True) -> Path:
    d = root / "results" / "synthetic"
    append_records(d, make_records(task, criteria))
    if scores:
        g = torch.Generator().manual_seed(0)
        base = {n: torch.randn(shape, generator=g) for n, shape in LAYERS.items()}
        for seed in SEEDS:
            sd = d / "scores" / f"oneshot-seed{seed}"
            sd.mkdir(parents=True)
            for i, crit in enumerate(criteria):
                noisy = {
                    n: (b.abs() + i * 0.3 * torch.rand(b.shape, generator=g)).float()
                    for n, b in base.items()
                }
                torch.save(noisy, sd / f"{crit}.pt")
    return d


@pytest.fixture
def results(tmp_path):
    return write_results(tmp_path)


def _labels(ax):
    return [ln.get_label() for ln in ax.get_lines()]


def test_style_is_stable_and_distinct():
    assert criterion_style("obs") == criterion_style("obs")
    colors = {
        criterion_style(c)["color"]
        for c in [
            "dense",
            "magnitude",
            "random",
            "obd",
            "obs",
            "snip",
            "taylor",
            "taylor_weight",
            "grasp",
            "synflow",
        ]
    }
    assert len(colors) == 10
    a = criterion_style("my_new_criterion")
    assert a == criterion_style("my_new_criterion") and a["color"].startswith("#")
    assert a != criterion_style("my_other_criterion")


def test_import_and_calls_leave_rcparams_alone(results, tmp_path):
    before = dict(matplotlib.rcParams)
    accuracy_vs_sparsity(read_records(results), tmp_path / "f")
    after = dict(matplotlib.rcParams)
    assert {k for k in before if before[k] != after[k]} == set()


@pytest.mark.parametrize("band", ["std", "ci95"])
def test_accuracy_vs_sparsity_axes(results, band):
    fig = plot_accuracy_vs_sparsity(read_records(results), band=band)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["One-shot (no retraining)", "One-shot + fine-tuning"]
    for ax in axes:
        labels = _labels(ax)
        assert sorted(lab for lab in labels if lab != "dense") == sorted(CRITERIA)
        assert labels.count("dense") == 1
        assert len(ax.collections) == len(CRITERIA)  # one fill_between band per criterion
        assert ax.get_xlabel() == "Sparsity s"
        ys = ax.get_lines()[0].get_ydata()
        assert 0 < min(ys) and max(ys) <= 100  # accuracy shown in percent
    assert axes[0].get_ylabel() == "Test accuracy (%)"
    assert len(fig.legends) == 1


def test_accuracy_vs_sparsity_files(results, tmp_path):
    paths = accuracy_vs_sparsity(read_records(results), tmp_path / "out", stem="acc")
    names = sorted(p.name for p in paths)
    assert names == ["acc.pdf", "acc.png", "acc.txt"]
    assert all(p.stat().st_size > 1000 for p in paths if p.suffix != ".txt")
    assert "standard deviation" in (tmp_path / "out" / "acc.txt").read_text()
    from matplotlib.image import imread

    h, w = imread(tmp_path / "out" / "acc.png").shape[:2]
    assert w == round(6.75 * 200)  # double column (two panels) at 200 dpi


def test_compression_axis_is_log(results):
    fig = plot_accuracy_vs_sparsity(read_records(results), xaxis="compression")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert math.isclose(max(ax.get_lines()[0].get_xdata()), 1 / (1 - 0.95))


def test_regression_uses_mse(tmp_path):
    d = write_results(tmp_path, task="regression", scores=False)
    fig = plot_accuracy_vs_sparsity(read_records(d))
    assert fig.axes[0].get_ylabel() == "Test MSE"


def test_single_seed_and_single_mode(tmp_path):
    recs = [r for r in make_records(modes=("oneshot",)) if r["seed"] == 0]
    fig = plot_accuracy_vs_sparsity(recs)
    assert len([a for a in fig.axes if a.get_visible()]) == 1
    assert fig.get_figwidth() == 3.25


def test_bad_arguments(results):
    with pytest.raises(ValueError, match="band"):
        plot_accuracy_vs_sparsity(read_records(results), band="sem")
    with pytest.raises(ValueError, match="xaxis"):
        plot_accuracy_vs_sparsity(read_records(results), xaxis="density")


def test_build_all_writes_every_figure(results, tmp_path):
    paths = build_all([results], tmp_path / "figs")
    stems = {p.stem for p in paths}
    assert {"accuracy_vs_sparsity", "accuracy_vs_compression", "loss_prediction"} <= stems
    assert all(p.exists() for p in paths)


def test_build_all_skips_what_records_lack(tmp_path, caplog):
    d = tmp_path / "r"
    recs = [r for r in make_records(criteria=["magnitude"]) if r["metric"] != "loss"]
    for r in recs:
        r.pop("layer_sparsity")
        r["predicted_loss_increase"] = None
    append_records(d, recs)
    with caplog.at_level("INFO"):
        paths = build_all([d], tmp_path / "figs")
    stems = {p.stem for p in paths}
    assert "accuracy_vs_sparsity" in stems and "loss_prediction" not in stems
    assert "loss_prediction" in caplog.text
