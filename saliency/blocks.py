"""Block-by-block propagation for the layer-wise solvers: the block stage of DESIGN.md.

A transformer is a stack of repeated blocks (``model.layers``, ``model.model.layers``,
``transformer.h``, ``encoder.layer``: any ``nn.ModuleList`` of >= 2 distinct modules of one
class holding targets, or the module names given as ``blocks=``). The inputs of block 0 (its
positional arguments and keyword arguments: attention mask, position ids or embeddings, the
cache switched off) are caught once per calibration batch; then for each block, for each group
of its layers, the block runs on the cached inputs with capture hooks (cut short after the
group), the group is solved and written, and the pruned block runs once more: its outputs are
the next block's inputs. Each step repeats exactly what the prefix path (``layerwise``) computes
for the same batch, so the results are the same bit for bit.

Cost: one prefix forward (up to block 0) plus about ``groups + 1`` forwards of each block
(``forwards["block"]`` counts block calls, one per calibration batch), instead of a prefix
forward per group (~2B^2 block forwards for B blocks). Memory: one block's inputs and outputs
for the whole calibration set, e.g. 7B (hidden 4096, float16) at 128 x 2048 tokens:
128 * 2048 * 4096 * 2 B = 2 GiB per copy, 4 GiB for inputs and outputs, plus the shared
keyword arguments. With ``offload=True`` (or ``device=``) only the current block sits on the
compute device (the modules before block 0 join it for the catch); the probe forward (one
sample) and targets after the blocks (a head, on the prefix path) run where the model lives.
With ``checkpoint_dir`` each finished block is saved (its solved weights and masks, then the
next block's inputs, each file written to a temporary name and renamed) so that a killed run
resumes from the last finished block, bit for bit; a directory of another run is refused.

The chain is checked on the probe forward, never assumed: every block called once, in order,
fed the previous block's output and block 0's other arguments (the same objects), no target
outside the blocks running between them. Otherwise the prefix path runs (or, if ``blocks=``,
``offload``, ``device`` or ``checkpoint_dir`` asked for the block stage, a ValueError says why).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

# keyword arguments of a block that carry a key/value cache: off while blocks are re-run
_CACHE_KEYS = ("cache", "past_key_values", "past_key_value", "layer_past")


@dataclass(frozen=True)
class Cached:
    """One calibration batch's inputs to the current block; ``call`` runs a block on them (what
    ``capture.capturing``'s ``run`` expects of a batch)."""

    args: tuple
    kwargs: dict
    token_mask: Tensor | None

    def call(self, block: nn.Module):
        return block(*self.args, **self.kwargs)

    def next(self, out) -> Cached:
        """The next block's inputs: this block's output (a tensor, or a tuple's first element)."""
        hidden = out if isinstance(out, Tensor) else out[0]
        return replace(self, args=(hidden, *self.args[1:]))


@dataclass
class Plan:
    """Where the groups of layers run: before the blocks (prefix path), in block i, after."""

    names: list[str]
    blocks: list[nn.Module]
    pre: list[list[str]]
    per_block: list[list[list[str]]]
    post: list[list[str]]


class _Stop(Exception):
    """Raised by block 0's pre-hook once its inputs are caught (the rest of the forward is not
    needed)."""


def candidates(model: nn.Module, modules: dict[str, nn.Module], names: Sequence[str] | None):
    """``[(name, block)]``: the given ``names``, else the outermost ModuleList of >= 2 distinct
    modules of one class that holds targets (None when there is none, or several, or
    ``names is False``: the prefix path asked for)."""
    if names is False:
        return None
    if isinstance(names, (str, bool)):
        raise ValueError(f"blocks= takes a list of module names, or False; got {names!r}")
    if names is not None:
        known = dict(model.named_modules())
        bad = [n for n in names if n not in known]
        if bad or len(names) < 1:
            raise ValueError(f"blocks= names unknown modules {bad}; give module names such as "
                             f"{[n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)][:3]}")  # fmt: skip
        return [(n, known[n]) for n in names]
    targets = {id(m) for m in modules.values()}
    found = []
    for name, m in model.named_modules():
        kids = list(m) if isinstance(m, nn.ModuleList) else []
        if (
            len(kids) < 2
            or len({type(k) for k in kids}) != 1
            or len({id(k) for k in kids}) < len(kids)
        ):
            continue
        if any(id(x) in targets for k in kids for x in k.modules()):
            if not any(name.startswith(f"{o}.") for o, _ in found):
                found.append((name, m))
    if len(found) != 1:
        return None
    return [(f"{found[0][0]}.{i}", k) for i, k in enumerate(found[0][1])]


