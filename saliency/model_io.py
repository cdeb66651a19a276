"""How the library reads data, calls models and splits a loss into per-sample losses.

The lowest layer of the core and the one owner of the batch format: criteria, curvature, the
per-sample machinery, the layer-wise capture and the sweeps all go through it, so a convention
(what a batch is, what a model's output is, what sample n's loss is) lives in one place.

- **Batches.** ``iter_batches`` yields ``Batch`` objects from ``(inputs, targets)`` pairs, where
  inputs is a tensor (``model(x)``), a tuple of tensors (``model(*x)``) or a mapping of keyword
  arguments (``model(**x)``), or from mappings of model keyword arguments (the Hugging Face
  convention ``{"input_ids", "attention_mask", "labels", ...}``; the targets are the
  ``labels``). A ``Batch`` knows its number of samples, slices samples (every tensor whose
  dim 0 is the batch size; the others are shared), moves to a device, calls the model, and
  marks padding (``token_mask``: False where ``attention_mask == 0`` or ``labels == -100``).
  Callers write ``batch.call(model)`` and ``batch[i:j]``, never ``model(x)`` or ``x[i:j]``.
- **Model outputs.** ``model_output(out)`` is what losses see: a tensor as is; the ``logits``
  of an object or mapping that has them (Hugging Face ``ModelOutput``, ``{"logits": ...}``);
  the first element of a tuple or list (``return_dict=False`` models). Anything else is refused
  with an error that says how to wrap the model.
- **Losses.** Without ``loss_fn`` (None or ``default_loss``), ``resolve_loss`` picks
  cross-entropy, or ``causal_lm_loss`` (shifted token cross-entropy, labels -100 ignored) for
  the labels of a causal LM; the scalar loss of a labelled mapping batch is the model's own
  ``.loss`` (``batch_loss``). For a causal LM that batch loss is the mean over **all** valid
  tokens of the batch, while per-sample quantities use each sample's own mean (next item), so
  a Fisher ``(1/N) sum_n g_n g_n^T`` weighs every sample equally, whatever its length.
- **Per-sample losses.** ``l_n = loss_fn(f(x_n)[None], y_n[None])``: sample n's own loss with the
  loss's own reduction over positions and its ``ignore_index`` (a sample whose positions are all
  ignored has loss 0). ``per_sample_losses`` computes them for a whole batch: closed forms for
  cross-entropy, ``causal_lm_loss`` and MSE (any reduction, ignore index, label smoothing),
  ``vmap`` otherwise, a loop if that fails. Padded positions carry label -100, so they are in
  no loss and, through the gradients, in no Fisher statistic; the layer-wise capture drops
  their rows (``saliency.capture``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F_
from torch import Tensor, nn
from torch.func import vmap

from saliency import distributed

LossFn = Callable[[Tensor, Tensor], Tensor]


def default_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over integer class targets: the default `loss_fn(outputs, targets)`.
    Passed as ``loss_fn`` (or None) it means "the default for this model and batch"
    (``resolve_loss``): cross-entropy, or ``causal_lm_loss`` for a causal LM's labels."""
    _check_class_targets(targets)
    return F_.cross_entropy(outputs, targets)


IGNORE_INDEX = -100  # label of a position out of the loss (PyTorch's and Hugging Face's)


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Shifted token cross-entropy of a causal LM, as Hugging Face's ``*ForCausalLM`` compute
    it from ``labels`` (the input ids): ``-mean_t log p(labels[:, t+1] | logits[:, t])`` over
    the positions whose label is not -100, all samples of the batch together. ``logits
    [B, T, V]``, ``labels [B, T]``. Sample n's own loss (module docstring) is the mean over its
    own valid tokens."""
    _check_lm_shapes(logits, labels)
    V = logits.shape[-1]
    return F_.cross_entropy(
        logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )


def _causal_lm_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """``[B]`` per-sample ``causal_lm_loss``: each sample's mean over its valid tokens."""
    _check_lm_shapes(logits, labels)
    B, T, V = logits.shape
    t = labels[:, 1:]
    per = F_.cross_entropy(
        logits[:, :-1].reshape(-1, V), t.reshape(-1), reduction="none", ignore_index=IGNORE_INDEX
    )
    return _reduce_positions(per.view(B, T - 1), t != IGNORE_INDEX, "mean")


