"""`[compact] measure = true`: channel sweeps record the compacted model's MACs, parameters and
latency ratio, and figures can put them on the x-axis; sweeps that do not measure are unchanged."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import sweep_fixtures  # noqa: E402
from sweep_fixtures import clean_zoo  # noqa: E402, F401  (autouse)

from saliency.sweep.config import ConfigError, parse_config, tomllib  # noqa: E402
from saliency.sweep.records import read_records  # noqa: E402
from saliency.sweep.runner import run_sweep  # noqa: E402

FIELDS = ("macs", "macs_dense", "params", "params_dense", "latency_ms", "latency_dense_ms",
          "latency_ratio", "latency_batch", "latency_threads")  # fmt: skip


def cfg_of(**changes):
    raw = tomllib.loads(sweep_fixtures.TINY)
    raw.update(changes)
    return parse_config(raw)


def test_measured_sweep_records_and_figures(tmp_path):
    pytest.importorskip("torch_pruning")
    from saliency.plotting import accuracy_vs_sparsity

    cfg = cfg_of(granularity="channel", seeds=[0], targets={"keep_output_dense": True},
                 criteria=["magnitude", "obs_channel"],
                 compact={"measure": True, "repeats": 3, "batch_size": 16})  # fmt: skip
    res = run_sweep(cfg, tmp_path)
    assert not res.failures
    records = read_records(res.out)
    for r in records:
        assert all(k in r for k in FIELDS), r["criterion"]
        assert r["macs_dense"] == 6 * 12 + 12 * 3 and r["latency_ratio"] > 0
        if r["criterion"] != "dense":
            hidden = round(12 * (1 - r["sparsity_target"]))  # the head is kept dense
            assert r["params"] == 6 * hidden + hidden + hidden * 3 + 3
            assert r["macs"] == 6 * hidden + hidden * 3
    # structured OBS predicts in loss units: the sum of its pruned channels' costs
    obs = [r for r in records if r["criterion"] == "obs_channel"]
    assert obs and all(0 <= r["predicted_loss_increase"] < 10 for r in obs)
    # the fine-tuned model stayed compactable (biases of pruned neurons kept at zero)
    final = [r for r in records if r["mode"] == "finetune" and r["criterion"] != "dense"]
    assert final and all(r["params"] < r["params_dense"] for r in final)
    for x in ("macs", "latency"):
        assert accuracy_vs_sparsity(records, tmp_path / "figs", stem=f"acc_{x}", xaxis=x)
    from saliency.cli import main

    assert main(["figs", str(res.out), "--out", str(tmp_path / "cli"), "--x", "latency"]) == 0
    assert list((tmp_path / "cli").glob("accuracy_vs_latency*.png"))


def test_measure_needs_channel_granularity_and_leaves_other_sweeps_alone():
    with pytest.raises(ConfigError, match="granularity"):
        cfg_of(compact={"measure": True})
    with pytest.raises(ConfigError, match="compact.repeats"):
        cfg_of(granularity="channel", compact={"measure": True, "repeats": 0})
    from saliency.sweep.units import unit_config

    plain = cfg_of(granularity="channel")
    spec = plain.criteria[0]
    assert "compact" not in unit_config(plain, 0, "oneshot", spec, 0.5)  # run ids as before
    measured = cfg_of(granularity="channel", compact={"measure": True})
    assert unit_config(measured, 0, "oneshot", spec, 0.5)["compact"]["measure"]