@contextlib.contextmanager
def watching(blocks, modules: dict[str, nn.Module]):
    """Records one forward's events: ("layer", name), ("block", i, fed, args[1:], kwargs) with
    ``fed``: its first argument is the previous block's output, ("end", i). Only the latest
    block output is held (a model's worth of activations would not fit at LLM scale)."""
    events: list[tuple] = []
    last: list = [None]

    def pre(_m, a, k, i):
        fed = bool(a) and last[0] is not None and a[0] is last[0]
        events.append(("block", i, fed, tuple(a[1:]), k))

    def end(_m, a, out, i):
        last[0] = out if isinstance(out, Tensor) else out[0]
        events.append(("end", i))

    hs = [m.register_forward_pre_hook(lambda _m, a, n=n: events.append(("layer", n)))
          for n, m in modules.items()]  # fmt: skip
    for i, (_, b) in enumerate(blocks or []):
        hs.append(
            b.register_forward_pre_hook(lambda m, a, k, i=i: pre(m, a, k, i), with_kwargs=True)
        )
        hs.append(b.register_forward_hook(lambda m, a, o, i=i: end(m, a, o, i)))
    try:
        yield events
    finally:
        last[0] = None
        for h in hs:
            h.remove()


def plan(blocks, events, groups: list[list[str]], modules) -> tuple[Plan | None, str]:
    """(the block plan, "") if the probe forward shows a chain: every block called once, in
    order, each fed the previous one's output and block 0's other arguments, every target of
    a block inside it, none outside the blocks running between them; else (None, why)."""
    if not blocks:
        return None, "no block structure was found (pass blocks=[module names])"
    calls = [e for e in events if e[0] == "block"]
    if [e[1] for e in calls] != list(range(len(blocks))):
        return None, "the blocks are not each called once, in order"
    _, _, _, args0, kw0 = calls[0]
    for _, i, fed, args, kw in calls[1:]:
        same = len(args) == len(args0) and all(x is y for x, y in zip(args, args0, strict=True))
        same = same and kw.keys() == kw0.keys() and all(kw[n] is kw0[n] for n in kw)
        if not fed or not same:
            return None, f"block {i} is not fed block {i - 1}'s output and block 0's arguments"
    where, inside, pos = {}, -1, "pre"
    for e in events:
        if e[0] == "block":
            inside = e[1]
        elif e[0] == "end":
            inside, pos = -1, "post" if e[1] == len(blocks) - 1 else "between"
        elif e[1] not in where:
            where[e[1]] = inside if inside >= 0 else pos
    pre, post, per = [], [], [[] for _ in blocks]
    for g in groups:
        kinds = {where[n] for n in g}
        k = kinds.pop() if len(kinds) == 1 else "between"
        mine = isinstance(k, int) and all(
            any(m is modules[n] for m in blocks[k][1].modules()) for n in g
        )
        if k == "between" or (isinstance(k, int) and not mine):
            return None, f"layers {g} run between or across blocks"
        (pre if k == "pre" else post if k == "post" else per[k]).append(g)
    return Plan([n for n, _ in blocks], [b for _, b in blocks], pre, per, post), ""


def _is_cache(v) -> bool:
    """A transformers key/value cache (it would grow each time a block is re-run)."""
    return hasattr(v, "get_seq_length") and hasattr(v, "update")


def catch(model, block0: nn.Module, batches) -> list[Cached]:
    """Block 0's inputs for every batch, one prefix forward each, the cache switched off."""
    out: list[Cached] = []

    def hook(_m, args, kwargs):
        kwargs = {k: (None if k in _CACHE_KEYS or _is_cache(v) else False if k == "use_cache"
                      else v) for k, v in kwargs.items()}  # fmt: skip
        args = tuple(None if _is_cache(a) else a for a in args)  # GPT-2 passes it by position
        out.append(Cached(args, kwargs, None))
        raise _Stop

    h = block0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i, b in enumerate(batches):
            with contextlib.suppress(_Stop), torch.no_grad():
                b.call(model)
            if len(out) != i + 1:
                raise ValueError(f"block 0 did not run on calibration batch {i}")
            out[-1] = replace(out[-1], token_mask=b.token_mask)
    finally:
        h.remove()
    return out


def move(module: nn.Module, device: torch.device) -> None:
    """Puts a block on ``device`` (one place, so that tests can watch the moves)."""
    module.to(device)