def _check_lm_shapes(logits: Tensor, labels: Tensor) -> None:
    if logits.dim() != 3 or labels.shape != logits.shape[:2] or labels.is_floating_point():
        raise ValueError(
            f"causal_lm_loss takes logits [B, T, V] and integer labels [B, T]; got logits "
            f"{tuple(logits.shape)} and labels {tuple(labels.shape)} ({labels.dtype})"
        )


def _check_class_targets(targets: Tensor) -> None:
    if targets.is_floating_point():
        raise ValueError(
            f"the default loss is cross-entropy over integer class labels, but the targets are "
            f"{targets.dtype} (a regression task?): pass loss_fn=, e.g. torch.nn.MSELoss(), or "
            "F.cross_entropy itself for soft-label targets"
        )


_LM_HEADS = ("ForCausalLM", "LMHeadModel")


def is_causal_lm(model: nn.Module) -> bool:
    """A Hugging Face causal LM: its class (``*ForCausalLM``, ``*LMHeadModel``), else (a class
    that is no other ``*For...`` head) its ``config.architectures`` or ``config.is_decoder``."""
    name = type(model).__name__
    if name.endswith(_LM_HEADS):
        return True
    if "For" in name:
        return False
    cfg = getattr(model, "config", None)
    archs = getattr(cfg, "architectures", None) or []
    return any(a.endswith(_LM_HEADS) for a in archs) or getattr(cfg, "is_decoder", False) is True


def resolve_loss(loss_fn: LossFn | None, model: nn.Module, batch: Batch) -> LossFn:
    """The loss to use on ``batch``: ``loss_fn`` itself unless it is None or ``default_loss``;
    then ``causal_lm_loss`` for the labels of a causal LM's mapping batch, cross-entropy for
    class labels ``[B]`` (a sequence classifier) or ``(inputs, targets)`` pairs of other models.
    Ambiguous cases (token labels on a model that is not a causal LM, a causal LM given
    ``(inputs, targets)`` pairs) are refused, naming the fix."""
    if loss_fn is not None and loss_fn is not default_loss:
        return loss_fn
    y = batch.require_targets()
    causal = is_causal_lm(model)
    if batch.from_labels:
        if causal:
            return causal_lm_loss
        if y.dim() == 1:
            return default_loss
        raise ValueError(
            f"labels of shape {tuple(y.shape)} on a {type(model).__name__}, which is not "
            "recognised as a causal LM (class *ForCausalLM / *LMHeadModel, config.architectures "
            "or config.is_decoder): the default loss is ambiguous. Pass loss_fn=, e.g. "
            "saliency.causal_lm_loss (shifted token cross-entropy) for a causal LM"
        )
    if causal and y.dim() == 2:
        raise ValueError(
            f"(inputs, targets) pairs on the causal LM {type(model).__name__}: are the targets "
            "shifted or not? Pass loss_fn=saliency.causal_lm_loss (targets = the input ids, "
            "shifted inside, as Hugging Face does), or batches {'input_ids', 'attention_mask', "
            "'labels'} (the default loss is then causal_lm_loss)"
        )
    return default_loss


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


def forward(model: nn.Module, batch) -> Tensor:
    """``model_output`` of the model called on ``batch`` (a ``Batch``, or an input tensor)."""
    return model_output(batch.call(model) if isinstance(batch, Batch) else model(batch))


def model_device(model: nn.Module) -> torch.device:
    p = next(itertools.chain(model.parameters(), model.buffers()), None)
    return p.device if p is not None else torch.device("cpu")


def check_batch(x, y) -> None:
    """Refuse ``(inputs, targets)`` that are not a batch (``Batch.of`` lists what is accepted)."""
    Batch.of((x, y))


