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
    return [ln.get_label() for ln in ax.get_lines() if not ln.get_label().startswith("_")]


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
    again = accuracy_vs_sparsity(read_records(results), tmp_path / "again", stem="acc")
    assert again[1].read_bytes() == paths[1].read_bytes()  # reproducible PDF (no timestamp)


def test_compression_axis_is_log(results):
    fig = plot_accuracy_vs_sparsity(read_records(results), xaxis="compression")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert math.isclose(max(ax.get_lines()[0].get_xdata()), 1 / (1 - 0.95))
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        "2\u00d7",
        "5\u00d7",
        "10\u00d7",
        "20\u00d7",
    ]


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
    from saliency.plotting import FIGURES

    paths = build_all([results], tmp_path / "figs")
    stems = {p.stem for p in paths}
    # (the MACs / latency / params / prefill figures need a sweep that compacts:
    # tests/test_compact_sweep.py, tests/test_struct_sweep.py)
    measured = {"accuracy_vs_macs", "accuracy_vs_latency", "accuracy_vs_params",
                "accuracy_vs_prefill"}  # fmt: skip
    assert stems == (set(FIGURES) - {"table"} - measured) | {"table_accuracy"}
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


# ---- figure 2: per-layer sparsity ---------------------------------------------------------------


def test_layer_sparsity_bars(results):
    from saliency.plotting import plot_layer_sparsity

    fig = plot_layer_sparsity(read_records(results), sparsity=0.8)
    ax = fig.axes[0]
    assert len(ax.containers) == len(CRITERIA)  # one bar group per criterion
    assert all(len(c) == len(LAYERS) for c in ax.containers)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["fc1", "fc2"]
    assert ax.get_ylabel() == "Layer sparsity"
    heights = {c.get_label(): [b.get_height() for b in c] for c in ax.containers}
    assert heights["magnitude"][1] == pytest.approx(0.8 * 0.7)
    assert "0.8" in ax.get_title()


def test_layer_order_is_model_order():
    from saliency.plotting.bars import natural_key

    names = ["f.10.weight", "f.2.weight", "f.1.weight"]
    assert sorted(names, key=natural_key) == ["f.1.weight", "f.2.weight", "f.10.weight"]


# ---- figure 3: agreement ------------------------------------------------------------------------


def test_ranks_match_scipy():
    import numpy as np
    from scipy.stats import rankdata

    from saliency.plotting.agreement import ranks

    x = np.array([3.0, 1.0, 3.0, 2.0, 1.0, 5.0, 3.0])
    assert np.allclose(ranks(x), rankdata(x) - 1)


def test_agreement_matrices_against_brute_force():
    import numpy as np
    from scipy.stats import spearmanr

    from saliency.plotting.agreement import agreement_matrices

    g = torch.Generator().manual_seed(1)
    a = {"l1": torch.randn(6, 5, generator=g), "l2": torch.randn(3, 6, generator=g)}
    b = {n: v + 0.7 * torch.randn(v.shape, generator=g) for n, v in a.items()}
    neg = {n: -v for n, v in a.items()}
    names, rho, jac = agreement_matrices({"a": a, "b": b, "neg": neg, "same": dict(a)}, 0.5)
    fa = torch.cat([a[n].flatten() for n in sorted(a)]).numpy()
    fb = torch.cat([b[n].flatten() for n in sorted(b)]).numpy()
    assert rho[0, 1] == pytest.approx(spearmanr(fa, fb).statistic)
    assert rho[0, 2] == pytest.approx(-1.0) and rho[0, 3] == pytest.approx(1.0)
    assert np.allclose(rho, rho.T) and np.allclose(np.diag(jac), 1)
    k = len(fa) // 2  # 24 of 48 pruned: kept = top half
    keep_a = set(np.argsort(-fa, kind="stable")[:k].tolist())
    keep_b = set(np.argsort(-fb, kind="stable")[:k].tolist())
    assert jac[0, 1] == pytest.approx(len(keep_a & keep_b) / len(keep_a | keep_b))
    assert jac[0, 2] == 0.0 and jac[0, 3] == 1.0
    _, rho_sub, jac_sub = agreement_matrices({"a": a, "b": b}, 0.5, max_elements=40)
    assert jac_sub[0, 1] == jac[0, 1] and abs(rho_sub[0, 1] - rho[0, 1]) < 0.2


