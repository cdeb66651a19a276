"""Data-parallel scoring: 2 gloo processes on the CPU, each with a shard of the batches, against
one process reading all of them (float64, 1e-10). The checks run in the ranks
(``dist_workers``); a failing rank fails the spawn, with its message."""

from __future__ import annotations

import dist_workers
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sweep_fixtures import clean_zoo  # noqa: F401  (autouse)

from saliency import distributed as D

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)


def _spawn(fn_name: str, world: int = 2) -> None:
    mp.spawn(
        dist_workers.entry, args=(world, dist_workers.free_port(), fn_name), nprocs=world, join=True
    )


def test_every_criterion_matches_one_process_on_unequal_shards():
    _spawn("match_one_process")


def test_random_estimators_combine_rank_seeded_draws():
    _spawn("random_estimators")


def test_empty_shard_off_switch_and_refusals():
    _spawn("refusals")


def test_without_a_group_nothing_is_combined():
    assert D.world() is None and D.group_size() == 1
    t = torch.arange(3.0)
    assert D.all_reduce_sum(t) is t
    assert D.sum_counts(3, 4) == (3, 4)
    assert D.rank_seed(7) == 7 and D.rank_seed(7, 1) != 7
    assert D.shares(10, 4) == [(0, 2), (2, 5), (5, 7), (7, 10)]
    with pytest.raises(TypeError, match="True, False or None"):
        with D.enabled("no"):
            pass


def test_a_sweep_under_torchrun_records_once_what_one_process_records(tmp_path):
    from sweep_fixtures import TINY, write_config

    from saliency.sweep.config import load_config
    from saliency.sweep.records import clean, iter_records
    from saliency.sweep.runner import run_sweep

    text = (TINY.replace("seeds = [0, 1]", "seeds = [0]").replace("[0.5, 0.9]", "[0.5]")
            .replace('["oneshot", "finetune"]', '["oneshot"]').replace('"random"', '"obd"').replace('"magnitude"', '"obs"'))  # fmt: skip
    cfg = write_config(tmp_path, text)
    run_sweep(load_config(cfg), tmp_path / "one")
    mp.spawn(dist_workers.sweep_entry, nprocs=2, join=True,
             args=(2, dist_workers.free_port(), str(cfg), str(tmp_path / "two")))  # fmt: skip
    one = list(iter_records(tmp_path / "one" / "tiny"))
    two = list(iter_records(tmp_path / "two" / "tiny"))
    assert len(two) == len(clean(two)) == len(one)  # rank 0 wrote each record, once
    key = lambda r: (r["run_id"], r["phase"], r["metric"], r.get("split"))
    values = {key(r): r["value"] for r in one if r["metric"] not in ("seconds", "score_seconds")}
    for r in two:
        if key(r) in values:
            assert r["value"] == pytest.approx(values[key(r)], rel=1e-5), key(r)


def test_a_sweep_under_torchrun_refuses_per_rank_sample_limits(tmp_path):
    from sweep_fixtures import TINY, write_config

    from saliency.sweep.config import ConfigError, load_config
    from saliency.sweep.runner import _check_torchrun

    text = TINY.replace('["magnitude", "random"]', '["magnitude", {name = "obd", n_samples = 32}]')
    with pytest.raises(ConfigError, match="n_samples=32, n_batches=None of the 64"):
        _check_torchrun(load_config(write_config(tmp_path, text)))
