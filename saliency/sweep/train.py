"""A plain training and evaluation loop for the sweeps (and for users who want one).

Masks attached with `saliency.attach` stay in force: the optimizer is created here, after
attaching, and attach's hooks zero the pruned gradients and re-zero pruned weights before every
forward, so SGD (momentum, weight decay), Adam and AdamW never move a pruned weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
)

from saliency.apply import clear_optimizer_state
from saliency.masks import Masks
from saliency.model_io import Batch, causal_lm_loss, forward

Task = Literal["classification", "regression", "lm"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """ "auto" -> CUDA when available, else CPU; "cuda" without CUDA is an error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, str) or device.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:i]'; got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} asked for but CUDA is not available; use 'cpu' or 'auto'"
        )
    return torch.device(device)


def make_loader(ds: Dataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """Batches of `ds`; shuffled with a generator seeded by `seed` (a new order every epoch,
    the same sequence of orders for the same seed). A `TensorDataset` is indexed a whole batch
    at a time (one gather instead of `batch_size` item look-ups and a collate)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    g = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(ds, generator=g) if shuffle else SequentialSampler(ds)
    if isinstance(ds, TensorDataset):
        return DataLoader(
            ds, sampler=BatchSampler(sampler, batch_size, drop_last=False), batch_size=None
        )
    return DataLoader(ds, batch_size=batch_size, sampler=sampler)


def task_loss(task: Task) -> Callable[[Tensor, Tensor], Tensor]:
    """Mean cross-entropy on logits (classification), mean squared error (regression), or the
    shifted token cross-entropy of a causal LM ("lm", `causal_lm_loss`)."""
    if task == "classification":
        return F.cross_entropy
    if task == "regression":
        return lambda out, y: F.mse_loss(out.reshape(y.shape), y.to(out.dtype))
    if task == "lm":
        return causal_lm_loss
    raise ValueError(f"task must be 'classification', 'regression' or 'lm'; got {task!r}")


def make_optimizer(params, optimizer: str, lr: float, momentum: float, weight_decay: float):
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'sgd', 'adam' or 'adamw'; got {optimizer!r}")


def train(
    model: nn.Module,
    train_ds: Dataset,
    *,
    epochs: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    optimizer: str = "adam",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: str | torch.device = "auto",
    task: Task = "classification",
    on_step: Callable[[int], object] | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    on_epoch: Callable[[int, float], bool | None] | None = None,
    max_steps: int | None = None,
) -> dict[str, list[float] | int]:
    """Train `model` in place for `epochs` passes over `train_ds`; returns
    {"epoch_loss": [mean training loss of each epoch], "steps": optimizer steps}.

    The model is moved to `device` and left there, in the training mode it had before.
    `on_step(step)` runs after every optimizer step with the 0-based index of that step (the
    sweeps call `GradualPruner.step()` there); when it returns new `Masks` (as
    `GradualPruner.step()` does), the optimizer state at their pruned entries is cleared. `on_epoch(epoch, mean_loss)` runs after every
    epoch; returning True stops training (early stopping). `loss_fn` defaults to the task's loss.
    `max_steps`: stop after this many optimizer steps, within an epoch if need be (a short
    recovery fine-tuning of a large model); the last, partial epoch's mean loss is recorded.
    """
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative int; got {epochs!r}")
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
        raise ValueError(f"max_steps must be a positive int or None; got {max_steps!r}")
    dev = resolve_device(device)
    loss_fn = loss_fn or task_loss(task)
    model.to(dev)
    opt = make_optimizer(
        [p for p in model.parameters() if p.requires_grad], optimizer, lr, momentum, weight_decay
    )
    loader = make_loader(train_ds, batch_size, shuffle=True, seed=seed)
    was_training, step, history, last_masks = model.training, 0, [], None
    model.train()
    try:
        for _ in range(epochs):
            if max_steps is not None and step >= max_steps:
                break
            total, n = 0.0, 0
            for raw in loader:
                if max_steps is not None and step >= max_steps:
                    break
                batch = Batch.of(raw).to(dev)
                loss = loss_fn(forward(model, batch), batch.targets)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if on_step is not None:
                    masks = on_step(step)
                    if isinstance(masks, Masks) and masks is not last_masks:
                        # pruned mid-training (GradualPruner.step() returns the masks in force):
                        # clear the optimizer's stale momentum at newly pruned entries
                        clear_optimizer_state(opt, model, masks)
                        last_masks = masks
                step += 1
                total += float(loss.detach()) * len(batch)
                n += len(batch)
            history.append(total / max(n, 1))
            if on_epoch is not None and on_epoch(len(history) - 1, history[-1]):
                break
    finally:
        model.train(was_training)
        opt.zero_grad(set_to_none=True)  # leave no .grad behind
    return {"epoch_loss": history, "steps": step}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    ds: Dataset,
    *,
    task: Task = "classification",
    batch_size: int = 1024,
    device: str | torch.device = "auto",
) -> dict[str, float]:
    """Test metrics: {"accuracy" (fraction correct), "loss" (mean cross-entropy)} for
    classification, {"mse"} for regression, {"loss" (mean token NLL), "perplexity"} for "lm"
    (causal LMs on windows of token ids, `metrics.perplexity`). Restores the training mode."""
    dev = resolve_device(device)
    if task == "lm":
        from saliency.sweep.metrics import token_nll

        # logits [B, T, vocab] are large (8 x 256 x 49152 floats: 400 MB): small batches
        total, count = token_nll(model.to(dev), ds, batch_size=min(batch_size, 8))
        return {"loss": total / count, "perplexity": math.exp(total / count)}
    loss_fn = task_loss(task)
    model.to(dev)
    was_training = model.training
    model.eval()
    try:
        loss_sum, correct, n = 0.0, 0, 0
        for raw in make_loader(ds, batch_size, shuffle=False):
            batch = Batch.of(raw).to(dev)
            out, y = forward(model, batch), batch.targets
            loss_sum += float(loss_fn(out, y)) * len(y)
            if task == "classification":  # sequences (targets [B, T]): per-sample token accuracy
                hit = (out.argmax(1) == y).double()
                correct += float(hit.reshape(len(y), -1).mean(1).sum())
            n += len(y)
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("evaluate: the dataset is empty")
    if task == "regression":
        return {"mse": loss_sum / n}
    metrics = {"accuracy": correct / n, "loss": loss_sum / n}
    if y.dim() > 1:  # language models: per-token perplexity exp(mean cross-entropy)
        metrics["perplexity"] = math.exp(metrics["loss"])
    return metrics