def test_agreement_figure(results):
    from saliency.plotting import plot_agreement

    fig = plot_agreement([results / "scores"], 0.9)
    heat = [ax for ax in fig.axes if ax.images]
    assert len(heat) == 2
    for ax in heat:
        assert [t.get_text() for t in ax.get_yticklabels()] == ["magnitude", "obd", "obs", "random"]
        assert ax.images[0].get_array().shape == (len(CRITERIA), len(CRITERIA))
        assert len(ax.texts) == len(CRITERIA) ** 2  # every cell annotated
    assert any("Spearman" in ax.get_ylabel() for ax in fig.axes)  # colorbar label


def test_agreement_skips_without_scores(tmp_path, caplog):
    from saliency.plotting import agreement

    with caplog.at_level("INFO"):
        assert agreement([tmp_path / "nothing"], tmp_path / "out") == []
    assert "save_scores" in caplog.text


# ---- figures 4 and 5 ----------------------------------------------------------------------------


def test_loss_prediction_lines(results):
    from saliency.plotting import plot_loss_prediction

    recs = read_records(results)
    dense = [r for r in recs if r["criterion"] == "dense"]
    fig = plot_loss_prediction(recs, dense)
    left, right = fig.axes[:2]
    assert len(left.get_lines()) == 2 * 2  # measured + predicted for obd and obs
    assert sorted(ln.get_label() for ln in right.get_lines()) == ["obd", "obs", "y = x"]
    assert left.get_yscale() == "log"
    # measured = pruned loss - dense loss of the same seed: 0.6 * q * s^3 for q = 0.8 (obd)
    meas = dict(zip(left.get_lines()[0].get_xdata(), left.get_lines()[0].get_ydata(), strict=True))
    assert meas[0.5] == pytest.approx(0.6 * 0.8 * 0.125)
    # with the first-order term recorded: a third line per criterion, at prediction + term
    for r in recs:
        if r.get("predicted_loss_increase") is not None:
            r["predicted_first_order"] = 0.01
    fig = plot_loss_prediction(recs, dense)
    left = fig.axes[0]
    lines = {ln.get_label(): ln for ln in left.get_lines()}
    assert len(lines) == 3 * 2 and "obd predicted + first order" in lines
    pred = dict(zip(*lines["obd predicted"].get_data(), strict=True))
    full = dict(zip(*lines["obd predicted + first order"].get_data(), strict=True))
    assert full[0.5] == pytest.approx(pred[0.5] + 0.01)
    # OBS with its joint and one-weight predictions recorded: "predicted" is the one-weight sum,
    # a joint line is added, and the first-order term is added to the joint prediction
    for r in recs:
        if r["criterion"] == "obs" and r.get("predicted_loss_increase") is not None:
            r["predicted_single"] = 2 * r["predicted_loss_increase"]
            r["predicted_joint"] = 0.5 * r["predicted_loss_increase"]
    fig = plot_loss_prediction(recs, dense)
    lines = {ln.get_label(): ln for ln in fig.axes[0].get_lines()}
    assert "obs predicted jointly" in lines and "obd predicted jointly" not in lines
    joint = dict(zip(*lines["obs predicted jointly"].get_data(), strict=True))
    single = dict(zip(*lines["obs predicted"].get_data(), strict=True))
    full = dict(zip(*lines["obs predicted + first order"].get_data(), strict=True))
    assert single[0.5] == pytest.approx(4 * joint[0.5])
    assert full[0.5] == pytest.approx(joint[0.5] + 0.01)


def test_cost_dots(results):
    from saliency.plotting import plot_cost

    fig = plot_cost(read_records(results))
    sec, smp = fig.axes[:2]
    # dots with error bars, no bars: a bar's length on a log axis means nothing
    assert not sec.patches and not smp.patches
    assert len(sec.containers) == len(smp.containers) == len(CRITERIA)  # errorbar containers
    assert sec.get_xscale() == "log"
    assert [t.get_text() for t in sec.get_yticklabels()] == ["magnitude", "obd", "obs", "random"]
    assert [float(c.lines[0].get_xdata()[0]) for c in smp.containers] == [0, 256, 256, 0]


