"""Which OBS prediction matches the measured loss increase at a minimum: one-weight or joint?

A small regression MLP (Friedman #1 with noise added to the standardized targets, 10-16-1,
tanh) trained in float64 with full-batch L-BFGS on the objective
``J(w) = MSE + (lambda / 2) ||W||^2`` (weight decay on the two weight matrices) until its
gradient is ~0: a minimum, so the quadratic model of J has no first-order term. Without the
weight decay the net nearly interpolates and its Hessian is singular (flat directions), so no
undamped OBS exists there. OBS with the exact Hessian of J (``hessian="exact"``, ``damp=0``,
``damp_absolute=lambda``: the Hessian of the MSE plus ``lambda I``; the script prints its
smallest eigenvalue) prunes the 176 weights one-shot (biases stay), with its update, and
records per sparsity:

- measured: J after pruning + update minus J of the dense model;
- single: sum_q w_q^2 / (2 [H^-1]_qq) over the pruned set Q (each weight as if removed alone);
- joint: 1/2 w_Q^T ([H^-1]_QQ)^-1 w_Q (Q removed together, the kept weights compensating);
- the first-order term g . dw (~0 here).

The figure is the library's loss-prediction figure (``saliency.plotting.loss_prediction``) drawn
from records built here. Mean over ``--seeds`` (initializations).
    python benchmarks/loss_prediction_minimum.py [--seeds 0 1 2] [--out DIR]
"""

import argparse
import copy
import statistics

import torch
import torch.nn.functional as F
from torch import nn

import saliency
from saliency.criteria.obs import OBS, predicted_increase
from saliency.zoo import get_dataset

SPARSITIES = (0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)
SELECTIONS = ("single", "greedy")


def mse(out, y):
    return F.mse_loss(out.reshape(y.shape), y)


LAMBDA = 1e-3


def objective(model, X, y):
    """MSE + (lambda / 2) ||W||^2 over the weight matrices: the J that OBS models here."""
    wd = sum(p.square().sum() for n, p in model.named_parameters() if n.endswith("weight"))
    return mse(model(X), y) + 0.5 * LAMBDA * wd


def train_to_minimum(model, X, y, max_rounds: int = 200) -> float:
    """Full-batch L-BFGS (strong Wolfe) until the gradient norm stops falling; returns it."""
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=100, history_size=100,
                            tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")  # fmt: skip

    def closure():
        opt.zero_grad()
        loss = objective(model, X, y)
        loss.backward()
        return loss

    for _ in range(max_rounds):
        opt.step(closure)
        g = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
        if g < 1e-9:
            break
    opt.zero_grad(set_to_none=True)
    return float(g)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--n", type=int, default=2000, help="training samples")
    ap.add_argument("--out", default="/tmp/loss_prediction_minimum")
    args = ap.parse_args()
    ds = get_dataset("friedman1")
    X, y = (t[: args.n].double() for t in ds.train.tensors)
    y = (y - y.mean()) / y.std()  # unit-variance targets: losses of order 1
    y = y + 0.3 * torch.randn(y.shape, generator=torch.Generator().manual_seed(0), dtype=y.dtype)
    data = [(X, y)]
    records, rows = [], {}
    for seed in args.seeds:
        torch.manual_seed(seed)
        dense = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 1)).double()
        gnorm = train_to_minimum(dense, X, y)
        base = float(objective(dense, X, y).detach())
        params = saliency.prunable_parameters(dense)
        scores_of = {}
        for sel in SELECTIONS:
            crit = OBS(hessian="exact", damp=0.0, damp_absolute=LAMBDA, selection=sel,
                       n_samples=None, dtype="float64")  # fmt: skip
            scores_of[sel] = (crit, saliency.score(dense, crit, data, mse))
        inv = scores_of["single"][1].extra["obs"]
        emin = float(torch.linalg.eigvalsh(torch.linalg.inv(inv.blocks[0].Hinv[0])).min())
        print(f"seed {seed}: training objective {base:.4f}, gradient norm {gnorm:.1e}, smallest "
              f"Hessian eigenvalue {emin:.2e}")  # fmt: skip
        records.append(_record("dense", "dense", seed, 0.0, base, mode="dense"))
        dense.zero_grad()
        objective(dense, X, y).backward()  # g of the first-order term g . dw, once per seed
        grad = {n: p.grad.detach().clone() for n, p in params.items()}
        dense.zero_grad(set_to_none=True)
        for sel, (crit, scores) in scores_of.items():
            for s in SPARSITIES:
                masks = saliency.allocate(scores, s)
                pred = predicted_increase(scores.extra["obs"], params, masks)
                m = copy.deepcopy(dense)
                mp = saliency.prunable_parameters(m)
                crit.apply_update(m, mp, masks, scores)
                masks.apply(m)
                first = sum(float((grad[n] * (mp[n].detach() - p.detach())).sum())
                            for n, p in params.items())  # fmt: skip
                measured = float(objective(m, X, y)) - base
                label = f"obs, {sel} selection"
                r = _record("obs", label, seed, s, base + measured, hparams={"selection": sel})
                r.update(predicted_loss_increase=pred["single"], predicted_single=pred["single"],
                         predicted_joint=pred["joint"], predicted_first_order=first)  # fmt: skip
                records.append(r)
                rows.setdefault((label, s), []).append((measured, pred["single"], pred["joint"]))
    print("\n| selection | sparsity | measured | single | joint | joint / measured |")
    print("|---|---:|---:|---:|---:|---:|")
    for (label, s), v in sorted(rows.items()):
        mean = [statistics.fmean(x[i] for x in v) for i in range(3)]
        print(f"| {label} | {s:.0%} | {mean[0]:.3e} | {mean[1]:.3e} | {mean[2]:.3e} | "
              f"{mean[2] / mean[0]:.2f} |")  # fmt: skip
    from saliency.plotting import loss_prediction

    for p in loss_prediction(records, args.out, stem="loss_prediction_minimum"):
        print("figure:", p)


def _record(criterion, label, seed, sparsity, value, mode="oneshot", hparams=None):
    return {"run_id": f"{label}-{seed}-{sparsity}", "sweep": "loss_prediction_minimum",
            "config_hash": "x", "model": "mlp 10-16-1", "dataset": "friedman1",
            "task": "regression", "criterion": criterion, "label": label, "hparams": hparams or {},
            "seed": seed, "mode": mode, "scope": "global", "granularity": "element",
            "sparsity_target": sparsity, "sparsity": sparsity, "split": "train",
            "phase": "dense" if mode == "dense" else "pruned", "metric": "scoring_loss",
            "value": value, "time": 0.0, "saliency_version": saliency.__version__}  # fmt: skip


if __name__ == "__main__":
    main()