def as_batch(x, y: Tensor | None = None) -> Batch:
    """``x`` if it is a ``Batch`` (then ``y`` must be None), else the pair ``(x, y)``."""
    if isinstance(x, Batch):
        if y is not None:
            raise TypeError("pass either a Batch or (inputs, targets), not a Batch and targets")
        return x
    return Batch.of((x, y))


_INPUTS = "a tensor, a tuple of tensors or a mapping of model keyword arguments"


def _leading(t) -> int | None:
    return len(t) if isinstance(t, Tensor) and t.dim() > 0 else None


@dataclass(frozen=True)
class Batch:
    """One batch of samples, the only object that knows the batch format (module docstring).

    ``inputs``: a tensor (``model(x)``), a tuple of tensors (``model(*x)``) or a mapping of
    keyword arguments (``model(**x)``); ``targets``: a tensor, or None (inputs only).
    ``from_labels``: the targets are the ``labels`` of a mapping batch (Hugging Face), so the
    model can compute its own loss from them. Every tensor whose dim 0 has the batch size is a
    per-sample tensor (sliced, vmapped); the others are shared by all samples.
    Unpacks as ``inputs, targets = batch`` (the former ``(x, y)`` pairs)."""

    inputs: Any
    targets: Tensor | None = None
    from_labels: bool = False

    @classmethod
    def of(cls, raw) -> Batch:
        """A batch from what a data loader yields: ``(inputs, targets[, ...])`` or a mapping of
        model keyword arguments whose ``labels`` (if any) are the targets."""
        if isinstance(raw, Batch):
            return raw
        if isinstance(raw, Mapping):
            inputs = {k: v for k, v in raw.items() if k != "labels"}
            b = cls(inputs, _unpadded_labels(raw), raw.get("labels") is not None)
        elif isinstance(raw, (tuple, list)) and len(raw) >= 2:
            b = cls(tuple(raw[0]) if isinstance(raw[0], list) else raw[0], raw[1])
        else:
            raise TypeError(
                f"data must yield (inputs, targets) pairs or mappings of model keyword arguments "
                f"(input_ids, attention_mask, labels...); got a {type(raw).__name__}"
            )
        b._check()
        return b

    def _check(self) -> None:
        x, y = self.inputs, self.targets
        if not isinstance(x, (Tensor, tuple, Mapping)) or (
            isinstance(x, tuple) and not all(isinstance(v, Tensor) for v in x)
        ):
            raise TypeError(f"inputs must be {_INPUTS}; got {type(x).__name__}")
        if y is not None and not isinstance(y, Tensor):
            raise TypeError(f"targets (labels) must be a tensor; got {type(y).__name__}")
        sizes = [_leading(v) for v in self._leaves().values()]
        if all(s is None for s in sizes) or (y is not None and y.dim() == 0):
            shapes = [tuple(v.shape) for v in self._leaves().values() if isinstance(v, Tensor)]
            raise ValueError(
                f"a batch must carry the samples on dim 0; got inputs of shape(s) {shapes} and "
                f"targets of shape {None if y is None else tuple(y.shape)} (single samples? pass "
                "a DataLoader or a Dataset)"
            )
        if y is not None and len(y) not in sizes:
            raise ValueError(
                f"inputs hold {next(s for s in sizes if s is not None)} samples but targets "
                f"hold {len(y)}"
            )

    def __len__(self) -> int:
        """The number of samples: dim 0 of the targets, else of the first input tensor."""
        if self.targets is not None:
            return len(self.targets)
        return next(s for s in map(_leading, self._leaves().values()) if s is not None)

    def __iter__(self):
        return iter((self.inputs, self.targets))

    def _leaves(self) -> dict:
        """Every input value, keyed by argument name (mapping) or position."""
        x = self.inputs
        return (
            dict(x)
            if isinstance(x, Mapping)
            else dict(enumerate(x if isinstance(x, tuple) else (x,)))
        )

    def _build(self, leaves: dict, targets) -> Batch:
        x = self.inputs
        if isinstance(x, Mapping):
            inputs = dict(leaves)
        else:
            inputs = tuple(leaves[i] for i in range(len(leaves)))
            inputs = inputs if isinstance(x, tuple) else inputs[0]
        return Batch(inputs, targets, self.from_labels)

    def rows(self) -> dict:
        """The per-sample input tensors (dim 0 = samples), keyed as ``with_rows`` takes them."""
        B = len(self)
        return {k: v for k, v in self._leaves().items() if _leading(v) == B}

    def with_rows(self, rows: dict, targets=None) -> Batch:
        """This batch with its per-sample input tensors replaced by ``rows`` (any number of
        samples; e.g. one sample inside ``vmap``) and its targets by ``targets``."""
        return self._build({**self._leaves(), **rows}, targets)

    def __getitem__(self, idx) -> Batch:
        """Samples ``idx`` (a slice or index tensor/list) of every per-sample tensor."""
        if isinstance(idx, int):
            raise TypeError(f"index a Batch with a slice or a list (batch[{idx}:{idx + 1}])")
        y = None if self.targets is None else self.targets[idx]
        return self.with_rows({k: v[idx] for k, v in self.rows().items()}, y)

    def to(self, device) -> Batch:
        move = lambda v: v.to(device) if isinstance(v, Tensor) else v
        y = None if self.targets is None else self.targets.to(device)
        return self._build({k: move(v) for k, v in self._leaves().items()}, y)

    def same_sample(self, i: int, j: int) -> bool:
        """Do samples i and j have equal inputs?"""
        return all(torch.equal(v[i], v[j]) for v in self.rows().values())

    def call(self, model: nn.Module, *, labels: bool = False):
        """The model's raw output: ``model(**x)``, ``model(*x)`` or ``model(x)``; with
        ``labels``, a mapping batch passes its labels too (the model computes its own loss)."""
        x = self.inputs
        if isinstance(x, Mapping):
            extra = {"labels": self.targets} if labels and self.from_labels else {}
            return model(**x, **extra)
        return model(*x) if isinstance(x, tuple) else model(x)

    def require_targets(self) -> Tensor:
        if self.targets is None:
            raise ValueError(
                "this computation needs targets, and the batch has none: give mapping batches "
                "their 'labels' (or yield (inputs, targets) pairs)"
            )
        return self.targets

    @property
    def token_mask(self) -> Tensor | None:
        """``[B, T]`` bool, False at padded tokens (``attention_mask == 0``, or ``labels ==
        -100`` of a mapping batch whose labels are per token), or None (every token counts)."""
        m = None
        x = self.inputs
        am = x.get("attention_mask") if isinstance(x, Mapping) else None
        if isinstance(am, Tensor) and am.dim() == 2:
            m = am != 0
        y = self.targets
        if self.from_labels and y is not None and y.dim() == 2 and not y.is_floating_point():
            if m is None or m.shape == y.shape:
                m = (y != IGNORE_INDEX) if m is None else m & (y != IGNORE_INDEX)
        return m


