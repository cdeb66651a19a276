"""Cost of each curvature as a ratio to one batched forward+backward, and K-FAC against
curvlinops (if installed), on MLPNet (784-40-20-10) and LeNet-5, m samples of random MNIST-shaped
inputs, CPU. Every time is the median of ``--repeat`` runs in this process.

- diag Fisher: ``saliency.curvature.diag_fisher`` (empirical)
- WoodFisher blocks: ``saliency.inverse_fisher.block_inverse_fisher`` (B = 128)
- K-FAC: ``saliency.kfac.kfac_factors`` (factors + eigendecompositions)
- curvlinops K-FAC: ``KFACLinearOperator(fisher_type="empirical")`` factors (and the relative
  difference of its factors' Kronecker products from ours, Linear layers)

Run: python benchmarks/bench_kfac.py [--samples 1024] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from saliency import curvature, inverse_fisher, kfac
from saliency.targets import prunable_parameters
from saliency.zoo import get_model


def timed(fn, repeat):
    fn()  # warm-up (allocator, kernels), not timed
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), out


def curvlinops_factors(model, params, data):
    from curvlinops import KFACLinearOperator

    op = KFACLinearOperator(
        model, torch.nn.CrossEntropyLoss(), list(params.values()), data,
        fisher_type="empirical", check_deterministic=False,
    )  # fmt: skip
    op.compute_kronecker_factors()
    return op


def kron_rel_diff(A, G, A2, G2) -> float:
    """||A (x) G - A2 (x) G2|| / ||A (x) G|| (Frobenius) without forming either product (LeNet-5's
    would be 48,000 x 48,000): ||X (x) Y||^2 = ||X||^2 ||Y||^2, <X (x) Y, U (x) V> = <X, U><Y, V>."""
    if A.shape != A2.shape or G.shape != G2.shape:
        return float("nan")
    sq = (
        (A.norm() * G.norm()) ** 2
        + (A2.norm() * G2.norm()) ** 2
        - 2 * (A * A2).sum() * (G * G2).sum()
    )
    return float(sq.clamp(min=0).sqrt() / (A.norm() * G.norm()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.rand(args.samples, 1, 28, 28)
    y = torch.randint(0, 10, (args.samples,))
    data = [(x[i : i + args.batch], y[i : i + args.batch]) for i in range(0, len(x), args.batch)]
    print(f"{args.samples} samples, batches of {args.batch}; ratio = time / one batched "
          "forward+backward over all samples\n")  # fmt: skip
    print("| model | fwd+bwd s | diag Fisher | WoodFisher B=128 | K-FAC | curvlinops K-FAC |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, arch, kw in (
        ("MLPNet", "lenet300", {"hidden": (40, 20)}),
        ("LeNet-5", "lenet5", {}),
    ):
        model = get_model(arch, input_shape=(1, 28, 28), num_classes=10, **kw).eval()
        params = prunable_parameters(model)

        def fwd_bwd(model=model):
            for xb, yb in data:
                model.zero_grad()
                F.cross_entropy(model(xb), yb).backward()
            model.zero_grad(set_to_none=True)

        base, _ = timed(fwd_bwd, args.repeat)
        cells = []
        for fn in (
            curvature.diag_fisher,
            inverse_fisher.block_inverse_fisher,
            kfac.kfac_factors,
        ):
            t, out = timed(
                lambda fn=fn, m=model, p=params: fn(m, p, data, n_samples=None), args.repeat
            )
            cells.append(f"{t / base:.1f}")
        ours = out
        try:
            t, op = timed(lambda m=model, p=params: curvlinops_factors(m, p, data), args.repeat)
            cells.append(f"{t / base:.1f}")
            diffs = []
            for n, f in ours.factors.items():
                mod = n.rsplit(".", 1)[0]
                A = op._input_covariances.get(mod)
                G = op._gradient_covariances.get(mod)
                if A is None or G is None:
                    continue
                diffs.append(kron_rel_diff(f.A, f.G, A.double(), G.double()))
            cells[-1] += f" (max rel. diff {max(diffs):.0e})" if diffs else ""
        except ImportError:
            cells.append("not installed")
        print(f"| {name} | {base:.3f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
