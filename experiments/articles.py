"""The three articles this project grew from, reproduced with the library (see README.md here).

    python experiments/articles.py friedman   # tfmot tutorial: Friedman #1 regression (this script)
    python experiments/articles.py cnn        # tfmot MNIST CNN, gradual 0.5 -> 0.8 (tfmot_mnist_cnn.toml)
    python experiments/articles.py mlp        # PyTorch MLP, global L1 30% + fine-tune (pytorch_mlp.toml)
    python experiments/articles.py structured # torch ln_structured L2 50% of a conv's channels
    python experiments/articles.py all --seeds 0 1 2

The MNIST articles are sweep configs run by the sweep runner; the Friedman article needs what a
config does not express (training from scratch with a schedule on one layer only, Keras'
validation split and early stopping, the model size with and without masks), so it is written
here with the library API.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

import saliency
from saliency import zoo
from saliency.sweep.metrics import gzip_size
from saliency.sweep.train import evaluate, train

HERE = Path(__file__).resolve().parent


def keras_init(model: nn.Module) -> nn.Module:
    """Keras' Dense defaults: Glorot-uniform kernels, zero biases."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return model


MAX_EPOCHS = [300]  # --max-epochs caps the article's epoch counts (early stopping still applies)


def keras_fit(model, ds, *, epochs, validation_split, patience, seed, on_step=None) -> dict:
    """`model.fit(X, y, epochs, validation_split, callbacks=[EarlyStopping(val_loss, patience)])`
    with Keras' defaults: batch 32, Adam(1e-3); the validation set is the last fraction of the
    training data (not shuffled); training stops after `patience` epochs without a lower
    validation loss."""
    x, y = ds.train.tensors
    cut = int(len(x) * (1 - validation_split))
    fit_ds, val_ds = TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:])
    state = {"best": float("inf"), "wait": 0, "epochs": 0}

    def on_epoch(epoch: int, loss: float) -> bool:
        state["epochs"] = epoch + 1
        val = evaluate(model, val_ds, task="regression", device="cpu")["mse"]
        if val < state["best"]:
            state["best"], state["wait"] = val, 0
        else:
            state["wait"] += 1
        return state["wait"] >= patience

    start = time.perf_counter()
    hist = train(
        model,
        fit_ds,
        epochs=min(epochs, MAX_EPOCHS[0]),
        batch_size=32,
        lr=1e-3,
        optimizer="adam",
        seed=seed,
        device="cpu",
        task="regression",
        on_step=on_step,
        on_epoch=on_epoch,
    )
    out = {"epochs": state["epochs"], "steps": hist["steps"], "best_val_mse": state["best"]}
    print(f"  fit: {out} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return out


def friedman(seed: int) -> dict:
    """tfmot tutorial on Friedman #1 (Dense(128, relu) -> Dense(1, relu), magnitude pruning)."""
    ds = zoo.get_dataset("friedman1")
    mse = lambda m: evaluate(m, ds.test, task="regression", device="cpu")["mse"]

    def new_model(s: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            return keras_init(
                zoo.get_model(
                    "regression_mlp", input_shape=ds.input_shape, num_classes=None, out_relu=True
                )
            )

    out = {"seed": seed}
    # 1. dense: EarlyStopping(patience=30); epochs as in the article's train_save_weights (300)
    dense = new_model(seed)
    out["dense_fit"] = keras_fit(
        dense, ds, epochs=300, validation_split=0.2, patience=30, seed=seed
    )
    out["dense_mse"] = mse(dense)

    # 2. whole model, ConstantSparsity(0.5, begin_step=0): every layer 50% (tfmot prunes per
    #    layer), from the random initialization, 100 epochs, patience 10
    whole = new_model(seed)
    pruner = saliency.GradualPruner(
        whole, "magnitude", saliency.ConstantSparsity(0.5, 0), scope="layer"
    )
    out["whole_fit"] = keras_fit(
        whole,
        ds,
        epochs=100,
        validation_split=0.2,
        patience=10,
        seed=seed,
        on_step=lambda s: pruner.step(),
    )
    out["whole_mse"], out["whole_sparsity"] = mse(whole), pruner.masks.sparsity

    # 3. first layer only: PolynomialDecay(0.2 -> 0.8, steps 1000 -> 2000), block (2, 3) of the
    #    Keras kernel [in, out] = block (3, 2) of our weight [out, in], max pooling; 300 epochs
    layer = new_model(seed)
    first = {"fc1.weight": layer.fc1.weight}
    pruner = saliency.GradualPruner(
        layer,
        "magnitude",
        saliency.PolynomialDecay(0.2, 0.8, 1000, 2000),
        scope="layer",
        granularity="block",
        block=(3, 2),
        pooling="max",
        params=first,
    )
    out["layer_fit"] = keras_fit(
        layer,
        ds,
        epochs=300,
        validation_split=0.1,
        patience=10,
        seed=seed,
        on_step=lambda s: pruner.step(),
    )
    out["layer_mse"] = mse(layer)
    out["layer_sparsity"] = pruner.masks.sparsity if pruner.masks is not None else 0.0

    # 4. size: train (patience 10), prune_low_magnitude with its default ConstantSparsity(0.5, 0),
    #    fine-tune 300 epochs (patience 10), gzipped size with the masks and without them
    base = new_model(seed)
    out["base_fit"] = keras_fit(base, ds, epochs=300, validation_split=0.2, patience=10, seed=seed)
    out["base_mse"], out["base_gzip"] = mse(base), gzip_size(base)
    pruner = saliency.GradualPruner(
        base, "magnitude", saliency.ConstantSparsity(0.5, 0), scope="layer"
    )
    out["ft_fit"] = keras_fit(
        base,
        ds,
        epochs=300,
        validation_split=0.2,
        patience=10,
        seed=seed,
        on_step=lambda s: pruner.step(),
    )
    masks = pruner.masks
    # "without stripping": the masks kept as torch.nn.utils.prune keeps them (weight_orig and a
    # weight_mask buffer per layer), the counterpart of tfmot's wrappers
    unstripped = saliency.to_torch_prune(saliency.remove(copy.deepcopy(base)), masks)
    out["unstripped_gzip"], out["unstripped_mse"] = gzip_size(unstripped), mse(unstripped)
    saliency.remove(base)  # strip: bake the zeros in, drop the masks
    out["stripped_gzip"], out["stripped_mse"] = gzip_size(base), mse(base)
    return out


def run_config(name: str, seeds: list[int], out_root: Path) -> list[dict]:
    from saliency.sweep.config import load_config
    from saliency.sweep.records import read_records
    from saliency.sweep.runner import run_sweep

    cfg = load_config(HERE / f"{name}.toml", [f"seeds={json.dumps(seeds)}"])
    result = run_sweep(cfg, out_root, progress=True)
    return [r for r in read_records(result.out) if r["seed"] in seeds]


def summarize(records: list[dict]) -> list[tuple]:
    """(mode, phase, metric, sparsity, mean, std, n) over seeds."""
    groups: dict[tuple, list[float]] = {}
    for r in records:
        key = (r["mode"], r["phase"], r["metric"], round(r["sparsity"], 4))
        groups.setdefault(key, []).append(r["value"])
    return [
        (*k, statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
        for k, v in sorted(groups.items())
    ]


def structured() -> dict:
    """The PyTorch article's two remaining snippets, checked against torch.nn.utils.prune."""
    import torch.nn.utils.prune as tprune

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 64, kernel_size=3)
    ours = saliency.allocate(
        saliency.score(conv, "magnitude"), 0.5, scope="layer", granularity="channel"
    )  # L2 norm of each output channel
    ref = copy.deepcopy(conv)
    tprune.ln_structured(ref, name="weight", amount=0.5, n=2, dim=0)
    tprune.remove(ref, "weight")
    saliency.prune(conv, "magnitude", 0.5, scope="layer", granularity="channel")
    saliency.remove(conv)
    kept = ours["weight"].flatten(1).all(1)
    # section 2: manual pruning, keep |w| above the 30% quantile of each layer = scope "layer"
    torch.manual_seed(0)
    mlp = zoo.get_model("mlp256", input_shape=(1, 28, 28), num_classes=10)
    per_layer = saliency.allocate(saliency.score(mlp, "magnitude"), 0.3, scope="layer")
    manual = {
        n: p.detach().abs() > torch.quantile(p.detach().abs().flatten(), 0.3)
        for n, p in saliency.prunable_parameters(mlp).items()
    }
    return {
        "conv_sparsity": float((conv.weight == 0).float().mean()),
        "channels_kept": int(kept.sum()),
        "same_weights_as_ln_structured": bool(torch.equal(conv.weight, ref.weight)),
        "manual_quantile_vs_layer_scope_mismatches": sum(
            int((manual[n] != per_layer[n]).sum()) for n in manual
        ),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("article", choices=["friedman", "cnn", "mlp", "structured", "all"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", type=Path, default=Path("results"))
    ap.add_argument(
        "--max-epochs",
        type=int,
        default=300,
        help="cap on the Friedman fits' epochs (the article: 300 with early stopping)",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1)")
    args = ap.parse_args(argv)
    MAX_EPOCHS[0] = args.max_epochs
    todo = ["friedman", "cnn", "mlp", "structured"] if args.article == "all" else [args.article]
    torch.set_num_threads(args.threads)
    for art in todo:
        start = time.perf_counter()
        if art == "friedman":
            rows = []
            for s in args.seeds:
                rows.append(friedman(s))
                print(json.dumps(rows[-1]), flush=True)
            keys = [
                "dense_mse",
                "whole_mse",
                "whole_sparsity",
                "layer_mse",
                "layer_sparsity",
                "base_mse",
                "base_gzip",
                "unstripped_gzip",
                "unstripped_mse",
                "stripped_gzip",
                "stripped_mse",
            ]
            for k in keys:
                v = [r[k] for r in rows]
                sd = statistics.stdev(v) if len(v) > 1 else 0.0
                print(f"friedman {k:16s} {statistics.mean(v):10.4f} +- {sd:.4f}  ({len(v)} seeds)")
        elif art == "structured":
            print(json.dumps(structured()))
        else:
            name = {"cnn": "tfmot_mnist_cnn", "mlp": "pytorch_mlp"}[art]
            for mode, phase, metric, sp, mean, sd, n in summarize(
                run_config(name, args.seeds, args.out)
            ):
                print(
                    f"{name} {mode:8s} {phase:6s} {metric:8s} sparsity {sp:.3f}  "
                    f"{mean:.4f} +- {sd:.4f}  ({n} seeds)"
                )
        print(f"[{art}: {time.perf_counter() - start:.0f} s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
