"""Structured Optimal Brain Surgeon: remove a whole output channel, update the rest jointly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from saliency import distributed, kfac
from saliency.allocate import group_index
from saliency.criteria import Scores, register_criterion
from saliency.criteria.obs import OBS, _obs_z
from saliency.targets import channel_layout


def channel_costs(Hinv: Tensor, w: Tensor, channel: Tensor, alive: Tensor, n_channels: int,
                  chunk: int = 256) -> Tensor:  # fmt: skip
    """``sum_b 1/2 w_Qb^T (Hinv_b[Qb, Qb])^-1 w_Qb`` per channel, ``Qb`` the channel's alive
    weights in block b: the loss increase the quadratic model predicts for removing the channel
    with the joint OBS update of the rest of each block (Hassibi & Stork 1993, eq. 5 with a set
    of weights). ``Hinv [nb, B, B]``, ``w``, ``channel`` (id per weight) and ``alive`` ``[nb, B]``.
    One small system per (block, channel) pair, batched ``chunk`` pairs at a time. In float64."""
    cost = torch.zeros(n_channels, dtype=torch.float64)
    ch = torch.where(alive, channel, -1)
    pairs = torch.unique(torch.stack([torch.arange(len(ch))[:, None].expand_as(ch), ch], -1)
                         .reshape(-1, 2), dim=0)  # fmt: skip
    pairs = pairs[pairs[:, 1] >= 0]
    for i in range(0, len(pairs), chunk):
        b, c = pairs[i : i + chunk].unbind(1)
        Q = ch[b] == c[:, None]
        z = _obs_z(Hinv[b], w[b], Q)
        cost.index_add_(0, c, 0.5 * (w[b].double() * Q * z).sum(1).cpu())
    return cost


def kfac_channel_costs(f: kfac.KroneckerFactors, w: Tensor, chunk: int = 16) -> Tensor:
    """``1/2 w_c^T (H^-1[c, c])^-1 w_c`` per output row c of one layer under K-FAC, with the
    exact row blocks of the damped inverse (`KroneckerFactors.row_inverse`); only the row's
    nonzero weights count (pruned ones are already gone). Removing row c with the joint update
    moves every other weight of the layer: the block is the whole layer."""
    W = f.as_matrix(w.detach()).cpu()
    live = f.live_mask().cpu() & (W != 0)  # weights of negligible curvature cost nothing
    cost = torch.zeros(len(W), dtype=torch.float64)
    for i in range(0, len(W), chunk):
        rows = slice(i, min(i + chunk, len(W)))
        z = _obs_z(f.row_inverse(rows).cpu(), W[rows], live[rows])
        cost[rows] = 0.5 * (W[rows] * z).sum(1)
    return cost


@register_criterion
@dataclass(frozen=True)
class OBSChannel(OBS):
    """Structured OBS: predicted loss increase of removing a whole output channel, jointly updated.

    The channel is Q, a row of a Linear / Conv weight, removed with the joint update
    ``dw = -H^-1[:, Q] (H^-1[Q, Q])^-1 w_Q`` of the rest of its blocks; its cost is
    ``1/2 w_Q^T (H^-1[Q, Q])^-1 w_Q`` summed over the blocks the row spans: the whole layer
    under K-FAC (``hessian="kfac"``, the default: ``H ~ A (x) G``, `kfac_channel_costs`, the
    update solved jointly over the layer), or the block-diagonal
    ``H^-1`` of `OBS` (``"fisher"``: WoodFisher blocks of `block_size` weights; ``"exact"``:
    the exact Hessian jointly, for small models).
    With WoodFisher blocks, a row cut by a block boundary is updated within each block, and a
    block inside one row has nothing left to move when the row goes: the update compensates
    only with other rows in the same block (``block_size`` a multiple of the row length, two
    rows or more), while under K-FAC every other row of the layer moves.

    The cost of each channel is spread evenly over its weights (``channel_reduce = "sum"``
    gives it back at granularity "channel"; tied channels, `allocate(..., groups=...)`, add
    their members' costs). `apply_update` is OBS's joint update for the pruned set.
    """

    name: ClassVar[str] = "obs_channel"
    # each weight holds an equal share of its channel's cost: sums over a channel (allocate,
    # a sweep's predicted loss increase) give the channel's cost
    channel_reduce: ClassVar[str] = "sum"

    # K-FAC by default: its block is the whole layer, so removing a row moves all the others
    # (ResNet-20 on mnist5k, one-shot at 10% channel sparsity: 93.4% against 55.3% with
    # WoodFisher blocks of 128 weights and 66.1% for L2 magnitude; benchmarks/bench_compact.py)
    hessian: Literal["fisher", "exact", "kfac"] = "kfac"

    def score(self, model, params, data, loss_fn=None) -> Scores:
        inv = self.inverse(model, params, data, loss_fn)
        scores = Scores()
        if isinstance(inv, kfac.KFAC):
            for n, p in params.items():
                f = inv.factors[n]
                cost = kfac_channel_costs(f, p) * (len(f.G) / p.numel())
                share = f.from_matrix(cost[:, None].expand(len(f.G), len(f.A)))
                scores[n] = share.to(torch.float32).to(p.device)
            blocks = []
        else:
            blocks, layout = inv.blocks, channel_layout(model, params)
        for blk in blocks:
            offsets, ids, size = 0, {}, {}
            for n in blk.names:  # one id per output channel, across the block's tensors
                ch = group_index(params[n].shape, "channel", None, "cpu", layout.get(n, (0, 1)))
                ids[n], size[n] = ch + offsets, params[n].numel() // (int(ch.max()) + 1)
                offsets += int(ch.max()) + 1
            r = blk.rows  # this rank's share of the blocks when sharded (saliency.distributed)
            channel = blk.flatten(ids).long().cpu()[r]
            cost = channel_costs(blk.Hinv.cpu(), blk.flatten(params, torch.float64).cpu()[r],
                                 channel, blk.alive.cpu()[r], offsets)  # fmt: skip
            if blk.sharded:  # a channel's cost is a sum over blocks: over every rank's blocks
                cost = distributed.sum_shards(cost)
            for n in blk.names:
                share = cost[ids[n]] / size[n]
                scores[n] = share.to(torch.float32).to(params[n].device)
        scores.extra["obs"] = inv
        scores.cost.samples = inv.samples
        scores.cost.backward_passes = inv.backward_passes
        return scores
