"""Per-layer reconstruction error of layer-wise pruning on the trained char_gpt (pydoc_chargpt).

For each method and pattern, a copy of the trained dense model of `--seed` (the sweep's cache,
trained now if missing) is pruned layer by layer (`scope="layer"`) on the sweep's calibration
windows, and each pruned layer is measured on the inputs X it receives in the pruned model on
those windows: ||X (W - W')^T||^2 / ||X W^T||^2 (W dense, W' pruned): the objective the solvers
minimize. Prints one table per pattern and the solve time of each method.
    python experiments/layer_errors.py [--seed 0] [--methods magnitude wanda sparsegpt obc]
"""

import argparse
import copy
import time
from pathlib import Path

import torch

import saliency
from saliency import capture
from saliency.sweep.config import load_config
from saliency.sweep.units import dense_model, scoring_data, targets

PATTERNS = {"50%": (0.5, "element"), "2:4": (None, "2:4"), "4:8": (None, "4:8")}


def layer_errors(dense, pruned, names, x) -> dict[str, float]:
    mods = capture.layer_modules(pruned, targets_of(pruned, names))
    dense_w = {n: capture.weight_matrix(m).detach().double() for n, m in
               capture.layer_modules(dense, targets_of(dense, names)).items()}  # fmt: skip
    errs, hooks = {}, []
    for n, m in mods.items():

        def hook(mod, inp, n=n):
            X = capture.input_rows(mod, inp[0]).double()
            W, W2 = dense_w[n], capture.weight_matrix(mod).detach().double()
            errs[n] = float((X @ (W - W2).T).square().sum() / (X @ W.T).square().sum())

        hooks.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        pruned(x)
    for h in hooks:
        h.remove()
    return errs


def targets_of(model, names):
    params = dict(model.named_parameters())
    return {n: params[n] for n in names}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="experiments/pydoc_chargpt.toml")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt", "obc"])
    args = ap.parse_args()
    cfg = load_config(args.config)
    dense = dense_model(cfg, Path("results") / cfg.name, args.seed).eval()
    names = list(targets(cfg, dense))
    calib = scoring_data(cfg, args.seed)
    x = torch.cat([xb for xb, _ in calib])[:128]  # the solvers' n_samples = 128 windows
    data = [(x, x)]
    for label, (sparsity, granularity) in PATTERNS.items():
        table, times = {}, {}
        for m in args.methods:
            model = copy.deepcopy(dense)
            t = time.perf_counter()
            saliency.prune(model, m, sparsity, data=data, params=targets(cfg, model),
                           scope="layer", granularity=granularity, keep=False)  # fmt: skip
            times[m] = time.perf_counter() - t
            table[m] = layer_errors(dense, model, names, x)
        print(f"\n{label}: relative reconstruction error per layer (seed {args.seed})")
        print("| layer | " + " | ".join(args.methods) + " |")
        print("|---|" + "---:|" * len(args.methods))
        for n in names:
            print(f"| {n} | " + " | ".join(f"{table[m][n]:.4f}" for m in args.methods) + " |")
        mean = {m: sum(table[m].values()) / len(names) for m in args.methods}
        print("| mean | " + " | ".join(f"{mean[m]:.4f}" for m in args.methods) + " |")
        print("| time (s) | " + " | ".join(f"{times[m]:.1f}" for m in args.methods) + " |")


if __name__ == "__main__":
    main()
