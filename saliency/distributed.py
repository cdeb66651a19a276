"""Data-parallel scoring on ``torch.distributed``: the one place where ranks talk to each other.

When a default process group with more than one rank is initialized (``torchrun``,
``torch.distributed.init_process_group``), every estimator sums its per-sample statistics and
sample counts across ranks at the point where it sums them over its own batches, so scores,
masks and OBS-updated weights are the same on every rank and equal, up to rounding, to one
process reading every rank's batches. Sums of per-sample quantities and counts (never means
of per-rank means) make unequal shards weigh by their sample counts.

- ``local()`` (or ``saliency.score/prune(..., distributed=False)``) turns it off: each rank
  then scores its own data alone, as before.
- Only ``torch.distributed`` collectives are used (gloo on CPU tensors, NCCL on CUDA tensors).
- Every rank must enter every collective in the same order. Estimators reduce once, after their
  loops over batches, so shards may hold different numbers of batches; a rank with no samples
  is refused on every rank at once (``check_nonempty``), never left waiting.
- ``n_samples`` / ``n_batches`` limits apply per rank (each reads up to that many of its shard).
- Random estimators (true Fisher labels, Monte Carlo GGN, Hutchinson probes) draw from
  ``rank_seed(seed)``: rank 0 keeps ``seed``, other ranks get independent streams. The combined
  estimate is the same unbiased estimator as one process's, equal in distribution, not draw for
  draw (one process cannot know which global sample a rank's batch holds).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

_ENABLED: ContextVar[bool] = ContextVar("saliency_distributed", default=True)
_TRAFFIC: ContextVar[Traffic | None] = ContextVar("saliency_traffic", default=None)


@dataclass
class Traffic:
    """Bytes this rank handed to collectives, and how many calls (``count_traffic``)."""

    bytes: int = 0
    calls: int = 0


def group_size() -> int:
    """World size of the initialized default group, whatever ``local()`` says (1 if none)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def world() -> tuple[int, int] | None:
    """``(rank, world size)`` when statistics are combined across ranks, else None (no group,
    a group of one, or inside ``local()``)."""
    if not _ENABLED.get() or group_size() < 2:
        return None
    return dist.get_rank(), dist.get_world_size()


@contextlib.contextmanager
def enabled(on: bool | None = True) -> Iterator[None]:
    """Combine across ranks (``on``) or score each rank's data alone, within the block
    (None: as the enclosing block says; on by default)."""
    if on is None:
        yield
        return
    if not isinstance(on, bool):
        raise TypeError(f"distributed must be True, False or None; got {on!r}")
    token = _ENABLED.set(on)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def local() -> contextlib.AbstractContextManager[None]:
    """Each rank on its own data within the block (``enabled(False)``)."""
    return enabled(False)


@contextlib.contextmanager
def count_traffic() -> Iterator[Traffic]:
    """Count the bytes this rank passes to collectives within the block (benchmarks)."""
    t = Traffic()
    token = _TRAFFIC.set(t)
    try:
        yield t
    finally:
        _TRAFFIC.reset(token)


# ----------------------------------------------------------------------------- primitives


def _wire(t: Tensor) -> Tensor:
    """A contiguous copy of ``t`` on a device the backend accepts (NCCL: the current CUDA
    device; gloo: the CPU), counted in the traffic; bool travels as uint8."""
    dev = torch.device("cuda", torch.cuda.current_device()) if _nccl() else torch.device("cpu")
    out = t.detach().to(device=dev, dtype=torch.uint8 if t.dtype == torch.bool else t.dtype)
    same = out.data_ptr() == t.data_ptr()  # never reduce into the caller's tensor
    out = out.clone(memory_format=torch.contiguous_format) if same else out.contiguous()
    tr = _TRAFFIC.get()
    if tr is not None:
        tr.bytes += out.numel() * out.element_size()
        tr.calls += 1
    return out


def _nccl() -> bool:
    return dist.get_backend() == "nccl"


def _back(buf: Tensor, like: Tensor) -> Tensor:
    return buf.to(device=like.device, dtype=like.dtype)


