"""Keep masks in force through training; bake them in; trade them with `torch.nn.utils.prune`.

Mechanism (chosen by measurement, see benchmarks/bench_masking.py): the weights themselves are
zeroed in place, and stay zero because
- a post-accumulate-grad hook on each masked parameter zeros the pruned entries of `.grad`, so
  SGD (with momentum and weight decay), Adam and AdamW see zero gradients there;
- an optimizer step post-hook (`torch.optim.optimizer.register_optimizer_step_post_hook`,
  registered while any parameter is masked and removed with the last one) re-zeros the pruned
  entries of the masked parameters an optimizer just stepped, so optimizer state that predates
  `attach` (momentum, Adam moments) cannot move them either, even between steps;
- a forward pre-hook re-zeros pruned weights before a forward when the weight was written since
  it was last zeroed (its autograd version counter moved: `load_state_dict`, a manual in-place
  edit). Skipping the multiply otherwise keeps a weight used twice before one `backward()`
  (two views through one encoder, a module called in a loop) valid for autograd. The same check
  runs before the forward of the model given to `attach` (for weights whose module is never
  called: `MultiheadAttention.out_proj`, TransformerEncoderLayer's fused inference path) and
  before the forward of every other module holding a tied weight (`head.weight = emb.weight`).
Masks are keyed by canonical name (`model.named_parameters()`): a tied tensor has one mask, held
by the module of its canonical name, and every module using the tensor sees its zeros.
Unlike a parametrization or `torch.nn.utils.prune`'s `weight_orig * weight_mask`, the forward
uses the plain weight tensor (no extra multiply in the autograd graph, no extra parameter copy),
and `state_dict` keys never change. The mask lives in a non-persistent buffer, so it follows
`model.to(...)`, deepcopy and pickle; the per-tensor hooks, which deepcopy drops, are re-created
by the forward pre-hook on first use. Writes through `param.data` bypass the version counter:
call `attach` again (or `Masks.apply`) after them. `optimizer=` also zeros stale optimizer state.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn
from torch.nn.utils import prune as torch_prune
from torch.optim.optimizer import register_optimizer_step_post_hook

from saliency.masks import Masks
from saliency.targets import parameter_aliases, parameter_uses

_BUFFER_SUFFIX = "_saliency_mask"


def _split(name: str) -> tuple[str, str]:
    mod, _, attr = name.rpartition(".")
    return mod, attr


class _Enforced:
    """Where a masked parameter's mask lives (module held weakly) and the weight version last zeroed."""

    __slots__ = ("module", "key", "version")

    def __init__(self, module: nn.Module, key: str):
        self.module = weakref.ref(module)
        self.key = key
        self.version = -1

    def zero(self, p: Tensor) -> None:
        module = self.module()
        mask = None if module is None else module._buffers.get(self.key)
        if mask is not None:
            p.detach().mul_(mask)  # detach shares the version counter: the write is seen
            self.version = p._version


# every masked parameter of every attached model, by id (tensors compare elementwise, so no
# WeakKeyDictionary): id -> (weak reference to the tensor, entry); dead tensors drop out
_ENFORCED: dict[int, tuple[weakref.ref, _Enforced]] = {}
_step_hook: list = []  # the handle of the optimizer step post-hook, while one is registered


def _after_optimizer_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    if not _ENFORCED:
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            held = _ENFORCED.get(id(p))
            if held is not None and held[0]() is p:
                held[1].zero(p)


def _track(p: Tensor, entry: _Enforced) -> None:
    key = id(p)
    _ENFORCED[key] = (weakref.ref(p, lambda _, key=key: _forget(key)), entry)
    if not _step_hook:
        _step_hook.append(register_optimizer_step_post_hook(_after_optimizer_step))


def _forget(key: int) -> None:
    _ENFORCED.pop(key, None)
    if not _ENFORCED and _step_hook:
        _step_hook.pop().remove()


def _untrack(p: Tensor, entry: _Enforced) -> None:
    held = _ENFORCED.get(id(p))
    if held is not None and held[1] is entry:
        _forget(id(p))


