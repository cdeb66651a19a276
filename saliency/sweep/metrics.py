"""Cost metrics of a (pruned) model: multiply-adds, gzipped size, parameters remaining, latency."""

from __future__ import annotations

import copy
import gzip
import io
import statistics
import time
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from saliency.model_io import forward

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
