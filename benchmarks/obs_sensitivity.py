"""OBS sensitivity: damping convention and size, samples, block size, selection, K-FAC, against
magnitude, one-shot global pruning without fine-tuning, on mnist5k (4,000 train / 1,000 test).

Models: MLPNet 784-40-20-10 (``lenet300`` with ``hidden=(40, 20)``, the one-shot benchmark of
WoodFisher / CBS / CHITA), LeNet-300-100, and the tfmot CNN (``cnn_small``). Dense models are
trained with SGD (lr 0.1, momentum 0.9, batch 64, ``--epochs``), cached under ``--cache``.
Each row scores the dense model once and prunes copies at every sparsity (OBS applies its joint
update per copy); cells are test accuracies.

Run: python benchmarks/obs_sensitivity.py [--models mlpnet lenet300 cnn_small] [--seed 0]
     [--variants default old greedy ...]  (names below; default: all)
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import saliency
from saliency.zoo import get_dataset, get_model

SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.98)
MODELS = {
    "mlpnet": ("lenet300", {"hidden": (40, 20)}),
    "lenet300": ("lenet300", {}),
    "cnn_small": ("cnn_small", {}),
}
# label -> (criterion, hyperparameters); n_samples is set from --n-samples unless given
VARIANTS = {
    "magnitude": ("magnitude", {}),
    "old default (damp 1e-2 per block, single)": (
        "obs",
        {"damp_scope": "block", "selection": "single"},
    ),
    "damp per layer, single": ("obs", {"damp_scope": "layer", "selection": "single"}),
    "damp per layer, greedy": ("obs", {"damp_scope": "layer", "selection": "greedy"}),
    "damp per block, greedy": ("obs", {"damp_scope": "block", "selection": "greedy"}),
    "greedy, damp 1e-1": ("obs", {"selection": "greedy", "damp": 0.1}),
    "greedy, damp 1e-3": ("obs", {"selection": "greedy", "damp": 1e-3}),
    "greedy, B 32": ("obs", {"selection": "greedy", "block_size": 32}),
    "greedy, 4000 samples": ("obs", {"selection": "greedy", "n_samples": 4000}),
    "single, 4000 samples": ("obs", {"selection": "single", "n_samples": 4000}),
    "kfac obs": ("obs", {"hessian": "kfac"}),
    "kfac obs, single": ("obs", {"hessian": "kfac", "selection": "single"}),
    "kfac obs, 4000 samples": ("obs", {"hessian": "kfac", "n_samples": 4000}),
}


def train(model, ds, epochs: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(ds.train, batch_size=64, shuffle=True, generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()


@torch.no_grad()
def accuracy(model, ds) -> float:
    x, y = ds.test.tensors
    return float((model(x).argmax(1) == y).float().mean())


def dense_model(name, ds, epochs, seed, cache):
    arch, kw = MODELS[name]
    torch.manual_seed(seed)
    model = get_model(arch, input_shape=ds.input_shape, num_classes=10, **kw)
    path = Path(cache) / f"{name}_mnist5k_sgd_e{epochs}_s{seed}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path))
    else:
        train(model, ds, epochs, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model.eval()


def one_pass(model, ds, data, crit, hp):
    crit = saliency.get_criterion(crit, **hp)
    t = time.perf_counter()
    scores = saliency.score(model, crit, data)
    accs = []
    for s in SPARSITIES:
        m = copy.deepcopy(model)
        params = saliency.prunable_parameters(m)
        masks = saliency.allocate(scores, s)
        if callable(getattr(crit, "apply_update", None)):
            crit.apply_update(m, params, masks, scores)
        masks.apply(m)
        accs.append(accuracy(m, ds))
    return accs, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--variants", nargs="+", default=None, help="labels (default: all)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-samples", type=int, default=1024)
    ap.add_argument("--cache", default="/tmp/saliency_obs_sensitivity")
    args = ap.parse_args()
    ds = get_dataset("mnist5k", seed=0)
    x, y = ds.train.tensors
    data = [(x[i : i + 500], y[i : i + 500]) for i in range(0, len(x), 500)]
    labels = args.variants or list(VARIANTS)
    for name in args.models:
        model = dense_model(name, ds, args.epochs, args.seed, args.cache)
        print(
            f"\n{name}, seed {args.seed}, dense {accuracy(model, ds):.3f} "
            f"(SGD {args.epochs} epochs); default n_samples {args.n_samples}\n"
        )
        print("| variant | " + " | ".join(f"{s:.0%}" for s in SPARSITIES) + " | s |")
        print("|---|" + "---:|" * (len(SPARSITIES) + 1))
        for label in labels:
            crit, hp = VARIANTS[label]
            hp = dict(hp)
            if crit == "obs":
                hp.setdefault("n_samples", args.n_samples)
            accs, sec = one_pass(model, ds, data, crit, hp)
            cells = " | ".join(f"{a:.3f}" for a in accs)
            print(f"| {label} | {cells} | {sec:.1f} |", flush=True)


if __name__ == "__main__":
    main()