def all_reduce_sum(t: Tensor) -> Tensor:
    """``t`` summed over ranks (a new tensor; ``t`` itself when not distributed)."""
    if world() is None:
        return t
    buf = _wire(t)
    dist.all_reduce(buf)
    return _back(buf, t)


def all_reduce_many(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Each tensor summed over ranks, in one collective per dtype (flattened together)."""
    tensors = list(tensors)
    if world() is None or not tensors:
        return tensors
    out: list[Tensor | None] = [None] * len(tensors)
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        idx = [i for i, t in enumerate(tensors) if t.dtype == dtype]
        dev = tensors[idx[0]].device
        flat = all_reduce_sum(torch.cat([tensors[i].detach().reshape(-1).to(dev) for i in idx]))
        for i, part in zip(idx, flat.split([tensors[i].numel() for i in idx]), strict=True):
            out[i] = part.view(tensors[i].shape).to(tensors[i].device)
    return out


def all_reduce_dict(d: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``{name: tensor}`` summed over ranks (the same names on every rank, in the same order)."""
    names = list(d)
    return dict(zip(names, all_reduce_many([d[n] for n in names]), strict=True))


def sum_counts(*counts: int | float) -> tuple:
    """Numbers (sample counts, batch counts, pass counts) summed over ranks."""
    if world() is None:
        return counts
    t = all_reduce_sum(torch.tensor(counts, dtype=torch.float64))
    return tuple(
        type(c)(round(v) if isinstance(c, int) else v)
        for c, v in zip(counts, t.tolist(), strict=True)
    )


def rank_seed(seed: int, rank: int | None = None) -> int:
    """The seed this rank's random draws use: ``seed`` on rank 0 (and without distribution),
    an independent 63-bit stream on rank r > 0 (SHA-256 of seed and rank)."""
    if rank is None:
        w = world()
        rank = 0 if w is None else w[0]
    if rank == 0:
        return seed
    digest = hashlib.sha256(f"saliency:{seed}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ----------------------------------------------------------------------------- agreement


def check_nonempty(has_samples: bool) -> None:
    """Refuse, on every rank at once, a shard that holds no samples (called by ``iter_batches``
    before any rank could raise alone and leave the others waiting in a collective)."""
    w = world()
    if w is None:
        return
    flags = torch.zeros(w[1], dtype=torch.float64)
    flags[w[0]] = float(bool(has_samples))
    flags = all_reduce_sum(flags)
    empty = [r for r, f in enumerate(flags.tolist()) if f == 0]
    if empty:
        raise ValueError(
            f"rank(s) {empty} of {w[1]} read no samples: with torch.distributed every rank must "
            "hold a non-empty shard, each sample on one rank (e.g. Subset(data, range(rank, "
            "len(data), world))), or pass distributed=False to score each rank's data alone"
        )


_SAME_MODEL = (
    "every rank must hold the same weights (and attached masks) before scoring, e.g. broadcast "
    "them from rank 0 as DistributedDataParallel does; or pass distributed=False to score each "
    "rank's own model"
)


def check_replicated(
    tensors: Mapping[str, Tensor], what: str = "the model", hint: str = _SAME_MODEL
) -> None:
    """Refuse, on every rank, tensors that differ between ranks (compared through their float64
    sums and sums of squares): combined statistics of different models mean nothing."""
    w = world()
    if w is None:
        return
    names = list(tensors)
    sums = [
        (t.detach().double().sum(), t.detach().double().square().sum()) for t in tensors.values()
    ]
    mine = torch.tensor([float(v) for pair in sums for v in pair], dtype=torch.float64)
    ref = mine.clone()
    if mine.numel():
        buf = _wire(ref)
        dist.broadcast(buf, src=0)
        ref = buf.cpu()
    bad = torch.zeros(w[1], dtype=torch.float64)
    differ = (mine != ref) & ~(mine.isnan() & ref.isnan())
    bad[w[0]] = float(bool(differ.any()))
    bad = all_reduce_sum(bad)
    if bool(bad.any()):
        first = names[int(differ.nonzero()[0, 0]) // 2] if bool(differ.any()) else None
        ranks = [r for r, b in enumerate(bad.tolist()) if b]
        raise ValueError(
            f"{what}: rank(s) {ranks} hold other values than rank 0"
            + (f" (first at {first!r})" if first else "")
            + f": {hint}"
        )


# ----------------------------------------------------------------------------- sharding


def shares(total: int, size: int | None = None) -> list[tuple[int, int]]:
    """Contiguous ``[lo, hi)`` ranges of ``total`` items, one per rank, as equal as can be."""
    size = group_size() if size is None else size
    return [(r * total // size, (r + 1) * total // size) for r in range(size)]


def reduce_rows(t: Tensor, ranges: Sequence[tuple[int, int]]) -> Tensor:
    """Sum ``t [n, ...]`` over ranks, rank r receiving only rows ``ranges[r]``; returns this
    rank's summed rows (a copy). One ``reduce`` per rank that owns rows."""
    w = world()
    if w is None:
        raise RuntimeError("reduce_rows needs an initialized process group")
    mine = None
    for r, (lo, hi) in enumerate(ranges):
        if hi <= lo:
            continue
        buf = _wire(t[lo:hi])
        dist.reduce(buf, dst=r)
        if r == w[0]:
            mine = _back(buf, t)
    if mine is None:
        lo, hi = ranges[w[0]]
        mine = t[lo:hi].clone()
    return mine


def assemble(part: Tensor, lo: int, total: int) -> Tensor:
    """The full ``[total, ...]`` tensor from every rank's rows (this rank's ``part`` starting at
    row ``lo``): a sum of zero-filled copies, exact since each row comes from one rank. Needs
    the process group whatever ``local()`` says (the rows live on different ranks)."""
    if group_size() < 2:
        return part
    full = torch.zeros(total, *part.shape[1:], dtype=part.dtype, device=part.device)
    full[lo : lo + len(part)] = part
    buf = _wire(full)
    dist.all_reduce(buf)
    return _back(buf, full)


def sum_shards(t: Tensor) -> Tensor:
    """``t`` summed over ranks, each holding its part of a sum over sharded blocks (needs the
    process group whatever ``local()`` says, as ``assemble``)."""
    return assemble(t[None], 0, 1)[0]


def broadcast(t: Tensor, src: int) -> Tensor:
    """``t`` as rank ``src`` holds it (a new tensor on every rank)."""
    if group_size() < 2:
        return t
    buf = _wire(t)
    dist.broadcast(buf, src=src)
    return _back(buf, t)


def raise_together(error: Exception | None) -> None:
    """Agree on a failure: if any rank passes an error, every rank raises it (the first, with
    its rank), so no rank goes on to a collective the failed one never reaches."""
    w = world()
    if w is None:
        if error is not None:
            raise error
        return
    failed = torch.zeros(w[1], dtype=torch.float64)
    failed[w[0]] = float(error is not None)
    failed = all_reduce_sum(failed)
    if not bool(failed.any()):
        return
    messages: list = [None] * w[1]
    dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
    r = next(i for i, m in enumerate(messages) if m is not None)
    if error is not None and r == w[0]:
        raise error
    raise ValueError(f"rank {r} of {w[1]} failed: {messages[r]}")


# ----------------------------------------------------------------------------- sweeps under torchrun


def is_writer() -> bool:
    """Does this process write files? Rank 0 of a group, or a process without one: under
    ``torchrun`` every rank runs a sweep unit, only rank 0 records it."""
    return group_size() < 2 or dist.get_rank() == 0


def init_from_env() -> bool:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1 in the environment),
    NCCL on the rank's own GPU (``LOCAL_RANK``) where CUDA is available, gloo otherwise; True
    if this process is now in a group of several ranks."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return group_size() > 1
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return group_size() > 1


def broadcast_object(obj, src: int = 0):
    """``obj`` (picklable) as rank ``src`` holds it; itself without a group."""
    if group_size() < 2:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Every parameter and buffer of ``module`` set to rank ``src``'s, in place."""
    if group_size() < 2:
        return
    with torch.no_grad():
        for t in module.state_dict().values():
            t.copy_(broadcast(t, src))