def _unpadded_labels(raw: Mapping):
    """A mapping batch's labels, -100 (out of the loss) wherever ``attention_mask == 0``."""
    y, am = raw.get("labels"), raw.get("attention_mask")
    if isinstance(y, Tensor) and isinstance(am, Tensor) and y.shape == am.shape:
        if not y.is_floating_point():
            return y.masked_fill(am == 0, IGNORE_INDEX)
    return y


_DATASET_BATCH = 256  # batch size used to read a Dataset of (input, target) samples


def _as_batches(data) -> Iterable:
    """Accept a DataLoader / iterable of batches, a map-style Dataset of samples (batched here),
    a single ``(inputs, targets)`` pair or a single mapping batch."""
    from torch.utils.data import DataLoader, Dataset, IterableDataset

    if isinstance(data, Mapping):
        return [data]
    if (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[1], Tensor)
        and isinstance(data[0], (Tensor, Mapping, tuple))
    ):
        return [tuple(data)]
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        return DataLoader(data, batch_size=_DATASET_BATCH, shuffle=False)
    return data


def iter_batches(
    data: Iterable | None, n_samples: int | None = None, *, device: torch.device | None = None
) -> Iterator[Batch]:
    """Yield ``Batch``es from `data` until `n_samples` samples were read (the last batch is cut
    to fit); all of `data` once if `n_samples` is None. Empty batches are skipped.

    `data`: an iterable of batches (a DataLoader) yielding ``(inputs, targets)`` pairs or
    mappings of model keyword arguments (``{"input_ids", "attention_mask", "labels"}``), a
    map-style Dataset of samples (read in batches of 256, in order), or one batch.
    Raises a ValueError naming the problem when `data` is missing or yields nothing usable;
    under torch.distributed every rank learns at its first batch whether some rank's shard is
    empty and all raise together (``saliency.distributed.check_nonempty``).
    """
    if data is None:
        raise ValueError(
            "this criterion needs data: pass data=<iterable of batches>, e.g. a torch "
            "DataLoader of (inputs, targets) pairs or of {'input_ids', 'attention_mask', "
            "'labels'} mappings, a Dataset of (input, target) pairs, or one batch"
        )
    batches = _read_batches(data, n_samples, device)
    first = next(batches, None)
    distributed.check_nonempty(first is not None)
    if first is None:
        raise ValueError("data yielded no samples")
    yield first
    yield from batches


