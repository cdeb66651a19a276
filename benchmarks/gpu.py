"""GPU check in one short run (a few minutes): time the curvature estimators, the OBS pass and a
masked training step on CUDA, then run the opt-in ``-m gpu`` tests.

Each time is the median of ``--repeat`` runs after a warm-up, with ``torch.cuda.synchronize``
around it, printed in seconds and as a ratio to one batched forward+backward over the same
samples measured in this run, with the peak memory each step allocated
(``torch.cuda.max_memory_allocated``) and the GPU named. Models: LeNet-300-100 and LeNet-5 on
``--samples`` random MNIST-shaped inputs (10 classes).

- curvature: diag empirical Fisher, exact GGN diagonal, Hutchinson (8 probes), K-FAC factors,
  WoodFisher blocks (B = 128)
- OBS pass: ``saliency.prune(model, "obs", 0.9)``: scores, global allocation, weight update
- masked training step: one SGD step (momentum, weight decay) on a batch with 90% of the
  weights masked (``saliency.attach``), as a ratio to the same step unmasked

Without CUDA it says so and exits 0; ``--device cpu`` runs the same script on the CPU as a smoke
test (the ``-m gpu`` tests are then skipped: they need CUDA).

Run: python benchmarks/gpu.py [--device cuda|cpu] [--samples 2048] [--repeat 3] [--no-tests]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import saliency
from saliency import curvature, inverse_fisher, kfac
from saliency.zoo import get_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeat):
    """(median seconds, peak bytes allocated above the start, last result)."""
    fn()  # warm-up: kernels, allocator, cuBLAS handles
    times, peak = [], 0
    for _ in range(repeat):
        _sync(device)
        if device.type == "cuda":
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        t = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t)
        if device.type == "cuda":
            peak = max(peak, torch.cuda.max_memory_allocated(device) - base)
    return statistics.median(times), peak, out


def forward_backward(model, data):
    def run():
        for x, y in data:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)

    return run


def masked_step(model, x, y, masked: bool):
    m = copy.deepcopy(model)
    if masked:
        saliency.prune(m, "magnitude", 0.9)  # attaches the masks
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def run():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(m(x), y).backward()
        opt.step()

    return run


def bench(name, model, data, device, repeat) -> None:
    params = saliency.prunable_parameters(model)
    model.eval()
    base, _, _ = timed(forward_backward(model, data), device, repeat)
    print(f"\n{name}: {sum(p.numel() for p in params.values()):,} prunable weights; "
          f"one forward+backward over all samples = {base * 1e3:.2f} ms")  # fmt: skip
    print(f"  {'step':<34} {'seconds':>9} {'x fwd+bwd':>10} {'peak MB':>9}")
    steps = {
        "diag Fisher (empirical)": lambda: curvature.diag_fisher(model, params, data),
        "diag GGN (exact)": lambda: curvature.diag_ggn(model, params, data, backend="torch"),
        "Hutchinson (8 probes)": lambda: curvature.diag_hessian_hutchinson(
            model, params, data, n_probes=8
        ),
        "K-FAC factors": lambda: kfac.kfac_factors(model, params, data, n_samples=None),
        "WoodFisher blocks B=128": lambda: inverse_fisher.block_inverse_fisher(
            model, params, data, n_samples=None
        ),
        "OBS pass (score+allocate+update)": lambda: saliency.prune(
            copy.deepcopy(model), "obs", 0.9, data, n_samples=None, keep=False
        ),
    }
    for label, fn in steps.items():
        sec, peak, _ = timed(fn, device, repeat)
        mb = f"{peak / 2**20:>9.1f}" if device.type == "cuda" else f"{'-':>9}"
        print(f"  {label:<34} {sec:>9.4f} {sec / base:>10.2f} {mb}")
    x, y = data[0]
    plain, _, _ = timed(masked_step(model, x, y, False), device, repeat)
    masked, _, _ = timed(masked_step(model, x, y, True), device, repeat)
    print(f"  {'masked SGD step (one batch)':<34} {masked:>9.4f} {'':>10} "
          f"{'':>9}  x unmasked step: {masked / plain:.2f}")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-tests", action="store_true", help="skip the -m gpu tests")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: nothing timed, no -m gpu test run. On a GPU machine run "
              "`python benchmarks/gpu.py`; `--device cpu` runs this script as a CPU smoke test.")  # fmt: skip
        return 0
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke test)"
    print(f"device: {where}; torch {torch.__version__}; {args.samples} samples in batches of "
          f"{args.batch}; median of {args.repeat}")  # fmt: skip
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.samples, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (args.samples,), generator=g)
    data = [(x[i : i + args.batch].to(device), y[i : i + args.batch].to(device))
            for i in range(0, args.samples, args.batch)]  # fmt: skip
    start = time.perf_counter()
    for name in ("lenet300", "lenet5"):
        torch.manual_seed(0)
        model = get_model(name, input_shape=(1, 28, 28), num_classes=10).to(device)
        bench(name, model, data, device, args.repeat)
    print(f"\ntimings took {time.perf_counter() - start:.1f} s")
    if args.no_tests or device.type != "cuda":
        print("-m gpu tests: skipped" + (" (they need CUDA)" if device.type != "cuda" else ""))
        return 0
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", str(root / "tests")]
    print("\n$ " + " ".join(cmd[1:]), flush=True)
    return subprocess.call(cmd, cwd=root)


if __name__ == "__main__":
    sys.exit(main())
