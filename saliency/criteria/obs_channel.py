"""Structured Optimal Brain Surgeon: remove a whole output channel, update the rest jointly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from saliency.criteria import Scores, register_criterion
from saliency.criteria.obs import OBS, _obs_z


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


@register_criterion
@dataclass(frozen=True)
class OBSChannel(OBS):
    """Structured OBS: the predicted loss increase of removing a whole output channel Q (a row of
    a Linear / Conv weight) with the joint update ``dw = -H^-1[:, Q] (H^-1[Q, Q])^-1 w_Q`` of the
    rest of its blocks, ``1/2 w_Q^T (H^-1[Q, Q])^-1 w_Q`` summed over the blocks the row
    spans (block-diagonal ``H^-1`` from `OBS`: WoodFisher blocks of `block_size` weights, or the
    exact Hessian jointly for small models). A row cut by a block boundary is updated within
    each block (the block-diagonal model); blocks holding several whole rows (``block_size`` a
    multiple of the row length) let the update move the other channels.

    The score of each channel is broadcast over its weights (``channel_reduce = "mean"`` gives
    it back at granularity "channel"; tied channels, `allocate(..., groups=...)`, add their
    members' costs). `apply_update` is OBS's joint update for the pruned set. ``hessian="kfac"``
    is refused (no block inverse to condition).
    """

    name: ClassVar[str] = "obs_channel"
    channel_reduce: ClassVar[str] = "mean"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hessian == "kfac":
            raise ValueError(
                "obs_channel needs block inverses: hessian 'fisher' or 'exact', not 'kfac'"
            )

    def score(self, model, params, data, loss_fn=None) -> Scores:
        inv = self.inverse(model, params, data, loss_fn)
        scores = Scores()
        for blk in inv.blocks:
            offsets, ids = 0, {}
            for n in blk.names:  # one channel id per output row, across the block's tensors
                rows = params[n].shape[0]
                ids[n] = (torch.arange(rows) + offsets).view(-1, *[1] * (params[n].dim() - 1))
                ids[n] = ids[n].expand(params[n].shape)
                offsets += rows
            channel = blk.flatten(ids).long().cpu()
            cost = channel_costs(blk.Hinv.cpu(), blk.flatten(params, torch.float64).cpu(),
                                 channel, blk.alive.cpu(), offsets)  # fmt: skip
            for n in blk.names:
                scores[n] = cost[ids[n]].to(torch.float32).to(params[n].device)
        scores.extra["obs"] = inv
        scores.cost.samples = inv.samples
        scores.cost.backward_passes = inv.backward_passes
        return scores
