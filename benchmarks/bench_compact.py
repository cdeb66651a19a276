"""Channel pruning that pays: ResNet-20 pruned by channel units, compacted, timed and fine-tuned.

ResNet-20 (option-A shortcuts) is trained on the 5,000 real MNIST digits (`mnist5k`, offline),
then pruned at 30 / 50 / 70% channel sparsity (fraction of the conv weights in pruned output
channels, scope "layer": every untied conv and the residual stream each lose that fraction;
the Linear head kept dense) with `allocate(groups=channel_groups(...))`, one scoring pass per
criterion (L2 magnitude, Taylor, OBD, structured OBS with its joint update), and compacted
with `saliency.compact`. For each: parameters, MACs and CPU latency of the compacted model as
ratios to dense (median of `--repeats` forwards of `--batch` inputs on one thread, dense and
compacted interleaved in the same run), test accuracy one-shot, and after fine-tuning the
*compacted* model (no masks needed: the pruned channels are gone) for `--ft-epochs`.

    OMP_NUM_THREADS=1 python benchmarks/bench_compact.py [--epochs 8] [--ft-epochs 2]

Target (issue 14): at 50%, <= 60% of the parameters and >= 1.4x faster on one thread.

Measured (2 shared CPU cores, 1 thread; 388 s wall, 312 CPU-s for the whole run; dense: 269,434
parameters, 30.8 M MACs, 95.0% after 8 epochs, 97.7% after the same 2 fine-tuning epochs
unpruned):

    criterion    sparsity   params    MACs  latency speed-up  one-shot fine-tuned  score s
    l2                30%    51.2%   61.3%    86.0%    1.16x    0.2720     0.9730      0.1
    l2                50%    26.6%   37.7%    69.1%    1.45x    0.1100     0.9620      0.1
    l2                70%     9.8%   17.0%    50.4%    1.98x    0.1000     0.9190      0.1
    taylor            30%    50.6%   60.6%    89.8%    1.11x    0.1920     0.9750      0.9
    taylor            50%    26.4%   37.0%    63.5%    1.58x    0.1000     0.9630      0.9
    taylor            70%     9.8%   17.0%    46.6%    2.15x    0.1000     0.9300      0.9
    obd               30%    51.2%   61.3%    87.7%    1.14x    0.3370     0.9790     24.6
    obd               50%    26.6%   37.7%    65.5%    1.53x    0.1020     0.9680     24.6
    obd               70%     9.8%   17.0%    46.8%    2.14x    0.1000     0.9260     24.6
    obs_channel       30%    51.2%   61.3%    89.9%    1.11x    0.2020     0.9700     22.7
    obs_channel       50%    26.6%   37.7%    62.2%    1.61x    0.1030     0.9630     22.7
    obs_channel       70%     9.8%   17.0%    47.7%    2.09x    0.1000     0.9280     22.7

The obs_channel rows (K-FAC, the default; 270 s with `--criteria obs_channel`, which printed
the 97.7% baseline) are from a second run; in the first, obs_channel with WoodFisher blocks of
128 weights (`hessian="fisher"`) fine-tuned to 97.0 / 96.1 / 90.5% (one-shot 15.5% at 30%):
such blocks lie mostly inside one row, so its update has little to move (see `OBSChannel`).

Target met at 50% (params <= 26.6%, slowest speed-up 1.45x; latency ratios move by a few
points between runs on the shared machine). Latency falls less than MACs (BatchNorm, ReLU and
memory traffic do not shrink with the convolutions' arithmetic). One-shot accuracy collapses
because exact removal zeroes the pruned channels' BatchNorm shift as well (masking the weights
alone, L2 at 10% keeps 94.5%; with the shift zeroed 66.1%; K-FAC obs_channel 93.4%); the
fine-tuned compacted models recover.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import saliency
from saliency.prune import prune_step
from saliency.sweep.metrics import count_flops, median_latency
from saliency.sweep.train import evaluate, make_loader, train
from saliency.zoo import get_dataset, get_model

CRITERIA = {  # label -> (registry name, hyperparameters)
    "l2": ("magnitude", {}),
    "taylor": ("taylor", {"n_samples": 512}),
    "obd": ("obd", {"n_samples": 512}),
    "obs_channel": ("obs_channel", {"n_samples": 512}),  # K-FAC: whole-layer blocks
}


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--ft-epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--criteria", nargs="+", default=list(CRITERIA))
    args = ap.parse_args()
    torch.set_num_threads(1)
    finetune = dict(epochs=args.ft_epochs, batch_size=128, lr=0.01, optimizer="sgd",
                    momentum=0.9, weight_decay=5e-4, seed=0, device="cpu")  # fmt: skip
    start = time.perf_counter()
    ds = get_dataset("mnist5k")
    torch.manual_seed(0)
    dense = get_model("resnet20", input_shape=ds.input_shape, num_classes=ds.num_classes)
    train(dense, ds.train, epochs=args.epochs, batch_size=128, lr=0.1, optimizer="sgd",
          momentum=0.9, weight_decay=5e-4, seed=0, device="cpu")  # fmt: skip
    acc_dense = evaluate(dense, ds.test, device="cpu")["accuracy"]
    t_train = time.perf_counter() - start
    print(f"ResNet-20 on mnist5k ({len(ds.train)} train / {len(ds.test)} test digits), "
          f"{args.epochs} epochs: test accuracy {acc_dense:.4f} ({t_train:.0f} s, 1 thread)")  # fmt: skip
    baseline = copy.deepcopy(dense)  # the fair reference: the fine-tuning epochs, unpruned
    train(baseline, ds.train, **finetune)
    print(f"dense + the same fine-tuning ({args.ft_epochs} epochs): test accuracy "
          f"{evaluate(baseline, ds.test, device='cpu')['accuracy']:.4f}")  # fmt: skip

    x_test = ds.test.tensors[0]
    example, timing_batch = x_test[:8], x_test[: args.batch]
    params = saliency.prunable_parameters(dense, exclude="fc.*")
    groups = saliency.channel_groups(dense, example, params=params)
    data = make_loader(ds.train, 128, shuffle=False)
    macs_dense = count_flops(dense, ds.input_shape)[0]
    print(f"dense: {n_params(dense):,} parameters, {macs_dense / 1e6:.1f} M MACs per sample; "
          f"latency: median of {args.repeats} forwards of {args.batch} digits, 1 thread\n")  # fmt: skip
    header = (f"{'criterion':<12}{'sparsity':>9}{'params':>9}{'MACs':>8}{'latency':>9}"
              f"{'speed-up':>9}{'one-shot':>10}{'fine-tuned':>11}{'score s':>9}")  # fmt: skip
    print(header)
    print("-" * len(header))
    rows = []
    for label in args.criteria:
        name, hp = CRITERIA[label]
        t0 = time.perf_counter()
        scores = saliency.score(dense, name, data=data, params=params, **hp)
        t_score = time.perf_counter() - t0
        crit = saliency.get_criterion(name, **hp)
        for s in args.sparsities:
            model = copy.deepcopy(dense)
            p = saliency.prunable_parameters(model, exclude="fc.*")
            prune_step(model, crit, p, scores, s, current=None, scope="layer",
                       granularity="channel", groups=groups)  # fmt: skip
            one_shot = evaluate(model, ds.test, device="cpu")["accuracy"]
            small = saliency.compact(model, example)
            t = median_latency({"dense": dense, "small": small}, timing_batch, repeats=args.repeats)
            ratio = t["small"] / t["dense"]
            macs = count_flops(small, ds.input_shape)[0] / macs_dense
            prm = n_params(small) / n_params(dense)
            train(small, ds.train, **finetune)
            tuned = evaluate(small, ds.test, device="cpu")["accuracy"]
            rows.append((label, s, prm, macs, ratio))
            print(f"{label:<12}{s:>9.0%}{prm:>9.1%}{macs:>8.1%}{ratio:>9.1%}{1 / ratio:>8.2f}x"
                  f"{one_shot:>10.4f}{tuned:>11.4f}{t_score:>9.1f}", flush=True)  # fmt: skip
    at50 = [r for r in rows if abs(r[1] - 0.5) < 1e-9]
    if at50:
        ok = all(r[2] <= 0.60 and 1 / r[4] >= 1.4 for r in at50)
        worst = max(r[4] for r in at50)
        print(f"\ntarget at 50% (<= 60% of the parameters, >= 1.4x faster on one thread): "
              f"{'met' if ok else 'NOT met'} (params <= {max(r[2] for r in at50):.1%}, slowest "
              f"speed-up {1 / worst:.2f}x)")  # fmt: skip
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