# ---- table --------------------------------------------------------------------------------------


def test_tables_bold_best_and_escape(tmp_path):
    from saliency.plotting import metric_table

    d = write_results(tmp_path, criteria=["magnitude", "taylor_weight", "obs"], scores=False)
    paths = metric_table(read_records(d), tmp_path / "t", sparsities=[0.8, 0.9])
    tex = (tmp_path / "t" / "table_accuracy.tex").read_text()
    md = (tmp_path / "t" / "table_accuracy.md").read_text()
    assert {p.name for p in paths} == {"table_accuracy.tex", "table_accuracy.md"}
    for cmd in (r"\toprule", r"\midrule", r"\bottomrule", r"taylor\_weight", r"$\pm$"):
        assert cmd in tex
    assert "$s=0.8$ & $s=0.9$" in tex and "0.95" not in tex.split(r"\toprule")[1]
    obs_rows = [ln for ln in md.splitlines() if ln.startswith("| obs ")]
    assert len(obs_rows) == 2 and all(
        ln.count("**") == 4 for ln in obs_rows
    )  # best in both columns
    assert not any("**" in ln for ln in md.splitlines() if ln.startswith("| magnitude "))
    assert "Dense baseline" in md


def test_regression_table_bolds_lowest(tmp_path):
    from saliency.plotting import metric_table

    d = write_results(tmp_path, task="regression", criteria=["magnitude", "obs"], scores=False)
    metric_table(read_records(d), tmp_path / "t")
    md = (tmp_path / "t" / "table_mse.md").read_text()
    obs_rows = [ln for ln in md.splitlines() if ln.startswith("| obs ")]
    assert obs_rows and all("**" in ln for ln in obs_rows)  # lowest MSE is best


# ---- grouping -----------------------------------------------------------------------------------


def test_hparams_and_settings_are_kept_apart(tmp_path):
    recs = make_records(criteria=["obd"], modes=("oneshot",))
    extra = [dict(r, hparams={"fisher": "true"}) for r in recs if r["criterion"] == "obd"]
    other_model = [dict(r, model="cnn") for r in recs]
    fig = plot_accuracy_vs_sparsity(recs + extra)
    labels = _labels(fig.axes[0])
    assert "obd (fisher=true)" in labels and "obd (fisher=default)" in labels
    paths = accuracy_vs_sparsity(recs + other_model, tmp_path, stem="acc")
    assert {p.name for p in paths if p.suffix == ".png"} == {"acc_cnn.png", "acc_mlp.png"}


def test_unknown_criterion_is_plotted(tmp_path):
    fig = plot_accuracy_vs_sparsity(make_records(criteria=["magnitude", "my_crit"]))
    line = {ln.get_label(): ln for ln in fig.axes[0].get_lines()}["my_crit"]
    assert line.get_color() == criterion_style("my_crit")["color"]


def test_layer_sizes_give_model_order(results):
    from saliency.plotting import plot_layer_sparsity
    from saliency.plotting.agreement import layer_sizes

    assert layer_sizes([results / "scores"]) == {"fc1.weight": 128, "fc2.weight": 64}
    fig = plot_layer_sparsity(
        read_records(results), layer_sizes={"fc2.weight": 64, "fc1.weight": 128}
    )
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["fc2\n(64)", "fc1\n(128)"]


def test_unknown_style_is_pinned():
    # sha256-derived, so the same in every process (Python's hash() would change per run)
    assert criterion_style("my_new_criterion") == {
        "color": "#004488",
        "marker": "s",
        "linestyle": "--",
    }


