"""timm models x registered criteria (issue 23): `saliency.prune(model, crit, 0.5, data=...)` on
one batch of 8 random 32x32 images, default hyperparameters (layer-wise solvers with
scope="layer"), each cell in its own subprocess under a time limit. A cell is ok / warned
(warning classes) / refused (ValueError, NotImplementedError) / CRASH (anything else), with
the layers emptied, wall seconds and peak memory (max RSS). "silent" marks a cell that
emptied a layer without a LayerCollapseWarning (`tests/test_timm_models.py` fails on it).

Needs timm and a torchvision that imports (docs/architectures.md). Run from the repository root:
`OMP_NUM_THREADS=1 python benchmarks/timm_table.py [--timeout 580] [--models ...] [--criteria ...]`
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings

import torch

MODELS = ("resnet18", "vit_tiny", "mobilenetv3_small", "efficientnet_b0")
SOLVERS = ("obc", "sparsegpt", "wanda")


def make(name: str) -> torch.nn.Module:
    """ResNet-18 (last BatchNorm gamma of each block zero-initialised), ViT-Tiny at 32x32 with
    8x8 patches and its head zeroed, MobileNetV3-small, EfficientNet-B0; 10 classes, eval."""
    import timm

    torch.manual_seed(0)
    if name == "resnet18":
        model = timm.create_model("resnet18", num_classes=10, zero_init_last=True)
    elif name == "vit_tiny":
        model = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8)
        torch.nn.init.zeros_(model.head.weight)
        torch.nn.init.zeros_(model.head.bias)
    elif name == "mobilenetv3_small":
        model = timm.create_model("mobilenetv3_small_100", num_classes=10)
    else:
        model = timm.create_model("efficientnet_b0", num_classes=10)
    return model.eval()


def one(model_name: str, crit: str) -> dict:
    import saliency

    model = make(model_name)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g))]
    kw = {"scope": "layer"} if crit in SOLVERS else {}
    out = {"model": model_name, "crit": crit}
    t = time.perf_counter()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            masks = saliency.prune(model, crit, 0.5, data=data, **kw)
        except (ValueError, NotImplementedError) as e:
            out.update(result="refused", error=f"{type(e).__name__}: {str(e)[:200]}")
        except Exception as e:  # noqa: BLE001 - the table reports raw crashes
            out.update(result="CRASH", error=f"{type(e).__name__}: {str(e)[:200]}")
        else:
            names = {type(w.message).__name__ for w in seen}
            kinds = sorted(names & {"LayerCollapseWarning", "ZeroScoreWarning"})
            gone = masks.emptied()
            out.update(result="warned " + ", ".join(kinds) if kinds else "ok", emptied=len(gone),
                       silent=bool(gone) and "LayerCollapseWarning" not in names)  # fmt: skip
    out["seconds"] = time.perf_counter() - t
    out["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def cell(r: dict | None, timeout: float) -> str:
    if r is None:
        return f"not finished in {timeout:g} s"
    if r["result"] in ("refused", "CRASH"):
        return f"{r['result']}: {r['error'][:70]}"
    text = r["result"].replace("Warning", "")
    text += f", {r['emptied']} emptied" if r["emptied"] else ""
    text += " SILENT" if r["silent"] else ""
    return text + f"; {r['seconds']:.0f} s, {r['peak_gib']:.1f} GiB"


def main() -> None:
    import saliency

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--criteria", nargs="+", default=saliency.available_criteria("element"))
    ap.add_argument("--timeout", type=float, default=580)
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(*args.one)))
        return
    print("| criterion | " + " | ".join(args.models) + " |")
    print("|---" * (len(args.models) + 1) + "|")
    for c in args.criteria:
        cells = []
        for m in args.models:
            try:
                res = subprocess.run([sys.executable, __file__, "--one", m, c],
                                     capture_output=True, text=True, timeout=args.timeout)  # fmt: skip
                lines = res.stdout.strip().splitlines()
                r = json.loads(lines[-1]) if res.returncode == 0 and lines else {
                    "result": "CRASH", "error": f"exit {res.returncode}: "
                    + (res.stderr.strip().splitlines() or [""])[-1]}  # fmt: skip
            except subprocess.TimeoutExpired:
                r = None
            cells.append(cell(r, args.timeout))
        print(f"| {c} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