def move_outside(model: nn.Module, blocks: list[nn.Module], device: torch.device) -> None:
    """Every parameter and buffer of ``model`` not in a block onto ``device``."""
    inside = {id(t) for b in blocks for t in (*b.parameters(), *b.buffers())}
    with torch.no_grad():
        for m in model.modules():
            for p in m._parameters.values():
                if p is not None and id(p) not in inside:
                    p.data = p.data.to(device)
            for k, t in m._buffers.items():
                if t is not None and id(t) not in inside:
                    m._buffers[k] = t.to(device)


def propagate(
    model,
    plan: Plan,
    batches,
    do_group,
    restore,
    *,
    home,
    compute,
    offload: bool,
    store: Store | None,
    counts: dict[str, int],
) -> None:
    """The block loop (module docstring). ``do_group(group, module, inputs)`` captures, solves
    and writes one group, running ``module`` on each of ``inputs`` (Batches or ``Cached``), and
    returns what it wrote ``{target: (weight, mask)}``; ``restore(written)`` writes it back
    from a checkpoint. The groups after the blocks are left to the caller."""
    state = None if store is None else store.load_state(compute)
    if state is None:
        written = {}
        for g in plan.pre:  # before block 0: the prefix path, on the model's own device
            written |= do_group(g, model, batches)
            counts["prefix"] += len(batches)
        if store is not None:
            store.save_stage("prefix", written)
        cached = _catch_on(model, plan, batches, home, compute, offload)
        counts["prefix"] += len(batches)
        start = 0
    else:
        start, cached = state
        for name in ["prefix", *(f"block_{i}" for i in range(start))]:
            restore(store.load_stage(name))
    for i in range(start, len(plan.blocks)):
        block = plan.blocks[i]
        if offload:
            move(block, compute)
        written = {}
        for g in plan.per_block[i]:
            written |= do_group(g, block, cached)
            counts["block"] += len(cached)
        with torch.no_grad():
            cached = [c.next(c.call(block)) for c in cached]
        counts["block"] += len(cached)
        if offload:
            move(block, home)
        if store is not None:
            store.save_stage(f"block_{i}", written)
            store.save_state(i + 1, cached)


def _catch_on(model, plan: Plan, batches, home, compute, offload: bool) -> list[Cached]:
    if not offload:
        return catch(model, plan.blocks[0], batches)
    move_outside(model, plan.blocks, compute)
    try:
        return catch(model, plan.blocks[0], [b.to(compute) for b in batches])
    finally:
        move_outside(model, plan.blocks, home)


# ----------------------------------------------------------------------------- resume


class Store:
    """The checkpoint directory of a block run: ``key.pt`` (what run this is), ``prefix.pt`` and
    ``block_<i>.pt`` ({target: (weight, mask)} written in that stage), ``state.pt`` (blocks
    done, the next block's inputs), each written to a temporary file and renamed into place."""

    def __init__(self, path, key: dict[str, Any]) -> None:
        self.dir, self.key = Path(path), key
        self.dir.mkdir(parents=True, exist_ok=True)
        old = self._load("key.pt")
        if old is not None and old != key:
            diff = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
            raise ValueError(f"checkpoint_dir {str(self.dir)!r} holds another run (differs in "
                             f"{diff}): give a fresh directory, or the same arguments to resume")  # fmt: skip
        if old is None:
            self._save("key.pt", key)

    def _save(self, name: str, obj) -> None:
        tmp = self.dir / f"{name}.{os.getpid()}.tmp"
        try:
            torch.save(obj, tmp)
            os.replace(tmp, self.dir / name)
        finally:
            tmp.unlink(missing_ok=True)

    def _load(self, name: str, device=None):
        path = self.dir / name
        if not path.is_file():
            return None
        return torch.load(path, map_location=device, weights_only=True)

    def save_stage(self, name: str, written: dict[str, tuple[Tensor, Tensor]]) -> None:
        self._save(f"{name}.pt", {n: (w.cpu(), k.cpu()) for n, (w, k) in written.items()})

    def load_stage(self, name: str) -> dict[str, tuple[Tensor, Tensor]]:
        return self._load(f"{name}.pt")

    def save_state(self, done: int, inputs: list[Cached]) -> None:
        self._save("state.pt", {"done": done, "inputs": [(c.args, c.kwargs, c.token_mask)
                                                         for c in inputs]})  # fmt: skip

    def load_state(self, device) -> tuple[int, list[Cached]] | None:
        s = self._load("state.pt", device)
        return None if s is None else (s["done"], [Cached(*c) for c in s["inputs"]])
