"""`check_criterion`: the contract every criterion must honour, runnable on your own criterion.

The registry tests run it over every registered criterion; run it on yours before a sweep:

    import saliency
    saliency.check_criterion(MyCriterion())        # or a registered name, or the class

It scores a tiny MLP and a tiny CNN (with BatchNorm) from three starting states (eval mode and
no gradients; train mode with stale gradients; mixed modes with a frozen parameter) and raises
`CriterionContractError` listing every broken rule:
- scores: one float tensor per given parameter, same shape, finite, the same on a second call;
- the model is left as found: weights and buffers (BatchNorm statistics), every module's
  training mode, each parameter's `.grad` (None stays None) and `requires_grad`, and hooks;
- no global state changes: autograd enabled or not, torch's global random generator.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from saliency.criteria import get_criterion
from saliency.model_io import Batch, forward


class CriterionContractError(AssertionError):
    """A criterion broke the contract; the message lists each broken rule."""


class _TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def _cases() -> list[tuple[str, nn.Module, list]]:
    """(name, model, batches): float32 models seeded without touching the global generator."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        mlp = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
        cnn = _TinyCNN()
    g = torch.Generator().manual_seed(1)
    mlp_data = [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g))] * 2
    cnn_data = [
        (torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g))
        for _ in range(2)
    ]
    with torch.no_grad():  # BatchNorm statistics away from their defaults: a reset shows
        cnn.bn.running_mean.uniform_(-1, 1, generator=g)
        cnn.bn.running_var.uniform_(0.5, 2, generator=g)
    return [("mlp", mlp, mlp_data), ("cnn", cnn, cnn_data)]


def _start(model: nn.Module, data: list, how: str) -> None:
    """Put `model` in one of the starting states a criterion must give back."""
    if how == "eval, no .grad":
        model.eval()
    elif how == "train, stale .grad":
        model.train()
        forward(model, Batch.of(data[0])).sum().backward()  # the user's own training step
    elif how == "mixed modes, a frozen bias":
        model.eval()
        next(m for m in model.modules() if isinstance(m, nn.Linear)).train()
        last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        last.bias.requires_grad_(False)


def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "weights and buffers": {k: v.clone() for k, v in model.state_dict().items()},
        "training modes": {n: m.training for n, m in model.named_modules()},
        ".grad": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "parameter objects": {n: id(p) for n, p in model.named_parameters()},
        "hooks": {
            n: tuple(
                len(getattr(m, a, {}))
                for a in (
                    "_forward_hooks",
                    "_forward_pre_hooks",
                    "_backward_hooks",
                    "_backward_pre_hooks",
                )
            )
            for n, m in model.named_modules()
        },
        "autograd enabled": torch.is_grad_enabled(),
        "torch's global random generator": torch.random.get_rng_state(),
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _changed(before: dict, after: dict) -> list[str]:
    out = []
    for what, old in before.items():
        new = after[what]
        if isinstance(old, dict):
            bad = [k for k in old if k not in new or not _same(old[k], new[k])]
            if bad:
                out.append(f"changed the model's {what} ({', '.join(map(str, bad[:4]))})")
        elif not _same(old, new):
            out.append(f"changed {what}")
    return out


def _check_scores(s1, s2, params: dict) -> list[str]:
    out = []
    if not hasattr(s1, "keys") or set(s1.keys()) != set(params):
        got = sorted(s1.keys()) if hasattr(s1, "keys") else type(s1).__name__
        return [f"scores must have one entry per parameter {sorted(params)}; got {got}"]
    for n, p in params.items():
        t = s1[n]
        if not isinstance(t, torch.Tensor) or t.shape != p.shape:
            out.append(f"scores[{n!r}] must be a tensor shaped {tuple(p.shape)}")
        elif not t.is_floating_point():
            out.append(f"scores[{n!r}] must be floating point; got {t.dtype}")
        elif not torch.isfinite(t).all():
            out.append(f"scores[{n!r}] has non-finite entries")
        elif not torch.equal(t, s2[n]):
            out.append(f"scores[{n!r}] differ between two calls on the same input")
    return out


def check_criterion(
    criterion: Any, *, models: tuple[str, ...] = ("mlp", "cnn"), **hparams: Any
) -> None:
    """Check the criterion contract (see the module docstring) on a criterion instance, class or
    registered name (with `hparams`), on the tiny `models` ("mlp": Linear layers only; "cnn":
    Conv2d, BatchNorm2d, Linear). Returns None; raises `CriterionContractError` naming every
    rule broken, with the model and starting state where it broke."""
    if isinstance(criterion, type):
        criterion = criterion(**hparams)
        hparams = {}
    crit = get_criterion(criterion, **hparams)
    name = getattr(crit, "name", type(crit).__name__)
    problems: list[str] = []
    unknown = set(models) - {"mlp", "cnn"}
    if unknown or not models:
        raise ValueError(f"models must be a non-empty subset of ('mlp', 'cnn'); got {models!r}")
    if "element" not in getattr(crit, "granularities", ("element",)):
        _check_refuses_elements(crit, name)
        return
    for model_name, model0, data in _cases():
        if model_name not in models:
            continue
        for how in ("eval, no .grad", "train, stale .grad", "mixed modes, a frozen bias"):
            model = copy.deepcopy(model0)
            _start(model, data, how)
            params = {
                n: p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1
            }
            before = _snapshot(model)
            where = f"{model_name} model, {how}"
            try:
                s1 = crit.score(model, params, data, nn.functional.cross_entropy)
                s2 = crit.score(model, params, data, nn.functional.cross_entropy)
            except Exception as err:
                problems.append(f"{where}: score() raised {type(err).__name__}: {err}")
                continue
            found = _changed(before, _snapshot(model)) + _check_scores(s1, s2, params)
            problems += [f"{where}: {p}" for p in found]
    if problems:
        raise CriterionContractError(
            f"criterion {name!r} breaks the contract:\n  " + "\n  ".join(problems)
        )


def _check_refuses_elements(crit, name: str) -> None:
    """A criterion that scores only whole structures (``granularities`` without "element", e.g.
    Block Influence: blocks) must refuse element scores with a ValueError that names them."""
    _, model, data = _cases()[0]
    params = {n: p for n, p in model.named_parameters() if n.endswith("weight")}
    try:
        crit.score(model, params, data, nn.functional.cross_entropy)
    except ValueError as e:
        if not any(g in str(e) for g in crit.granularities):
            raise CriterionContractError(f"{name}: its refusal must name its granularities "
                                         f"{crit.granularities}; got {e}") from e  # fmt: skip
        return
    raise CriterionContractError(f"{name}: granularities {crit.granularities} exclude "
                                 "'element', so score() must raise a ValueError naming them")  # fmt: skip
