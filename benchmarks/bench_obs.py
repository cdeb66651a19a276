"""OBS scoring cost on LeNet-300-100 (266k weights), m = 1000 MNIST digits, B = 128.

Times, in one run:
- the per-sample gradients alone (materialized, chunked),
- the WoodFisher block inverses by batched G^T G + Cholesky (the library default),
- the whole OBS scoring pass (gradients, inverses, saliencies) through ``saliency.score``,
- WoodFisher's rank-1 Woodbury recursion on every block (m sequential rank-1 steps), plus
  one gradient pass; ``--woodbury-subset`` times it on the fc2 blocks only (235 of 2,081) and
  extrapolates linearly in the number of blocks (28.3 s extrapolated vs 27.6 s timed in full,
  in two runs here).
Peak memory on CPU is the rise of the peak resident set size (VmHWM, reset before each step).

Run: python benchmarks/bench_obs.py [--samples 1000] [--block-size 128] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import time

import torch

import saliency
from saliency import per_sample
from saliency.criteria import default_loss
from saliency.inverse_fisher import block_inverse_fisher
from saliency.zoo import get_dataset, get_model


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _rss(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def measure(fn, device):
    """(wall seconds, process CPU seconds, peak memory bytes above the start, result). On a
    shared machine CPU seconds / threads approximates the wall time the machine alone would take."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak()
        base = _rss("VmRSS")
    t, cpu = time.perf_counter(), time.process_time()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss("VmHWM")
    return wall, cpu, peak - base, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--chunk-size", type=int, default=128)
    ap.add_argument(
        "--woodbury-subset", action="store_true", help="time the recursion on fc2 and extrapolate"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    ds = get_dataset("mnist5k")
    x, y = ds.train.tensors[0][: args.samples].to(dev), ds.train.tensors[1][: args.samples].to(dev)
    model = get_model("lenet300", input_shape=ds.input_shape, num_classes=10).to(dev)
    params = saliency.prunable_parameters(model)
    P = sum(p.numel() for p in params.values())
    data, B, c = [(x, y)], args.block_size, args.chunk_size
    print(f"LeNet-300-100 on {dev}: {P:,} weights, m = {len(x)}, B = {B}, chunk = {c}, "
          f"{torch.get_num_threads()} threads; wall s (CPU s)")  # fmt: skip

    def grads(ps):
        for i in range(0, len(x), c):
            per_sample.per_sample_grads(model, ps, x[i : i + c], y[i : i + c], default_loss)

    kw = dict(block_size=B, n_samples=len(x), chunk_size=c)
    measure(lambda: grads(params), dev)  # warm-up
    g = measure(lambda: grads(params), dev)
    ch = measure(lambda: block_inverse_fisher(model, params, data, **kw), dev)
    sc = measure(lambda: saliency.score(model, "obs", data, **kw), dev)
    nb_all = sum(b.Hinv.shape[0] for b in ch[3].blocks)

    sub = params if not args.woodbury_subset else {"fc2.weight": params["fc2.weight"]}
    gs = measure(lambda: grads(sub), dev)
    wd = measure(lambda: block_inverse_fisher(model, sub, data, method="woodbury", **kw), dev)
    ref = ch[3].blocks[list(params).index(next(iter(sub)))].Hinv
    err = float((wd[3].blocks[0].Hinv - ref).abs().max() / ref.abs().max())
    nb_sub = sum(b.Hinv.shape[0] for b in wd[3].blocks)
    # the recursion reads the gradients twice (damping, then the updates); scale the rest
    rec = [max(wd[i] - 2 * gs[i], 1e-9) for i in (0, 1)]
    wall_all = [g[i] + rec[i] * nb_all / nb_sub for i in (0, 1)]

    mb = 2**20
    row = "{:<42}{:8.2f} s ({:6.2f})   peak +{:5.0f} MiB"
    print(row.format("per-sample gradients", g[0], g[1], g[2] / mb))
    print(row.format("block inverse, G^T G + Cholesky", ch[0], ch[1], ch[2] / mb)
          + f"   blocks hold {P * B * ch[3].blocks[0].Hinv.element_size() / mb:.0f} MiB")  # fmt: skip
    print(row.format("whole OBS scoring pass (saliency.score)", sc[0], sc[1], sc[2] / mb))
    print(f"{'Woodbury recursion, ' + f'{nb_sub} of {nb_all} blocks':<42}{rec[0]:8.2f} s "
          f"({rec[1]:6.2f})   + {2 * gs[0]:.2f} s gradients")  # fmt: skip
    print(f"{'  all blocks + one gradient pass':<42}{wall_all[0]:8.2f} s ({wall_all[1]:6.2f})")
    print(f"Woodbury vs Cholesky on the first timed tensor: max relative difference {err:.1e}")
    for i, what in enumerate(("wall", "CPU")):
        print(f"{what:>4}: OBS pass {sc[i]:.2f} s (target < 4 s: {'met' if sc[i] < 4 else 'MISSED'});"
              f" Woodbury / OBS pass {wall_all[i] / sc[i]:.1f}x (target >= 10x); "
              f"inverse only, Woodbury / Cholesky {rec[i] * nb_all / nb_sub / max(ch[i] - g[i], 1e-9):.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
