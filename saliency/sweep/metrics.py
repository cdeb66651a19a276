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


# ----------------------------------------------------------------------------- transformers


def _in_features(m: nn.Module) -> int | None:
    """Input width of a Linear (weight ``[out, in]``) or a Conv1D (``[in, out]``); else None."""
    from saliency.targets import is_transposed_linear

    if is_transposed_linear(m):
        return m.weight.shape[0]
    return m.weight.shape[1] if isinstance(m, nn.Linear) else None


@torch.no_grad()
def transformer_macs(model: nn.Module, structure, seq_len: int, *, causal: bool = True) -> float:
    """Multiply-adds per token of a transformer (Hugging Face LM) reading `seq_len` tokens.

    Counted: (1) every Linear / Conv1D weight, ``in * out`` per row it is applied to, found by
    hooks on one forward of ``[1, seq_len]`` token ids (q/k/v/o, the MLP, the LM head on every
    position), divided by ``seq_len``; (2) attention's two products, ``q k^T`` and the
    weighted sum of ``v``: ``h * d`` multiply-adds per key for each of them, ``h * d`` being
    the input width of the block's attention out projection (query heads times head width, from
    `structure`), with ``(seq_len + 1) / 2`` keys per query on average under a causal mask
    (query ``t`` reads ``t + 1`` keys), ``seq_len`` otherwise. Not counted: embeddings (lookups),
    norms, activations, rotary embeddings, softmax, residual additions, biases."""
    total = 0.0

    def hook(m, args, out) -> None:
        nonlocal total
        total += args[0].numel() // _in_features(m) * m.weight.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if _in_features(m)]
    was = {m: m.training for m in model.modules()}
    model.eval()
    try:
        ids = torch.zeros(1, seq_len, dtype=torch.long, device=model_device(model))
        model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
        for m, t in was.items():
            m.training = t
    mods = dict(model.named_modules())
    keys = (seq_len + 1) / 2 if causal else seq_len
    attention = 0.0
    for g in structure.groups:
        if g.kind == "head":
            attention += 2 * _in_features(mods[g.output]) * keys
    return total / seq_len + attention


def block_parameters(model: nn.Module, structure) -> int:
    """Parameters of the transformer blocks `structure.blocks` (each tensor once)."""
    seen: dict[int, int] = {}
    for b in structure.blocks:
        for p in model.get_submodule(b).parameters():
            seen[id(p)] = p.numel()
    return sum(seen.values())


def _generate_timed(model: nn.Module, ids: Tensor, new_tokens: int) -> tuple[float, float]:
    """(prefill ms, decode tokens per second) of one greedy generation with the KV cache of
    `new_tokens` tokens after the prompt `ids`. Prefill: from the call of ``generate`` to the
    first token's logits (the prompt's forward, building the cache, with generate's own set-up:
    the time to the first token); decode: ``new_tokens - 1`` over the time from the first
    token's logits to the last's (that many cached one-token forwards, with generate's work
    between them). A logits processor that changes nothing takes the time stamps."""
    from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

    stamps: list[float] = []

    class Clock(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, use_cache=True, eos_token_id=None,
                              pad_token_id=0)  # fmt: skip
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config,
                   logits_processor=LogitsProcessorList([Clock()]))  # fmt: skip
    if len(stamps) != new_tokens:
        raise RuntimeError(f"generate produced {len(stamps)} tokens; {new_tokens} were asked for")
    return 1e3 * (stamps[0] - start), (new_tokens - 1) / (stamps[-1] - stamps[0])


@torch.no_grad()
def lm_latency(
    models: Mapping[str, nn.Module],
    ids: Tensor,
    *,
    decode_tokens: int,
    threads: Sequence[int] = (1,),
    repeats: int = 3,
    warmup: int = 1,
) -> dict[str, dict[str, float]]:
    """CPU speed of causal LMs greedily continuing one prompt `ids` ``[1, P]`` with the KV cache
    (`_generate_timed`), per model: ``{"prefill_ms_t<n>": median ms from the call to the first
    token (the prompt's forward), "decode_tok_s_t<n>": median tokens per second over the
    `decode_tokens` generated}`` for each torch thread count ``n`` in `threads`. Eval-mode
    copies; every round runs each model once in turn, so that a change of machine load hits
    all of them alike; `warmup` rounds (two new tokens each) are not timed. The thread count is
    set for the measurement and restored afterwards."""
    if not isinstance(decode_tokens, int) or decode_tokens < 2:
        raise ValueError(f"decode_tokens must be an int >= 2; got {decode_tokens!r}")
    if ids.dim() != 2 or len(ids) != 1:
        raise ValueError(f"ids must be one prompt [1, P]; got shape {tuple(ids.shape)}")
    copies = {k: copy.deepcopy(m).eval() for k, m in models.items()}
    out: dict[str, dict[str, float]] = {k: {} for k in copies}
    before = torch.get_num_threads()
    try:
        for t in threads:
            torch.set_num_threads(t)
            for _ in range(warmup):
                for m in copies.values():
                    _generate_timed(m, ids, 2)
            prefill = {k: [] for k in copies}
            decode = {k: [] for k in copies}
            for _ in range(repeats):
                for k, m in copies.items():
                    p, d = _generate_timed(m, ids, decode_tokens)
                    prefill[k].append(p)
                    decode[k].append(d)
            for k in copies:
                out[k][f"prefill_ms_t{t}"] = statistics.median(prefill[k])
                out[k][f"decode_tok_s_t{t}"] = statistics.median(decode[k])
    finally:
        torch.set_num_threads(before)
    return out
