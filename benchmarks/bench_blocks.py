"""Block-by-block propagation against the prefix path on SmolLM2-135M (30 blocks), in one process.

SparseGPT / Wanda at 50% per layer on `--calib` calibration windows of 256 tokens of
`pydoc_smollm2` (the whole calibration set in one batch), perplexity on the first `--test` test
windows. For each criterion and path: block forwards (calls of a decoder layer times the windows
it ran on, counted by hooks here, independently of the library's own counter), seconds of the
prune call, perplexity. Both paths must give the same masks (checked, printed).
    python benchmarks/bench_blocks.py [--calib 8] [--test 16] [--crits wanda,sparsegpt]

Measured on a 2-core CPU shared with other jobs (seconds are noisy, up to ~3x), dense
perplexity 11.71; the blocks row predates the one-sample probe (a full-batch probe: +210 block
forwards; with it, 1238 = 150 x 8 + 8 + 30):

| criterion | path   | block forwards | per window | seconds | perplexity |
|-----------|--------|---------------:|-----------:|--------:|-----------:|
| wanda     | blocks |           1448 |        181 |   149.5 |      24.22 |
| wanda     | prefix |          15120 |       1890 |  1690.9 |      24.22 |
| sparsegpt | blocks |           1448 |        181 |   843.3 |      21.56 |

Masks identical on both paths (Wanda). SparseGPT's prefix row was not run (about 40 min on
that machine); its seconds on the blocks path are mostly the float64 column sweeps on the CPU.
"""

import argparse
import copy
import time

import torch

import saliency
from saliency import zoo
from saliency.sweep.metrics import perplexity


def run(model, crit, calib, path):
    model = copy.deepcopy(model)
    count = [0]
    hooks = [b.register_forward_pre_hook(lambda _m, a: count.__setitem__(0, count[0] + len(a[0])))
             for b in model.model.layers]  # fmt: skip
    cost = saliency.Cost(backward_passes=0)
    extra = {} if path == "blocks" else {"blocks": False}
    t = time.perf_counter()
    masks = saliency.prune(model, crit, 0.5, data=[calib], scope="layer", keep=False,
                           cost=cost, **extra)  # fmt: skip
    seconds = time.perf_counter() - t
    for h in hooks:
        h.remove()
    return model, masks, count[0], seconds, cost.forwards


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--test", type=int, default=16)
    ap.add_argument("--crits", default="wanda,sparsegpt")
    a = ap.parse_args()
    torch.manual_seed(0)
    ds = zoo.get_dataset("pydoc_smollm2")
    model = zoo.get_model("smollm2-135m", input_shape=ds.input_shape, num_classes=None)
    x, y = ds.train[: a.calib]
    calib, test = (x, y), ds.test[: a.test][0]
    print(
        f"threads {torch.get_num_threads()}, calibration {tuple(x.shape)}, test {tuple(test.shape)}"
    )
    print(f"dense perplexity {perplexity(model, test):.2f}")
    print(
        "| criterion | path | block forwards | per window | library count | seconds | perplexity |"
    )
    print("|---|---|---:|---:|---|---:|---:|")
    for crit in a.crits.split(","):
        out = {}
        for path in ("blocks", "prefix"):
            m, masks, n, s, fw = run(model, crit, calib, path)
            out[path] = masks
            print(f"| {crit} | {path} | {n} | {n / a.calib:.0f} | {fw} | {s:.1f} | "
                  f"{perplexity(m, test):.2f} |", flush=True)  # fmt: skip
        same = all(torch.equal(out["blocks"][k], out["prefix"][k]) for k in out["blocks"])
        print(f"{crit}: masks identical on both paths: {same}", flush=True)


if __name__ == "__main__":
    main()
