"""Second-order criteria at ResNet scale (issue 23): seconds and peak memory of scoring a
ResNet-50-shaped model (plain torch, random weights, 224x224, batch 8), and of one global
allocation over its 25.5M weights.

Each criterion runs in its own subprocess, so that its peak memory (max RSS on CPU,
``torch.cuda.max_memory_allocated`` on CUDA) is its own. SynFlow is timed for ``--synflow-rounds``
rounds and extrapolated to the paper's 100. Times scale linearly in the samples for OBD and the
statistics passes of OBS / K-FAC (WoodFisher and CBS use 1000+ samples: multiply the per-sample
part by samples / 8); the inversions (WoodFisher blocks, K-FAC eigh) do not depend on them.

Run: python benchmarks/resnet_scale.py [--device cpu] [--criteria obd synflow obs_channel obs]
     [--width 1.0] [--samples 8] [--synflow-rounds 2]
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
    hp = {"synflow": {"rounds": 1}, "obs_channel": {"n_samples": args.samples}}.get(name, {})
    if name in ("obs", "obd"):
        hp = {"n_samples": args.samples}
    rounds = args.synflow_rounds if name == "synflow" else 1
    t = time.perf_counter()
    for _ in range(rounds):
        s = saliency.score(model, name, data=[(x, y)], **hp)
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
        "--criteria", nargs="+", default=["allocate", "obd", "synflow", "obs_channel", "obs"]
    )
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--synflow-rounds", type=int, default=2)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return
    for name in args.criteria:
        cmd = [sys.executable, __file__, "--one", name, "--device", args.device, "--width",
               str(args.width), "--samples", str(args.samples), "--synflow-rounds",
               str(args.synflow_rounds)]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            print(
                f"{name}: failed: {res.stderr.strip().splitlines()[-1] if res.stderr else res.returncode}"
            )
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        extra = (
            f", 100 rounds ~{r['seconds_100_rounds']:.0f} s" if "seconds_100_rounds" in r else ""
        )
        print(f"{name:12s} {r['weights'] / 1e6:6.1f}M weights  {r['seconds']:8.2f} s  "
              f"peak {r['peak_bytes'] / 2**30:6.2f} GiB{extra}")  # fmt: skip


if __name__ == "__main__":
    main()