def _read_batches(data, n_samples, device) -> Iterator[Batch]:
    seen = 0
    for raw in _as_batches(data):
        batch = Batch.of(raw)
        if n_samples is not None:
            batch = batch[: n_samples - seen]
        if len(batch) == 0:
            continue
        if device is not None:
            batch = batch.to(device)
        seen += len(batch)
        yield batch
        if n_samples is not None and seen >= n_samples:
            return


# ----------------------------------------------------------------------------- losses


def scalar_loss(loss_fn: LossFn, out: Tensor, y: Tensor) -> Tensor:
    """``loss_fn(out, y)``, refused unless it is a scalar (mean- or sum-reduced)."""
    try:
        loss = loss_fn(out, y)
    except RuntimeError as e:  # shape mismatches: say which shapes met, and the usual fix
        hint = (
            "; for a causal LM (logits [B, T, V], targets the input ids [B, T]) pass "
            "loss_fn=saliency.causal_lm_loss"
            if out.dim() == 3 and y.dim() == 2
            else ""
        )
        raise ValueError(
            f"loss_fn failed on outputs of shape {tuple(out.shape)} and targets of shape "
            f"{tuple(y.shape)}: {e}{hint}"
        ) from e
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"loss_fn must return a scalar (a mean- or sum-reduced loss); got {shape}. "
            "A loss with reduction='none' is not accepted: per-sample losses are taken by "
            "the library itself"
        )
    return loss


def check_loss(loss_fn: LossFn, model: nn.Module, batch: Batch) -> None:
    """Refuse a loss that is not scalar on one sample (``reduction="none"``), before any work."""
    one = batch[:1]
    with torch.no_grad():
        scalar_loss(loss_fn, forward(model, one), one.require_targets())


def batch_loss(
    model: nn.Module, batch: Batch, loss_fn: LossFn | None = None, *, temperature: float = 1.0
) -> Tensor:
    """The scalar loss of one batch. Without ``loss_fn`` (None or ``default_loss``), a mapping
    batch with labels and a model that returns ``.loss`` (Hugging Face): that loss (for a causal
    LM the mean over all valid tokens of the batch, not the mean of per-sample means); otherwise
    ``loss_fn(f(x) / temperature, y)`` with ``resolve_loss``'s loss."""
    own = loss_fn in (None, default_loss) and batch.from_labels and temperature == 1.0
    out = batch.call(model, labels=own)
    loss = (
        (out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None))
        if own
        else None
    )
    if isinstance(loss, Tensor) and loss.dim() == 0:
        return loss
    fn = resolve_loss(loss_fn, model, batch)
    return scalar_loss(fn, model_output(out) / temperature, batch.targets)


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
    if loss_fn is causal_lm_loss:
        return _causal_lm_losses
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
