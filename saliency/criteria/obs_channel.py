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


def kfac_channel_costs(f: kfac.KroneckerFactors, w: Tensor) -> Tensor:
    """``1/2 w_c^T (H^-1[c, c])^-1 w_c`` per output row c of one layer under K-FAC, over the
    row's live nonzero weights Q (pruned ones are already gone). Removing row c with the joint
    update moves every other weight of the layer: the block is the whole layer.

    Through the Kronecker eigenbases: the row block of the damped inverse is ``M_c = U_A
    diag(c_c) U_A^T`` with ``c_c = (U_G^2)_c / (s_G s_A^T + lambda)`` (`row_inverse`), so for a
    full row ``w^T M_c^-1 w = sum_k (U_A^T w)_k^2 / c_ck``: one ``[out, in] x [in, in]`` product
    for the whole layer, not an ``[in, in]`` block per row (4608 x 4608 x 512 for ResNet's
    layer4). A row with dead entries D uses the Schur complement ``(M_QQ)^-1 = N_QQ - N_QD
    (N_DD)^-1 N_DQ`` of ``N = M_c^-1`` (or solves ``M_QQ`` when fewer weights live than died).
    In float64; equal to the explicit row blocks (tests/test_obs_channel_kfac.py)."""
    W = f.as_matrix(w.detach()).cpu()
    Q = f.live_mask().cpu() & (W != 0)  # weights of negligible curvature cost nothing
    UA = f.UA.cpu()
    C = (f.UG.cpu() ** 2) @ (1.0 / f._eig().cpu())  # [out, in]: eigenvalues of each row block
    P = (W * Q) @ UA  # U_A^T w_c per row
    cost = 0.5 * (P**2 / C).sum(1)
    partial = (Q.any(1) & ~Q.all(1)).nonzero().squeeze(1).tolist()
    for c in partial:
        q = Q[c]
        d = ~q
        if int(d.sum()) <= int(q.sum()):  # w^T N w minus the dead coordinates' share
            nw = UA @ (P[c] / C[c])
            N_dd = (UA[d] / C[c]) @ UA[d].T
            cost[c] -= 0.5 * nw[d] @ torch.linalg.solve(N_dd, nw[d])
        else:  # few live weights: solve M_QQ directly
            M_qq = (UA[q] * C[c]) @ UA[q].T
            cost[c] = 0.5 * W[c, q] @ torch.linalg.solve(M_qq, W[c, q])
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
