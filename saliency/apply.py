"""Keep masks in force through training; bake them in; trade them with `torch.nn.utils.prune`.

Mechanism (chosen by measurement, see benchmarks/bench_masking.py): the weights themselves are
zeroed in place, and stay zero because
- a post-accumulate-grad hook on each masked parameter zeros the pruned entries of `.grad`, so
  SGD (with momentum and weight decay), Adam and AdamW all see zero gradients and, starting from
  zero weights and zero optimizer state for those entries, never move them;
- a forward pre-hook re-zeros pruned weights before every forward: one in-place multiply, which
  also covers optimizer state that predates `attach` (pass `optimizer=` to clear that state too).
Unlike a parametrization or `torch.nn.utils.prune`'s `weight_orig * weight_mask`, the forward
uses the plain weight tensor (no extra multiply in the autograd graph, no extra parameter copy),
and `state_dict` keys never change. The mask lives in a non-persistent buffer, so it follows
`model.to(...)`, deepcopy and pickle; the gradient hooks, which deepcopy drops, are re-created by
the forward pre-hook on first use.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import prune as torch_prune

from saliency.masks import Masks

_BUFFER_SUFFIX = "_saliency_mask"


def _split(name: str) -> tuple[str, str]:
    mod, _, attr = name.rpartition(".")
    return mod, attr


class _MaskEnforcer:
    """Forward pre-hook of one module: re-zero its masked parameters and own their grad hooks."""

    def __init__(self, attrs: list[str]):
        self.attrs = attrs
        self._grad_hooks: dict[str, tuple[nn.Parameter, object]] = {}

    def __getstate__(self):  # hook handles are per process and per tensor: never copied
        return {"attrs": list(self.attrs)}

    def __setstate__(self, state):
        self.attrs = state["attrs"]
        self._grad_hooks = {}

    def __call__(self, module: nn.Module, args) -> None:
        # runs before every forward: plain dict look-ups instead of Module.__getattr__
        for attr in self.attrs:
            p = module._parameters.get(attr)
            # under torch.func.functional_call the parameter is a swapped-in tensor: leave it alone
            if not isinstance(p, nn.Parameter):
                continue
            p.detach().mul_(module._buffers[attr + _BUFFER_SUFFIX])
            held = self._grad_hooks.get(attr)
            if held is None or held[0] is not p:
                self.ensure_grad_hook(module, attr)

    def ensure_grad_hook(self, module: nn.Module, attr: str) -> None:
        p = module._parameters[attr]
        held = self._grad_hooks.get(attr)
        if held is not None:
            held[1].remove()
        buffers, key = module._buffers, attr + _BUFFER_SUFFIX

        def zero_pruned_grad(param: Tensor) -> None:
            if param.grad is not None:
                param.grad.mul_(buffers[key])

        self._grad_hooks[attr] = (p, p.register_post_accumulate_grad_hook(zero_pruned_grad))

    def remove_grad_hooks(self) -> None:
        for _, handle in self._grad_hooks.values():
            handle.remove()
        self._grad_hooks = {}


def _enforcer(module: nn.Module) -> tuple[int, _MaskEnforcer] | None:
    for key, hook in module._forward_pre_hooks.items():
        if isinstance(hook, _MaskEnforcer):
            return key, hook
    return None


def attach(
    model: nn.Module, masks: Masks, *, optimizer: torch.optim.Optimizer | None = None
) -> nn.Module:
    """Zero the pruned weights and keep them exactly zero through any training loop.

    Attaching again replaces the masks. With `optimizer`, its per-parameter state (momentum,
    Adam moments) is zeroed at the pruned entries, so no stale state pushes them back.
    Returns `model` for chaining.
    """
    if not isinstance(masks, Masks):
        masks = Masks(masks)
    params = dict(model.named_parameters())
    masks.check_compatible(params)
    remove(model, bake=False)
    by_module: dict[str, list[str]] = {}
    for name in masks:
        mod, attr = _split(name)
        by_module.setdefault(mod, []).append(attr)
    for mod_name, attrs in by_module.items():
        module = model.get_submodule(mod_name)
        for attr in attrs:
            p = getattr(module, attr)
            keep = masks[f"{mod_name}.{attr}" if mod_name else attr]
            # stored as 0/1 in the weight's dtype: multiplying by a float mask is ~10x faster
            # than by a bool one, and the buffer follows model.to(dtype)
            module.register_buffer(
                attr + _BUFFER_SUFFIX, keep.to(p.device, p.dtype), persistent=False
            )
        hook = _MaskEnforcer(attrs)
        module.register_forward_pre_hook(hook)
        hook(module, ())
    if optimizer is not None:
        clear_optimizer_state(optimizer, model, masks)
    return model


@torch.no_grad()
def clear_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, masks: Masks) -> None:
    """Zero every state tensor shaped like a masked parameter at its pruned entries."""
    params = dict(model.named_parameters())
    for name, keep in masks.items():
        for value in optimizer.state.get(params[name], {}).values():
            if isinstance(value, Tensor) and value.shape == keep.shape:
                value.mul_(keep.to(value.device, value.dtype))


def attached_masks(model: nn.Module) -> Masks | None:
    """The masks `attach` keeps in force on `model`, or None."""
    found = {}
    for mod_name, module in model.named_modules():
        held = _enforcer(module)
        if held:
            for attr in held[1].attrs:
                found[f"{mod_name}.{attr}" if mod_name else attr] = (
                    getattr(module, attr + _BUFFER_SUFFIX) != 0
                )
    return Masks(found) if found else None


def remove(model: nn.Module, *, bake: bool = True) -> nn.Module:
    """Detach masks: with `bake`, zero pruned weights a last time, then drop hooks and buffers.

    Leaves a plain model whose `state_dict` loads into an unpruned copy. No-op if nothing is attached.
    """
    for module in model.modules():
        held = _enforcer(module)
        if held is None:
            continue
        key, hook = held
        for attr in hook.attrs:
            mask = getattr(module, attr + _BUFFER_SUFFIX)
            if bake:
                with torch.no_grad():
                    getattr(module, attr).mul_(mask)
            delattr(module, attr + _BUFFER_SUFFIX)
        hook.remove_grad_hooks()
        del module._forward_pre_hooks[key]
    return model


def to_torch_prune(model: nn.Module, masks: Masks) -> nn.Module:
    """Export: put `masks` on `model` through `torch.nn.utils.prune.custom_from_mask`
    (creates `<name>_orig` parameters and `<name>_mask` buffers, as torch's pruning does)."""
    masks.check_compatible(dict(model.named_parameters()))
    remove(model, bake=True)
    for name, keep in masks.items():
        mod, attr = _split(name)
        torch_prune.custom_from_mask(model.get_submodule(mod), attr, keep.to(dtype=torch.float32))
    return model


def from_torch_prune(model: nn.Module) -> Masks:
    """Import: masks from the `<name>_mask` buffers of a model pruned with `torch.nn.utils.prune`,
    keyed by the parameter's plain name ("fc1.weight", not "fc1.weight_orig")."""
    found = {}
    for mod_name, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, torch_prune.BasePruningMethod):
                attr = hook._tensor_name
                found[f"{mod_name}.{attr}" if mod_name else attr] = (
                    getattr(module, attr + "_mask") != 0
                )
    if not found:
        raise ValueError("the model has no torch.nn.utils.prune masks (no '<name>_mask' buffers)")
    return Masks(found)
