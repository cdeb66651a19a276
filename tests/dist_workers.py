"""What each rank runs in tests/test_distributed.py (a module of its own so that spawned
processes import it quickly). Every check compares a distributed result with one process
reading all the shards, computed in the same rank with ``distributed=False``."""

from __future__ import annotations

import copy
import math
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

import saliency
from saliency import curvature, kfac
from saliency import distributed as D


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def entry(rank: int, world: int, port: int, fn_name: str) -> None:
    """``torch.multiprocessing.spawn`` target: a gloo group, then ``globals()[fn_name]``."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),  # a mismatched collective fails the test, never hangs it
    )
    try:
        globals()[fn_name](rank, world)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- models and data


class Attn(nn.Module):
    """A tiny transformer block (batch first) with nn.Linear projections."""

    def __init__(self, D: int = 4, C: int = 3):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.head = nn.Linear(D, C)

    def forward(self, x):  # [B, L, D]
        att = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2) / 2.0, -1)
        return self.head(torch.tanh(x + self.o(att @ self.v(x))).mean(1))


def _cnn():
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 3)
    )


ARCHS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)), (6,)),
    "cnn": (_cnn, (1, 5, 5)),
    "attn": (Attn, (3, 4)),
}
SIZES = (5, 3, 6, 2)  # batch sizes; rank 0 reads the first three, rank 1 the last (14 vs 2)


def make(arch: str):
    build, shape = ARCHS[arch]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build().double()
    g = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randn(b, *shape, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (b,), generator=g),
        )
        for b in SIZES
    ]
    return model, batches


def shard(batches, rank: int, world: int):
    """Unequal shards: rank 0 all batches but the last, the last rank the last one."""
    assert world == 2
    return batches[:-1] if rank == 0 else batches[-1:]


# ----------------------------------------------------------------------------- comparisons


def same_on_ranks(t: torch.Tensor) -> bool:
    ref = t.detach().clone().contiguous()
    dist.broadcast(ref, src=0)
    return torch.equal(ref, t.detach())


def close(got: torch.Tensor, ref: torch.Tensor) -> bool:
    """1e-10 relative to the tensor's scale in float64; float32 outputs (criteria that round
    their scores) within 2 units in the last place of float32."""
    tol = 1e-10 if got.dtype == torch.float64 else 2.0**-22
    scale = float(ref.detach().abs().max()) if ref.numel() else 0.0
    return got.shape == ref.shape and torch.allclose(
        got.double(), ref.double(), rtol=tol, atol=tol * scale + 1e-300
    )


def check(failures: list, what: str, got: dict, ref: dict) -> None:
    for n in ref:
        if not close(got[n], ref[n]):
            err = float((got[n].double() - ref[n].double()).abs().max())
            failures.append(f"{what} {n}: differs from one process by {err:.3g}")
        if not same_on_ranks(got[n]):
            failures.append(f"{what} {n}: differs between ranks")


# ----------------------------------------------------------------------------- cases

SCORE_CASES = [  # (criterion, hyperparameters, architectures)
    ("magnitude", {}, ("mlp",)),
    ("random", {"seed": 3}, ("mlp",)),
    ("synflow", {}, ("mlp", "cnn")),
    ("obd", {"hessian": "fisher"}, ("mlp", "cnn", "attn")),
    ("obd", {"hessian": "ggn", "backend": "torch"}, ("mlp", "cnn", "attn")),
    ("obd", {"hessian": "exact", "backend": "torch"}, ("mlp", "attn")),
    ("obd", {"hessian": "kfac"}, ("mlp", "cnn", "attn")),
    ("obs", {"block_size": 8, "dtype": "float64", "selection": "single"}, ("mlp", "cnn", "attn")),
    ("obs", {"block_size": 8, "dtype": "float64", "selection": "greedy"}, ("mlp", "attn")),
    ("obs", {"hessian": "exact", "damp_absolute": 50.0}, ("mlp",)),
    ("obs", {"hessian": "kfac"}, ("mlp", "cnn", "attn")),
    ("obs_channel", {}, ("mlp", "cnn", "attn")),
    ("obs_channel", {"hessian": "fisher", "block_size": 16, "dtype": "float64"}, ("mlp", "cnn")),
    ("snip", {}, ("mlp", "cnn", "attn")),
    ("grasp", {}, ("mlp", "cnn", "attn")),
    ("taylor", {}, ("mlp", "cnn", "attn")),
    ("taylor_weight", {}, ("mlp", "cnn", "attn")),
    ("obc", {}, ("mlp", "cnn", "attn")),
    ("sparsegpt", {"block_size": 4}, ("mlp", "cnn", "attn")),
    ("wanda", {}, ("mlp", "cnn", "attn")),
]
N_ALL = {"n_samples": None}  # every criterion reads all of its shard

PRUNE_CASES = [  # (criterion, prune keywords, architectures): masks and updated weights
    ("obs", {"block_size": 8, "dtype": "float64"}, ("mlp", "cnn", "attn")),
    ("obs", {"hessian": "kfac"}, ("mlp",)),
    ("obs", {"hessian": "exact", "damp_absolute": 50.0}, ("mlp",)),
    ("obs_channel", {"hessian": "fisher", "block_size": 16, "dtype": "float64"}, ("mlp",)),
    ("obd", {"hessian": "fisher"}, ("cnn",)),
    ("obc", {"scope": "layer"}, ("mlp", "cnn", "attn")),
    ("sparsegpt", {"scope": "layer", "block_size": 4}, ("mlp", "cnn", "attn")),
    ("wanda", {"scope": "layer"}, ("mlp", "attn")),
]


def _hp(name: str, hp: dict, arch: str) -> dict:
    if name == "synflow":
        return {"input_shape": ARCHS[arch][1], "rounds": 1}
    if name in ("magnitude", "random"):
        return dict(hp)
    return {**N_ALL, **hp}


def match_one_process(rank: int, world: int) -> None:
    """Scores of every criterion, then masks and weights after pruning, on unequal shards."""
    failures: list[str] = []
    for name, hp, archs in SCORE_CASES:
        for arch in archs:
            model, batches = make(arch)
            kw = _hp(name, hp, arch)
            ref = saliency.score(model, name, batches, distributed=False, **kw)
            got = saliency.score(model, name, shard(batches, rank, world), **kw)
            check(failures, f"score {name} {hp} on {arch}", got, ref)
            if got.cost.samples != ref.cost.samples:
                failures.append(f"score {name} {hp} on {arch}: {got.cost.samples} samples")
    for name, kw, archs in PRUNE_CASES:
        for arch in archs:
            model, batches = make(arch)
            one, many = copy.deepcopy(model), copy.deepcopy(model)
            kw = {**N_ALL, **kw}
            m1 = saliency.prune(one, name, 0.5, batches, distributed=False, keep=False, **kw)
            m2 = saliency.prune(many, name, 0.5, shard(batches, rank, world), keep=False, **kw)
            what = f"prune {name} {kw} on {arch}"
            check(
                failures,
                f"{what}: weights",
                dict(many.named_parameters()),
                dict(one.named_parameters()),
            )
            for n in m1:
                if not torch.equal(m1[n], m2[n]) or not same_on_ranks(m2[n]):
                    failures.append(f"{what}: mask of {n} differs")
    assert not failures, f"rank {rank}:\n" + "\n".join(failures)


def random_estimators(rank: int, world: int) -> None:
    """Random estimators: each rank draws from ``rank_seed(seed)``; the result must be exactly
    the count-weighted combination of each shard scored alone with its rank's seed (the same
    unbiased estimator as one process, equal in distribution), identical on every rank."""
    model, batches = make("mlp")
    params = saliency.prunable_parameters(model)
    shards = [shard(batches, r, world) for r in range(world)]
    counts = [sum(len(x) for x, _ in s) for s in shards]
    diag = {
        "true fisher": lambda d, s: curvature.diag_fisher(model, params, d, kind="true", seed=s),
        "ggn mc": lambda d, s: curvature.diag_ggn(
            model, params, d, exact=False, mc_samples=2, seed=s
        ),
        "hutchinson": lambda d, s: curvature.diag_hessian_hutchinson(
            model, params, d, n_probes=3, seed=s
        ),
    }
    failures: list[str] = []
    for what, fn in diag.items():
        got = fn(shards[rank], 0)
        with D.local():
            parts = [fn(shards[r], D.rank_seed(0, r)) for r in range(world)]
        ref = {
            n: sum(c * p[n] for c, p in zip(counts, parts, strict=True)) / sum(counts)
            for n in params
        }
        check(failures, what, dict(got), ref)
    got = kfac.kfac_factors(model, params, shards[rank], fisher="true", seed=0)
    with D.local():
        parts = [
            kfac.kfac_factors(model, params, shards[r], fisher="true", seed=D.rank_seed(0, r))
            for r in range(world)
        ]
    for f in ("A", "G"):
        ref = {n: sum(c * getattr(p.factors[n], f) for c, p in zip(counts, parts, strict=True)) / sum(counts)
               for n in params}  # fmt: skip
        check(failures, f"kfac true {f}", {n: getattr(got.factors[n], f) for n in params}, ref)
    for hp in ({"hessian": "true_fisher"}, {"hessian": "hutchinson"}, {"hessian": "kfac_true"}):
        s = saliency.score(model, "obd", shards[rank], **hp)
        if not all([same_on_ranks(s[n]) for n in s]):
            failures.append(f"obd {hp}: differs between ranks")
    assert not failures, f"rank {rank}:\n" + "\n".join(failures)


class LocalSum:
    """A user's criterion that sums over its own shard only."""

    name = "local_sum"

    def score(self, model, params, data, loss_fn=None):
        total = sum(float(x.sum()) for x, _ in data)
        return {n: p.detach().abs() * total for n, p in params.items()}


