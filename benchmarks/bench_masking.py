"""Cost of keeping masks in force during training: one SGD step (forward, backward, optimizer)
of LeNet-300-100 and LeNet-5 at batch 128, dense vs `saliency.attach` vs `torch.nn.utils.prune`
vs a `torch.nn.utils.parametrize` mask, all measured in this run. Prints time ratios to dense.

    python benchmarks/bench_masking.py [--steps 300] [--repeats 5] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.utils.parametrize as parametrize
from torch import nn

import saliency


def lenet300() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    )


def lenet5() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
    )  # fmt: skip


class MaskParam(nn.Module):
    def __init__(self, mask):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w):
        return w * self.mask


def setups(model: nn.Module, masks: saliency.Masks):
    def ours():
        m = copy.deepcopy(model)
        saliency.attach(m, masks)
        return m

    def torch_prune():
        m = copy.deepcopy(model)
        saliency.to_torch_prune(m, masks)
        return m

    def parametrization():
        m = copy.deepcopy(model)
        for name, keep in masks.items():
            mod, _, attr = name.rpartition(".")
            parametrize.register_parametrization(
                m.get_submodule(mod), attr, MaskParam(keep.float())
            )
        return m

    return {"dense": lambda: copy.deepcopy(model), "saliency.attach": ours,
            "torch.nn.utils.prune": torch_prune, "parametrize": parametrization}  # fmt: skip


def time_steps(model, x, y, steps, device) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    for _ in range(10):  # warm-up
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(128, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (128,), device=device)
    print(
        f"device={device} threads={torch.get_num_threads()} steps={args.steps} repeats={args.repeats}"
    )
    for name, make in (("LeNet-300-100", lenet300), ("LeNet-5", lenet5)):
        model = make().to(device)
        masks = saliency.allocate(saliency.score(model, "magnitude"), 0.9)
        builders = setups(model, masks)
        models = {k: b() for k, b in builders.items()}
        times = {k: [] for k in models}
        for _ in range(args.repeats):  # interleaved so drift hits every variant alike
            for k, m in models.items():
                times[k].append(time_steps(m, x, y, args.steps, device))
        dense = statistics.median(times["dense"])
        print(f"\n{name}: median ms per training step (batch 128), ratio to dense")
        for k, t in times.items():
            med = statistics.median(t)
            print(f"  {k:<22} {1e3 * med:8.3f} ms   x{med / dense:.3f}")


if __name__ == "__main__":
    main()
