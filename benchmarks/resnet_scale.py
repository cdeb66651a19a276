"""Second-order criteria at ResNet scale (issue 23): seconds and peak memory of scoring a
ResNet-50-shaped model (plain torch, random weights, 224x224, batch 8), and of one global
allocation over its 25.5M weights.

Each criterion runs in its own subprocess, so that its peak memory (max RSS on CPU,
``torch.cuda.max_memory_allocated`` on CUDA) is its own. Labels: ``obd`` (empirical Fisher
diagonal, one backward per batch), ``obd_ggn`` (OBD's default, the exact GGN diagonal: C - 1 =
999 backward passes per batch), ``obs`` (WoodFisher blocks of 128, float32), ``obs_channel``
(K-FAC), ``synflow`` (``--synflow-rounds`` rounds, extrapolated to the paper's 100),
``allocate``.

With ``--samples 8 64`` each criterion runs at both sample counts (one batch each), and the
time is split into a part proportional to the samples and a fixed part (the inversions:
WoodFisher blocks, K-FAC eigh): ``t(N) = fixed + N * per_sample`` with ``per_sample = (t(64) -
t(8)) / 56`` and ``fixed = t(8) - 8 * per_sample``, printed for ``--extrapolate`` samples
(default 1000). Counts too close together (4 and 8) leave the per-sample part in the noise.

Run: python benchmarks/resnet_scale.py [--device cpu] [--criteria obd obd_ggn synflow
     obs_channel obs] [--width 1.0] [--samples 8] [--synflow-rounds 2] [--extrapolate 1000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, mid * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid * 4)
        self.down = None
        if stride != 1 or cin != mid * 4:
            self.down = nn.Sequential(
                nn.Conv2d(cin, mid * 4, 1, stride, bias=False), nn.BatchNorm2d(mid * 4)
            )

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        return F.relu(h + (x if self.down is None else self.down(x)))


def resnet50(width: float = 1.0, classes: int = 1000) -> nn.Module:
    """ResNet-50 (He et al. 2016) layer shapes; `width` scales every channel count."""
    c = lambda n: max(1, int(n * width))  # noqa: E731
    layers = [nn.Conv2d(3, c(64), 7, 2, 3, bias=False), nn.BatchNorm2d(c(64)), nn.ReLU(),
              nn.MaxPool2d(3, 2, 1)]  # fmt: skip
    cin = c(64)
    for mid, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            layers.append(Bottleneck(cin, c(mid), stride if i == 0 else 1))
            cin = c(mid) * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


# label -> (criterion, hyperparameters)
LABELS = {
    "obd": ("obd", {"hessian": "fisher"}),
    "obd_ggn": ("obd", {}),
    "obs": ("obs", {}),
    "obs_channel": ("obs_channel", {}),
    "synflow": ("synflow", {"rounds": 1}),
}


def peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def run_one(name: str, args) -> dict:
    import saliency

    torch.manual_seed(0)
    model = resnet50(args.width).to(args.device).eval()
    x = torch.randn(args.samples, 3, 224, 224, device=args.device)
    y = torch.randint(0, 1000, (args.samples,), device=args.device)
    params = saliency.prunable_parameters(model)
    n = sum(p.numel() for p in params.values())
    if name == "allocate":
        g = torch.Generator().manual_seed(0)
        scores = {k: torch.rand(p.shape, generator=g) for k, p in params.items()}
        t, c = time.perf_counter(), time.process_time()
        saliency.allocate(scores, 0.9)
        return {"criterion": name, "weights": n, "seconds": time.perf_counter() - t,
                "cpu_seconds": time.process_time() - c, "peak_bytes": peak_bytes(args.device)}  # fmt: skip
    crit, hp = LABELS[name]
    hp = {**hp, **({} if crit == "synflow" else {"n_samples": args.samples})}
    rounds = args.synflow_rounds if name == "synflow" else 1
    t = time.perf_counter()
    for _ in range(rounds):
        s = saliency.score(model, crit, data=[(x, y)], **hp)
        if name == "synflow":
            saliency.allocate(s, 0.5)
    seconds = time.perf_counter() - t
    out = {"criterion": name, "weights": n, "samples": args.samples, "seconds": seconds,
           "peak_bytes": peak_bytes(args.device)}  # fmt: skip
    if name == "synflow":
        out["seconds_100_rounds"] = seconds / rounds * 100
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--criteria", nargs="+", default=["allocate", "obd", "synflow", "obs_channel", "obs"],
        choices=["allocate", *LABELS],
    )  # fmt: skip
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--samples", type=int, nargs="+", default=[8])
    ap.add_argument("--synflow-rounds", type=int, default=2)
    ap.add_argument("--extrapolate", type=int, default=1000)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        args.samples = args.samples[0]
        print(json.dumps(run_one(args.one, args)))
        return
    for name in args.criteria:
        runs = []
        for n in args.samples if name not in ("allocate", "synflow") else args.samples[-1:]:
            cmd = [sys.executable, __file__, "--one", name, "--device", args.device, "--width",
                   str(args.width), "--samples", str(n), "--synflow-rounds",
                   str(args.synflow_rounds)]  # fmt: skip
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                why = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else ""
                print(f"{name:12s} samples {n}: failed (exit {res.returncode}) {why}")
                continue
            r = json.loads(res.stdout.strip().splitlines()[-1])
            runs.append(r)
            extra = (
                f", 100 rounds ~{r['seconds_100_rounds']:.0f} s"
                if "seconds_100_rounds" in r
                else ""
            )
            print(f"{name:12s} {r['weights'] / 1e6:6.1f}M weights  samples {r.get('samples', '-')!s:>4}"
                  f"  {r['seconds']:8.2f} s  peak {r['peak_bytes'] / 2**30:6.2f} GiB{extra}",
                  flush=True)  # fmt: skip
        if len(runs) >= 2:
            (n1, t1), (n2, t2) = ((r["samples"], r["seconds"]) for r in (runs[0], runs[-1]))
            per = (t2 - t1) / (n2 - n1)
            fixed = t1 - n1 * per
            N = args.extrapolate
            note = (
                "" if per > 0 else "  (per-sample part below the noise: use counts further apart)"
            )
            print(f"{name:12s} t(N) = {fixed:.1f} s + N x {per:.2f} s  ->  N = {N}: "
                  f"{fixed + N * per:.0f} s{note}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
