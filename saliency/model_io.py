"""How the library reads data, calls models and splits a loss into per-sample losses.

The lowest layer of the core: criteria, curvature and the per-sample machinery all go through
these functions, so a convention (what a model's output is, what sample n's loss is) lives in
one place.

- **Model outputs.** ``model_output(out)`` is what losses see: a tensor as is; the ``logits``
  of an object or mapping that has them (Hugging Face ``ModelOutput``, ``{"logits": ...}``);
  the first element of a tuple or list (``return_dict=False`` models). Anything else is refused
  with an error that says how to wrap the model.
- **Per-sample losses.** ``l_n = loss_fn(f(x_n)[None], y_n[None])``: sample n's own loss with the
  loss's own reduction over positions and its ``ignore_index`` (a sample whose positions are all
  ignored has loss 0). ``per_sample_losses`` computes them for a whole batch: closed forms for
  cross-entropy and MSE (any reduction, ignore index, label smoothing), ``vmap`` otherwise,
  a loop if that fails.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F_
from torch import Tensor, nn
from torch.func import vmap

from saliency import distributed

LossFn = Callable[[Tensor, Tensor], Tensor]


def default_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over integer class targets: the default `loss_fn(outputs, targets)`."""
    _check_class_targets(targets)
    return F_.cross_entropy(outputs, targets)


def _check_class_targets(targets: Tensor) -> None:
    if targets.is_floating_point():
        raise ValueError(
            f"the default loss is cross-entropy over integer class labels, but the targets are "
            f"{targets.dtype} (a regression task?): pass loss_fn=, e.g. torch.nn.MSELoss(), or "
            "F.cross_entropy itself for soft-label targets"
        )


# ----------------------------------------------------------------------------- models and data


def model_output(out) -> Tensor:
    """The tensor a loss is computed on, from whatever the model returned (module docstring)."""
    if isinstance(out, Tensor):
        return out
    logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(
        f"the model returned a {type(out).__name__}; accepted: a tensor, an object or mapping "
        "with a 'logits' tensor, or a tuple/list whose first element is the tensor the loss "
        "reads. Otherwise wrap the model in an nn.Module whose forward returns that tensor"
    )


def forward(model: nn.Module, x: Tensor) -> Tensor:
    """``model_output(model(x))``."""
    return model_output(model(x))


def model_device(model: nn.Module) -> torch.device:
    p = next(itertools.chain(model.parameters(), model.buffers()), None)
    return p.device if p is not None else torch.device("cpu")


def check_batch(x, y) -> None:
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(
            f"inputs and targets must be tensors; got {type(x).__name__} and {type(y).__name__}"
        )
    if x.dim() == 0 or y.dim() == 0:
        raise ValueError(
            f"a batch must carry the samples on dim 0; got inputs of shape {tuple(x.shape)} and "
            f"targets of shape {tuple(y.shape)} (single samples? pass a DataLoader or a Dataset)"
        )
    if len(x) != len(y):
        raise ValueError(f"inputs hold {len(x)} samples but targets hold {len(y)}")


_DATASET_BATCH = 256  # batch size used to read a Dataset of (input, target) samples


def _as_batches(data) -> Iterable:
    """Accept a DataLoader / iterable of batches, a map-style Dataset of samples (batched here),
    or a single ``(inputs, targets)`` pair of tensors."""
    from torch.utils.data import DataLoader, Dataset, IterableDataset

    if (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(isinstance(t, Tensor) for t in data)
    ):
        return [tuple(data)]
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        return DataLoader(data, batch_size=_DATASET_BATCH, shuffle=False)
    return data


