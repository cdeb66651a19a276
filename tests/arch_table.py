"""Print the architecture x path x estimator table of docs/architectures.md from the zoo and the
oracle test's refusal table: `python tests/arch_table.py` (from the repository root)."""

import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from arch_zoo import ARCHS  # noqa: E402
from test_zoo_oracle import ESTIMATORS, REFUSED  # noqa: E402

from saliency import curvature as C  # noqa: E402
from saliency import fastpaths  # noqa: E402
from saliency import per_sample as P  # noqa: E402
from saliency.model_io import forward  # noqa: E402

CRITERIA = ["obd", "obs", "taylor", "taylor_weight", "snip", "grasp", "synflow", "magnitude"]


def cell(key: str, arch: str) -> str:
    return "refused" if REFUSED.get((key, arch)) else "exact"


def row(a) -> str:
    model, x, y = a.make()
    params = dict(model.named_parameters())
    hooked, _ = P._split(model, params)
    try:
        proven = fastpaths.probe(model, x, hooked)
        with P._Capture(hooked) as cap, torch.no_grad():
            forward(model, x)
        fast = {
            n
            for m, names in hooked.items()
            if m in proven and cap.batch_aligned(m, len(x))
            for n in names.values()
        }
        paths = f"{len(fast)}/{len(params)} | {len(params) - len(fast)}/{len(params)}"
    except ValueError:
        paths = "- | -"
    bp = "yes" if C.backpack_unsupported(model, a.loss, [(x, y)]) is None else "no"
    est = {cell(e.__name__, a.name) for e in ESTIMATORS if e.__name__ != "kfac"}
    est = est.pop() if len(est) == 1 else "mixed"
    crits = " | ".join(cell(c, a.name) for c in CRITERIA)
    return f"| {a.name} | {paths} | {bp} | {est} | {cell('kfac', a.name)} | {crits} |"


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    head = [
        "architecture",
        "closed form",
        "generic",
        "BackPACK",
        "12 estimators",
        "K-FAC",
        *CRITERIA,
    ]
    print("| " + " | ".join(head) + " |")
    print("|---" * len(head) + "|")
    for a in ARCHS:
        print(row(a))
