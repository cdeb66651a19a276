"""Data-parallel scoring on 1, 2 and 4 gloo ranks (CPU): time and peak memory per rank as ratios
to one rank, and the bytes each rank hands to collectives per scoring pass.

A fixed data set (``--samples`` random MNIST-shaped inputs, 10 classes) is cut into one
contiguous shard per rank; every rank scores MLPNet (784-40-20-10) on its shard, statistics
combined across ranks (``saliency.distributed``). Per criterion and world size:

- seconds: the slowest rank's wall time of one ``saliency.score`` (after a warm-up pass and a
  barrier), median of ``--repeat`` runs; ratio to one rank (1 rank = no process group).
- peak MB: the largest rise of a rank's resident set (``VmHWM`` after resetting it through
  ``/proc/self/clear_refs``, minus ``VmRSS`` before) during one scoring pass; ratio to one rank
  ("-" where one rank's rise is under 1 MB: the allocator's reuse, not the criterion, decides).
- Hinv MB: the OBS block inverse a rank keeps in ``scores.extra`` (its share of the blocks).
- comm: bytes this rank passed to collectives in one pass (``distributed.count_traffic``), and
  how many collective calls.

Each rank runs one thread. On a machine with fewer cores than ranks (4 ranks on 2 cores) the
ranks share cores: times then show the oversubscription, not the scaling.

Run: python benchmarks/bench_distributed.py [--samples 4096] [--ranks 1 2 4] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import saliency
from saliency import distributed as D

CRITERIA = [
    ("obd fisher", "obd", {"hessian": "fisher"}),
    ("obd ggn", "obd", {"hessian": "ggn", "backend": "torch"}),
    ("obd kfac", "obd", {"hessian": "kfac"}),
    ("obs fisher B=128", "obs", {"block_size": 128}),
    ("obs fisher B=512", "obs", {"block_size": 512}),
    ("snip", "snip", {}),
    ("taylor_weight", "taylor_weight", {}),
    ("sparsegpt (score)", "sparsegpt", {}),
]


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def _peak(fn):
    """(result, rise of the resident set's high-water mark during fn) in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    before = _status("VmRSS")
    out = fn()
    return out, _status("VmHWM") - before


def _data(samples: int, batch: int):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(samples, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (samples,), generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, samples, batch)]


def rank_main(rank: int, world: int, port: int, args, out: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(minutes=10))  # fmt: skip
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 40), nn.ReLU(), nn.Linear(40, 20),
                          nn.ReLU(), nn.Linear(20, 10))  # fmt: skip
    batches = _data(args.samples, args.batch)
    shard = batches[rank * len(batches) // world : (rank + 1) * len(batches) // world]
    rows = []
    for label, name, hp in CRITERIA:
        hp = {"n_samples": None, **hp}
        saliency.score(model, name, shard, **hp)  # warm-up
        times, peaks = [], []
        for _ in range(args.repeat):
            if world > 1:
                dist.barrier()
            with D.count_traffic() as traffic:
                t = time.perf_counter()
                s, peak = _peak(lambda name=name, hp=hp: saliency.score(model, name, shard, **hp))
                times.append(time.perf_counter() - t)
            peaks.append(peak)
        inv = s.extra.get("obs")  # the block inverse this rank keeps (its share when sharded)
        kept = sum(b.Hinv.numel() * b.Hinv.element_size() for b in getattr(inv, "blocks", []))
        rows.append({"label": label, "seconds": statistics.median(times), "peak": max(peaks),
                     "bytes": traffic.bytes, "calls": traffic.calls, "kept": kept})  # fmt: skip
    gathered = [rows]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, rows)
        dist.destroy_process_group()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)


def run(world: int, args) -> list[list[dict]]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.spawn(rank_main, args=(world, port, args, out), nprocs=world, join=True)
        with open(out) as f:
            return json.load(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    print(f"MLPNet 784-40-20-10, {args.samples} samples in batches of {args.batch}, "
          f"{os.cpu_count()} CPU cores, 1 thread per rank, torch {torch.__version__}\n")  # fmt: skip
    results = {w: run(w, args) for w in args.ranks}
    base = {r["label"]: r for r in results[args.ranks[0]][0]}
    print(f"{'criterion':<20} {'ranks':>5} {'seconds':>8} {'x 1 rank':>8} {'peak MB':>8} "
          f"{'x 1 rank':>8} {'Hinv MB':>8} {'comm/rank':>10} {'collectives':>11}")  # fmt: skip
    for label, _, _ in CRITERIA:
        for w, per_rank in results.items():
            rows = [next(r for r in rank_rows if r["label"] == label) for rank_rows in per_rank]
            sec = max(r["seconds"] for r in rows)
            peak = max(r["peak"] for r in rows)
            comm = max(r["bytes"] for r in rows)
            kept = max(r["kept"] for r in rows)
            kept = f"{kept / 2**20:>8.1f}" if kept else f"{'-':>8}"
            b = base[label]
            ratio = f"{peak / b['peak']:>8.2f}" if b["peak"] >= 2**20 else f"{'-':>8}"
            print(f"{label:<20} {w:>5} {sec:>8.3f} {sec / b['seconds']:>8.2f} "
                  f"{peak / 2**20:>8.1f} {ratio} {kept} "
                  f"{comm / 2**10:>8.1f}kB {max(r['calls'] for r in rows):>11}")  # fmt: skip


if __name__ == "__main__":
    main()