def iter_batches(
    data: Iterable | None, n_samples: int | None = None, *, device: torch.device | None = None
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (inputs, targets) batches from `data` until `n_samples` samples were read
    (the last batch is cut to fit); all of `data` once if `n_samples` is None. Empty batches
    are skipped.

    `data`: an iterable of (inputs, targets) batches (a DataLoader), a map-style Dataset of
    (input, target) samples (read in batches of 256, in order), or one (inputs, targets) pair.
    Raises a ValueError naming the problem when `data` is missing or yields nothing usable;
    under torch.distributed every rank learns at its first batch whether some rank's shard is
    empty and all raise together (``saliency.distributed.check_nonempty``).
    """
    if data is None:
        raise ValueError(
            "this criterion needs data: pass data=<iterable of (inputs, targets) batches>, "
            "e.g. a torch DataLoader, a Dataset of (input, target) pairs, or one (x, y) pair"
        )
    batches = _read_batches(data, n_samples, device)
    first = next(batches, None)
    distributed.check_nonempty(first is not None)
    if first is None:
        raise ValueError("data yielded no samples")
    yield first
    yield from batches


def _read_batches(data, n_samples, device) -> Iterator[tuple[Tensor, Tensor]]:
    seen = 0
    for batch in _as_batches(data):
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError(
                f"data must yield (inputs, targets) pairs; got a {type(batch).__name__}"
            )
        x, y = batch[0], batch[1]
        check_batch(x, y)
        if n_samples is not None:
            x, y = x[: n_samples - seen], y[: n_samples - seen]
        if len(x) == 0:
            continue
        if device is not None:
            x, y = x.to(device), y.to(device)
        seen += len(x)
        yield x, y
        if n_samples is not None and seen >= n_samples:
            return


# ----------------------------------------------------------------------------- losses


def scalar_loss(loss_fn: LossFn, out: Tensor, y: Tensor) -> Tensor:
    """``loss_fn(out, y)``, refused unless it is a scalar (mean- or sum-reduced)."""
    loss = loss_fn(out, y)
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"loss_fn must return a scalar (a mean- or sum-reduced loss); got {shape}. "
            "A loss with reduction='none' is not accepted: per-sample losses are taken by "
            "the library itself"
        )
    return loss


def check_loss(loss_fn: LossFn, model: nn.Module, x: Tensor, y: Tensor) -> None:
    """Refuse a loss that is not scalar on one sample (``reduction="none"``), before any work."""
    with torch.no_grad():
        scalar_loss(loss_fn, forward(model, x[:1]), y[:1])


def _ce_settings(loss_fn: LossFn) -> dict | None:
    """reduction, ignore_index, label_smoothing of a cross-entropy without class weights."""
    if loss_fn in (default_loss, F_.cross_entropy):
        return {"reduction": "mean", "ignore_index": -100, "label_smoothing": 0.0}
    if type(loss_fn) is nn.CrossEntropyLoss and loss_fn.weight is None:
        if loss_fn.reduction not in ("mean", "sum"):
            return None
        return {
            "reduction": loss_fn.reduction,
            "ignore_index": loss_fn.ignore_index,
            "label_smoothing": loss_fn.label_smoothing,
        }
    return None


def loss_kind(loss_fn: LossFn) -> str | None:
    """ "ce", "mse_mean", "mse_sum" for the losses with closed forms here, else None."""
    if _ce_settings(loss_fn) is not None:
        return "ce"
    if loss_fn is F_.mse_loss or (type(loss_fn) is nn.MSELoss and loss_fn.reduction == "mean"):
        return "mse_mean"
    if type(loss_fn) is nn.MSELoss and loss_fn.reduction == "sum":
        return "mse_sum"
    return None


def _reduce_positions(per: Tensor, valid: Tensor | None, reduction: str) -> Tensor:
    """``[B, ...]`` per-position losses -> ``[B]``, as ``reduction`` reduces one sample."""
    per = per.reshape(len(per), -1)
    if reduction == "sum":
        return per.sum(1)
    if valid is None:
        return per.mean(1)
    count = valid.reshape(len(per), -1).sum(1)
    return per.sum(1) / count.clamp(min=1)


def fast_per_sample_losses(loss_fn: LossFn) -> Callable[[Tensor, Tensor], Tensor] | None:
    """Batched ``[B]`` per-sample losses for cross-entropy and MSE (equal to ``loss_fn`` on each
    sample, with its reduction and ignore index), or None for other losses (vmap costs ms)."""
    ce = _ce_settings(loss_fn)
    if ce is not None:

        def ce_losses(o: Tensor, t: Tensor) -> Tensor:
            if loss_fn is default_loss:
                _check_class_targets(t)
            per = F_.cross_entropy(
                o, t, reduction="none", ignore_index=ce["ignore_index"],
                label_smoothing=ce["label_smoothing"],
            )  # fmt: skip
            valid = (t != ce["ignore_index"]) if not t.is_floating_point() else None
            return _reduce_positions(per, valid, ce["reduction"])

        return ce_losses
    kind = loss_kind(loss_fn)
    if kind is not None:
        red = "mean" if kind == "mse_mean" else "sum"
        return lambda o, t: _reduce_positions(F_.mse_loss(o, t, reduction="none"), None, red)
    return None


def loss_phi(loss_fn: LossFn) -> Callable[[Tensor, Tensor], Tensor]:
    """``phi(f_n, y_n)``: one sample's loss from its unbatched output and target, with a
    ``batched`` attribute computing all of a batch's at once where a closed form exists."""
    phi = lambda o, t: loss_fn(o.unsqueeze(0), t.unsqueeze(0))
    phi.batched = fast_per_sample_losses(loss_fn)
    phi.scalar = True  # vmap_or_loop checks it gives one scalar per sample
    return phi


def vmap_or_loop(phi, out: Tensor, t: Tensor) -> Tensor:
    """``[phi(out[n], t[n]) for n]``, batched when ``phi.batched`` exists, else vmapped (a loop if
    vmap cannot trace ``phi``). Refuses a loss (``phi.scalar``) not scalar per sample."""
    if getattr(phi, "batched", None) is not None:
        res = phi.batched(out, t)
    else:
        try:
            res = vmap(phi)(out, t)
        except Exception:  # functions that vmap cannot trace (data-dependent control flow)
            res = torch.stack([phi(out[i], t[i]) for i in range(len(out))])
    if getattr(phi, "scalar", False) and res.shape != (len(out),):
        raise ValueError(
            f"loss_fn must return a scalar per call (a mean- or sum-reduced loss); one sample "
            f"gave shape {tuple(res.shape[1:])}. reduction='none' is not accepted: per-sample "
            "losses are taken by the library itself"
        )
    return res


def per_sample_losses(loss_fn: LossFn, out: Tensor, y: Tensor) -> Tensor:
    """``[B]`` vector of ``l_n = loss_fn(out[n:n+1], y[n:n+1])`` (module docstring)."""
    return vmap_or_loop(loss_phi(loss_fn), out, y)