def test_sweep_labels_name_series_and_variants_differ():
    recs = make_records(criteria=["obd", "magnitude"], modes=("oneshot",))
    for r in recs:
        r["label"] = r["criterion"]
    extra = [
        dict(r, label="obd_true", hparams={"fisher": "true"})
        for r in recs
        if r["criterion"] == "obd"
    ]
    fig = plot_accuracy_vs_sparsity(recs + extra)
    lines = {ln.get_label(): ln for ln in fig.axes[0].get_lines()}
    assert set(lines) == {"obd", "obd_true", "magnitude", "dense"}
    assert lines["obd"].get_color() == lines["obd_true"].get_color()
    assert lines["obd"].get_linestyle() != lines["obd_true"].get_linestyle()


def test_loss_prediction_symlog_when_loss_drops(results):
    from saliency.plotting import plot_loss_prediction

    recs = read_records(results)
    for r in recs:  # pruning at s = 0.5 lowers the loss below the dense one
        if r["metric"] == "loss" and r["criterion"] != "dense" and r["sparsity_target"] == 0.5:
            r["value"] = 0.1
    fig = plot_loss_prediction(recs, [r for r in recs if r["criterion"] == "dense"])
    assert fig.axes[0].get_yscale() == "symlog" and fig.axes[1].get_yscale() == "symlog"


def test_build_all_finds_sweeps_in_a_parent_and_skips_missing(tmp_path, caplog):
    d = write_results(tmp_path, scores=False)  # tmp_path/results/synthetic
    with caplog.at_level("INFO"):
        paths = build_all([d.parent, tmp_path / "missing"], tmp_path / "f", only=["table"])
    assert [p.name for p in paths] == ["table_accuracy.tex", "table_accuracy.md"]
    assert "missing" in caplog.text
    with pytest.raises(FileNotFoundError, match="no records"):
        build_all([tmp_path / "missing"], tmp_path / "f")
    with pytest.raises(ValueError, match="unknown figure"):
        build_all([d], tmp_path / "f", only=["acuracy"])


def test_loss_prediction_for_regression_uses_mse(tmp_path):
    from saliency.plotting import plot_loss_prediction

    recs = [r for r in make_records(task="regression") if r["metric"] != "loss"]
    fig = plot_loss_prediction(recs, [r for r in recs if r["criterion"] == "dense"])
    assert fig is not None and len(fig.axes[0].get_lines()) == 4


def test_one_failing_figure_does_not_stop_the_build(results, tmp_path, monkeypatch, caplog):
    import saliency.plotting as P

    def boom(*a, **k):
        raise RuntimeError("broken figure")

    monkeypatch.setattr(P, "cost", boom)
    with caplog.at_level("WARNING"):
        paths = build_all([results], tmp_path / "f", only=["cost", "table"])
    assert [p.name for p in paths] == ["table_accuracy.tex", "table_accuracy.md"]
    assert "figure cost failed" in caplog.text and "broken figure" in caplog.text


def test_usetex_is_opt_in():
    from saliency.plotting import rc_params

    assert rc_params()["text.usetex"] is False and rc_params(usetex=True)["text.usetex"] is True
    assert rc_params()["pdf.fonttype"] == 42  # TrueType in PDFs, not Type 3


def test_file_names_follow_the_metric_and_carry_no_colon(tmp_path):
    """A language model's curve is named after its metric; an N:M setting gives a file name
    without ':' (not allowed on Windows)."""
    from saliency.plotting import accuracy_vs_sparsity

    recs = []
    for r in make_records(criteria=("magnitude", "obs"), modes=("oneshot",)):
        if r["metric"] == "accuracy":
            recs.append({**r, "metric": "perplexity", "value": 1 / r["value"]})
    recs += [{**r, "granularity": "2:4"} for r in recs if r["criterion"] != "dense"]
    names = sorted(p.name for p in accuracy_vs_sparsity(recs, tmp_path) if p.suffix == ".png")
    assert names == ["perplexity_vs_sparsity_2-4.png", "perplexity_vs_sparsity_element.png"]


def test_layerwise_solvers_have_their_own_colours():
    from saliency.plotting.style import criterion_style

    colours = {c: criterion_style(c)["color"] for c in ("obs", "obc", "sparsegpt", "wanda")}
    colours["magnitude"] = criterion_style("magnitude")["color"]
    assert len(set(colours.values())) == len(colours)
