"""Metrics of a (pruned) model: multiply-adds, gzipped size, parameters remaining, latency, and
the perplexity of a causal language model on fixed-length windows."""

from __future__ import annotations

import copy
import gzip
import io
import math
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from saliency.model_io import forward, model_device, model_output

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def count_flops(model: nn.Module, input_shape: Sequence[int]) -> tuple[int, int]:
    """(dense, nonzero) multiply-adds per sample of the Linear and Conv layers.

    A Linear layer costs `out * in` per input row; a convolution costs `weight.numel()` per
    output position (`C_out * C_in / groups * prod(kernel)` each). `nonzero` counts only the
    nonzero weights, i.e. what a sparse kernel would do. Biases, activations, pooling and
    normalization are not counted; found by one dry forward pass of a zero input in eval mode.
    """
    dense, nonzero = 0, 0

    def hook(module: nn.Module, args, out: Tensor) -> None:
        nonlocal dense, nonzero
        w = module.weight
        if isinstance(module, nn.Linear):
            positions = args[0].numel() // module.in_features
        else:
            positions = out[0, 0].numel()  # spatial output positions of one sample
        dense += positions * w.numel()
        nonzero += positions * int(torch.count_nonzero(w))

    handles = [
        m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, *_CONV))
    ]
    was_training = model.training
    try:
        model.eval()
        p = next(model.parameters(), None)
        first = next((m for m in model.modules() if not list(m.children())), None)
        tokens = isinstance(first, torch.nn.Embedding)  # a language model reads token ids
        x = torch.zeros(
            1,
            *input_shape,
            device=p.device if p is not None else None,
            dtype=torch.long if tokens else p.dtype if p is not None else None,
        )
        with torch.no_grad():
            forward(model, x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return dense, nonzero


def gzip_size(model: nn.Module) -> int:
    """Bytes of the gzipped `torch.save` of the model's plain state_dict (tensors on CPU), as the
    tfmot pruning tutorial measures a model's size: zeros compress, so pruning shrinks it.
    Masks kept by `saliency.attach` are non-persistent buffers and are not part of it."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    return len(gzip.compress(buf.getvalue(), compresslevel=9, mtime=0))


def params_count(model: nn.Module, masks: Mapping[str, Tensor] | None) -> tuple[int, int]:
    """(total, remaining) entries of the prunable targets: the masked tensors and the kept
    entries of their masks. Without masks: the default prunable parameters of `model` and
    their nonzero entries."""
    if masks is None:
        from saliency.targets import prunable_parameters

        params = prunable_parameters(model)
        return (
            sum(p.numel() for p in params.values()),
            sum(int(torch.count_nonzero(p)) for p in params.values()),
        )
    named = dict(model.named_parameters())
    missing = sorted(set(masks) - set(named))
    if missing:
        raise ValueError(f"masks name parameters the model does not have: {missing[:5]}")
    return sum(m.numel() for m in masks.values()), sum(int(m.sum()) for m in masks.values())


@torch.no_grad()
def median_latency(
    models: Mapping[str, nn.Module], x: Tensor, *, repeats: int = 30, warmup: int = 3
) -> dict[str, float]:
    """Median wall-clock milliseconds of one forward of `x` per model (eval-mode copies, with
    the torch threads in force), over `repeats` rounds that run every model once in turn, so
    that a change of machine load hits all of them alike; `warmup` rounds are not timed."""
    copies = {k: copy.deepcopy(m).eval() for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in copies}
    for i in range(warmup + repeats):
        for k, m in copies.items():
            start = time.perf_counter()
            forward(m, x)
            if i >= warmup:
                times[k].append(1e3 * (time.perf_counter() - start))
    return {k: statistics.median(v) for k, v in times.items()}


def _window_batches(windows, batch_size: int) -> Iterator[Tensor]:
    """Token ids `[B, T]` from a tensor `[N, T]` or a Dataset of `(input_ids, labels)` samples
    (the zoo's language-model datasets). The one place that reads the batch: a dict batch
    (`{"input_ids", ...}`) would be read here, or by `model_io` once it knows them."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    if isinstance(windows, Tensor):
        yield from windows.split(batch_size)
        return
    for batch in DataLoader(windows, batch_size=batch_size, shuffle=False):
        if isinstance(batch, Mapping):
            yield batch["input_ids"]
        else:
            yield batch if isinstance(batch, Tensor) else batch[0]


@torch.no_grad()
def token_nll(model: nn.Module, windows, *, batch_size: int = 4) -> tuple[float, int]:
    """(summed negative log-likelihood, number of predicted tokens) of a causal LM on `windows`
    of token ids, all of one length T: every window predicts its tokens 1..T-1 from the ones
    before (shifted cross-entropy, no padding, no context across windows). `model(ids)` returns
    logits `[B, T, vocab]` (or an output with `.logits`); it runs in eval mode on its device,
    and its training mode is restored."""
    dev, was_training = model_device(model), model.training
    total, count, length = 0.0, 0, None
    model.eval()
    try:
        for ids in _window_batches(windows, batch_size):
            if ids.dim() != 2 or ids.is_floating_point() or (length not in (None, ids.shape[1])):
                raise ValueError(
                    f"windows must be token ids [N, T] of one length T; got a batch of shape "
                    f"{tuple(ids.shape)}, dtype {ids.dtype} (T so far: {length})"
                )
            length, ids = ids.shape[1], ids.to(dev)
            logits = model_output(model(ids))
            if logits.shape[:2] != ids.shape:
                raise ValueError(
                    f"a causal LM must return logits [B, T, vocab] = [{len(ids)}, {length}, ...]; "
                    f"got {tuple(logits.shape)}"
                )
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum"
            )
            total += float(nll.double())
            count += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("windows hold no predicted token (no window, or windows of length 1)")
    return total, count


def perplexity(model: nn.Module, windows, *, batch_size: int = 4) -> float:
    """Perplexity of a causal LM on fixed-length, non-overlapping windows of token ids, as
    SparseGPT (Frantar & Alistarh 2023) and Wanda (Sun et al. 2023) evaluate it:
    ``exp(sum of the shifted token NLL over all windows / number of predicted tokens)``.
    `windows`: a tensor `[N, T]` or a Dataset of `(input_ids, labels)` samples (`token_nll`)."""
    total, count = token_nll(model, windows, batch_size=batch_size)
    return math.exp(total / count)