DATA_CRITERIA = [
    ("obd", {"hessian": "fisher"}),
    ("obd", {"hessian": "kfac"}),
    ("obs", {}),
    ("obs", {"hessian": "exact", "damp_absolute": 50.0}),
    ("snip", {}),
    ("grasp", {}),
    ("taylor", {}),
    ("taylor_weight", {}),
    ("wanda", {}),
]


def refusals(rank: int, world: int) -> None:
    """An empty shard, the off switch, models that differ between ranks, Woodbury, DDP."""
    import pytest

    model, batches = make("mlp")
    mine = [] if rank == 1 else batches
    for name, hp in DATA_CRITERIA:  # the same clear error on every rank, no hang
        with pytest.raises(ValueError, match=r"rank\(s\) \[1\] of 2 read no samples"):
            saliency.score(model, name, mine, **hp)
    with pytest.raises(ValueError, match="read no samples"):
        saliency.prune(copy.deepcopy(model), "sparsegpt", 0.5, mine, scope="layer")
    for name, hp in (("magnitude", {}), ("random", {}), ("synflow", {"input_shape": (6,)})):
        s = saliency.score(model, name, mine, **hp)  # data-free: fine, and the same everywhere
        assert all([same_on_ranks(v) for v in s.values()]), name  # a list: no short cut

    # distributed=False: each rank alone on its shard, as one process on that shard
    own = shard(batches, rank, world)
    alone = saliency.score(model, "obd", own, distributed=False, hessian="fisher")
    with D.local():
        ref = saliency.score(model, "obd", own, hessian="fisher")
    assert all(torch.equal(alone[n], ref[n]) for n in ref)
    same = [same_on_ranks(v) for v in alone.values()]  # every rank enters every broadcast
    assert rank == 0 or not all(same)  # the shards differ

    # the communication of one pass is counted
    with D.count_traffic() as t:
        saliency.score(model, "obd", own, hessian="fisher")
    assert t.bytes > 0 and t.calls > 0

    # a model that differs between ranks is refused on every rank
    other = copy.deepcopy(model)
    if rank == 1:
        with torch.no_grad():
            other[0].weight[0, 0] += 1e-9
    with pytest.raises(ValueError, match=r"the model: rank\(s\) \[1\] hold other values"):
        saliency.score(other, "magnitude")
    with pytest.raises(ValueError, match="does not combine its statistics across ranks"):
        saliency.score(model, LocalSum(), own)  # a criterion of one's own that forgot to
    with pytest.raises(ValueError, match="woodbury"):
        saliency.score(model, "obs", own, method="woodbury")
    ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(model))
    with pytest.raises(ValueError, match="ddp_model.module"):
        saliency.score(ddp, "magnitude")
    assert math.isfinite(t.bytes)


def sweep_entry(rank: int, world: int, port: int, cfg_path: str, out: str) -> None:
    """A rank of ``torchrun -m saliency run cfg`` (the environment torchrun would set)."""
    import os

    from saliency.sweep.config import load_config
    from saliency.sweep.runner import run_sweep

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    try:
        run_sweep(load_config(cfg_path), out)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
