"""The model x criterion table of issue 23: `saliency.prune(model, crit, 0.5, data=...)` on the
zoo's vision models, each cell ok / warned (warning class) / refused (ValueError) / crashed
(any other exception), with the number of layers emptied. Run from the repository root:
`python benchmarks/collapse_table.py` (on an older checkout too: the before column)."""

from __future__ import annotations

import os
import sys
import warnings

sys.path.insert(0, os.path.join(os.getcwd(), "tests"))

from arch_zoo import BY_NAME  # noqa: E402

import saliency  # noqa: E402

ARCHS = ["mobile_se", "mobile_se_zero_init", "resnet_bn_eval", "conv_variants"]
SKIP = {"obc", "sparsegpt", "wanda", "random"}  # layer-wise solvers / no signal


def cell(arch: str, crit: str) -> str:
    if arch not in BY_NAME:
        return "n/a"
    model, x, y = BY_NAME[arch].make()
    data = [(x, y)]
    kw = {"rounds": 10} if crit == "synflow" else {}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            masks = saliency.prune(model, crit, 0.5, data=data, loss_fn=BY_NAME[arch].loss, **kw)
        except ValueError as e:
            return f"refused: {str(e)[:60]}"
        except Exception as e:  # noqa: BLE001 - the table reports raw crashes
            return f"CRASH {type(e).__name__}: {str(e)[:50]}"
    gone = [n for n, m in masks.items() if not m.any()]
    kinds = sorted(
        {type(w.message).__name__ for w in seen} & {"LayerCollapseWarning", "ZeroScoreWarning"}
    )
    text = "warned " + "+".join(kinds) if kinds else "ok"
    return text + (f", {len(gone)} emptied" if gone else "")


def main() -> None:
    crits = [c for c in saliency.available_criteria("element") if c not in SKIP]
    print("| criterion | " + " | ".join(ARCHS) + " |")
    print("|---" * (len(ARCHS) + 1) + "|")
    for c in crits:
        print(f"| {c} | " + " | ".join(cell(a, c) for a in ARCHS) + " |")


if __name__ == "__main__":
    main()