class _MaskEnforcer:
    """Forward pre-hook of one module: re-zero its masked parameters and own their per-tensor hooks."""

    def __init__(self, attrs: list[str]):
        self.attrs = attrs
        self._held: dict[str, tuple[nn.Parameter, object, _Enforced]] = {}

    def __getstate__(self):  # hook handles are per process and per tensor: never copied
        return {"attrs": list(self.attrs)}

    def __setstate__(self, state):
        self.attrs = state["attrs"]
        self._held = {}

    def __call__(self, module: nn.Module, args) -> None:
        # runs before every forward: plain dict look-ups instead of Module.__getattr__
        for attr in self.attrs:
            p = module._parameters.get(attr)
            # under torch.func.functional_call the parameter is a swapped-in tensor: leave it alone
            if not isinstance(p, nn.Parameter):
                continue
            held = self._held.get(attr)
            # a frozen parameter gets its gradient hook once it is unfrozen
            if held is None or held[0] is not p or (held[1] is None and p.requires_grad):
                held = self.hold(module, attr)
            entry = held[2]
            if p._version != entry.version:
                entry.zero(p)

    def hold(self, module: nn.Module, attr: str) -> tuple[nn.Parameter, object, _Enforced]:
        """Hook the current tensor of `module.<attr>`: zero its pruned grads, re-zero after steps."""
        self.release(attr)
        p = module._parameters[attr]
        buffers, key = module._buffers, attr + _BUFFER_SUFFIX

        def zero_pruned_grad(param: Tensor) -> None:
            if param.grad is not None:
                param.grad.mul_(buffers[key])

        entry = _Enforced(module, key)
        _track(p, entry)
        # torch refuses gradient hooks on tensors that do not require grad (frozen layers)
        grad_hook = (
            p.register_post_accumulate_grad_hook(zero_pruned_grad) if p.requires_grad else None
        )
        self._held[attr] = (p, grad_hook, entry)
        return self._held[attr]

    def release(self, attr: str) -> None:
        held = self._held.pop(attr, None)
        if held is not None:
            if held[1] is not None:
                held[1].remove()
            _untrack(held[0], held[2])

    def release_all(self) -> None:
        for attr in list(self._held):
            self.release(attr)


def _enforcer(module: nn.Module) -> tuple[int, _MaskEnforcer] | None:
    for key, hook in module._forward_pre_hooks.items():
        if isinstance(hook, _MaskEnforcer):
            return key, hook
    return None


class _Rezero:
    """Forward pre-hook running other modules' enforcers: on the attached model (its masked weights
    may be used without their module's forward running) and on modules holding a tied weight under
    a non-canonical name. Holds the modules strongly: deepcopy and pickle map them to the copies."""

    def __init__(self, owners: list[nn.Module]):
        self.owners = owners

    def __call__(self, module: nn.Module, args) -> None:
        for owner in self.owners:
            held = _enforcer(owner)
            if held is not None:
                held[1](owner, ())


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
    masks.check_compatible(params, aliases=parameter_aliases(model))
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
    owners = [model.get_submodule(m) for m in by_module]
    model.register_forward_pre_hook(_Rezero(owners))
    # modules that use a tied weight under another name re-zero it before their own forward too
    uses = parameter_uses(model)
    aliased: dict[int, tuple[nn.Module, list[nn.Module]]] = {}
    for name in masks:
        owner = model.get_submodule(_split(name)[0])
        for _, module, _ in uses[id(params[name])]:
            if module is not owner and module is not model:
                entry = aliased.setdefault(id(module), (module, []))
                if all(o is not owner for o in entry[1]):
                    entry[1].append(owner)
    for module, tied_owners in aliased.values():
        module.register_forward_pre_hook(_Rezero(tied_owners))
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
        for key in [k for k, h in module._forward_pre_hooks.items() if isinstance(h, _Rezero)]:
            del module._forward_pre_hooks[key]
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
        hook.release_all()
        del module._forward_pre_hooks[key]
    return model


def to_torch_prune(model: nn.Module, masks: Masks) -> nn.Module:
    """Export: put `masks` on `model` through `torch.nn.utils.prune.custom_from_mask`
    (creates `<name>_orig` parameters and `<name>_mask` buffers, as torch's pruning does).

    A tied weight is masked in every module that holds it (each computes its own
    `weight = weight_orig * weight_mask` from the one shared `weight_orig`), so every use sees
    the zeros."""
    params = dict(model.named_parameters())
    masks.check_compatible(params, aliases=parameter_aliases(model))
    uses = parameter_uses(model)
    remove(model, bake=True)
    for name, keep in masks.items():
        done: set[tuple[int, str]] = set()
        for _, module, attr in uses[id(params[name])]:
            if (id(module), attr) not in done:  # a module registered twice is masked once
                done.add((id(module), attr))
                torch_prune.custom_from_mask(module, attr, keep.to(dtype=torch.float32))
    return model


def from_torch_prune(model: nn.Module) -> Masks:
    """Import: masks from the `<name>_mask` buffers of a model pruned with `torch.nn.utils.prune`,
    keyed by the parameter's plain canonical name ("fc1.weight", not "fc1.weight_orig"; a tied
    weight under the canonical name of its shared `<name>_orig`)."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    found = {}
    for mod_name, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, torch_prune.BasePruningMethod):
                attr = hook._tensor_name
                orig = canonical.get(id(module._parameters.get(attr + "_orig")))
                name = orig.removesuffix("_orig") if orig else f"{mod_name}.{attr}".lstrip(".")
                found.setdefault(name, getattr(module, attr + "_mask") != 0)
    if not found:
        raise ValueError("the model has no torch.nn.utils.prune masks (no '<name>_mask' buffers)")
    return Masks(found)
