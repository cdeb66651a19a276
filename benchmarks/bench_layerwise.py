"""Time per layer of SparseGPT and OBC on a 512x512 layer, against one batched forward pass.

Correlated synthetic inputs X [n, 512] (X = Z A, A = I + 0.1 * 1 1^T, Z standard normal), W standard
normal, 50% unstructured and 2:4. OBC's rows are independent, so it is timed on the first
`--obc-rows` rows and its time scaled to all rows (stated in the output); both solvers are
compared for reconstruction error ||(W - W') X^T||^2 / ||W X^T||^2 on those same rows, and for
mask quality: the error of the least-squares refit of those rows on each solver's mask (SparseGPT
never revisits a column it has passed, so its own weights are not that refit; OBC's are).
    python benchmarks/bench_layerwise.py [--d 512] [--n 2048] [--obc-rows 32]
"""

import argparse
import time

import torch

from saliency import solvers


def timed(fn, *a, **k):
    t = time.perf_counter()
    out = fn(*a, **k)
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--obc-rows", type=int, default=32)
    args = ap.parse_args()
    torch.manual_seed(0)
    d, n, r = args.d, args.n, args.obc_rows
    X = torch.randn(n, d, dtype=torch.float64) @ (torch.eye(d) + 0.1 * torch.ones(d, d)).double()
    W = torch.randn(d, d, dtype=torch.float64)
    H = 2 * X.T @ X / n
    _, fwd = timed(lambda: X.float() @ W.float().T)
    _, fwd = timed(lambda: X.float() @ W.float().T)  # warm
    print(f"layer {d}x{d}, {n} calibration rows; one batched forward X W^T: {fwd * 1e3:.2f} ms")

    Hd = solvers.damped(H, 0.01)

    def refit(rows, keep):  # per row: w_K = w0_K + H_KK^-1 H_KP w0_P, zero elsewhere
        out = torch.zeros_like(rows)
        for r, (w0, k) in enumerate(zip(rows, keep, strict=True)):
            out[r, k] = w0[k] + torch.linalg.solve(Hd[k][:, k], Hd[k][:, ~k] @ w0[~k])
        return out

    def rel(W2, rows):
        return float(((W[rows] - W2) @ X.T).square().sum() / (W[rows] @ X.T).square().sum())

    for pattern, label in (((0.5, None), "50%"), ((None, (2, 4)), "2:4")):
        (Ws, _), ts = timed(solvers.sparsegpt, W, H, pattern)
        (Wsr, ksr), tsr = timed(solvers.sparsegpt, W[:r], H, pattern)
        (Wo, ko), to = timed(solvers.obc, W[:r], H, pattern)
        to_full = to * d / r
        print(
            f"{label}: sparsegpt {ts:.2f} s ({ts / fwd:.0f}x forward), rel. error {rel(Ws, slice(None)):.4f}"
            f" | on {r} rows: sparsegpt {tsr:.2f} s error {rel(Wsr, slice(0, r)):.4f}, obc {to:.2f} s"
            f" error {rel(Wo, slice(0, r)):.4f} -> obc all {d} rows ~{to_full:.1f} s"
            f" ({to_full / fwd:.0f}x forward); obc / sparsegpt time: {to_full / ts:.1f}x"
        )
        print(
            f"{label}: mask quality on {r} rows (least-squares refit on the mask): sparsegpt"
            f" {rel(refit(W[:r], ksr), slice(0, r)):.4f}, obc {rel(refit(W[:r], ko), slice(0, r)):.4f}"
        )


if __name__ == "__main__":
    main()
