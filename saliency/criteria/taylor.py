"""First-order Taylor expansion on activations (Molchanov, Tyree, Karras, Aila & Kautz 2017)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from saliency import distributed, fastpaths
from saliency.allocate import group_index
from saliency.criteria import Scores, register_criterion
from saliency.criteria.base import (
    default_loss,
    forward,
    iter_batches,
    model_device,
    per_sample_losses,
    resolve_loss,
)
from saliency.criteria.snip import check_counts, scoring_mode
from saliency.targets import channel_layout, is_transposed_linear

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


_UNPROVEN = (
    "taylor needs the output of the layer of {name} to carry the samples on dim 0 (its row n "
    "reaching sample n's loss alone); that was not the case on this batch (e.g. a "
    "sequence-first transformer, a layer on x.transpose(0, 1) or on batch-independent "
    "queries). Score that parameter with 'taylor_weight', or use batch_first layouts"
)


def _position_mean(prod: Tensor, mask: Tensor | None) -> Tensor:
    """``[B, C, L]`` -> ``[B, C]`` mean over positions; over the unpadded tokens only when
    ``mask [B, T]`` (``Batch.token_mask``) marks them and the positions are those tokens."""
    if mask is None or prod.shape[2] != mask.shape[1]:
        return prod.mean(2)
    m = mask.to(prod.dtype)[:, None, :]
    return (prod * m).sum(2) / m.sum(2).clamp(min=1)


def _owners(model: nn.Module, params) -> dict[str, tuple[nn.Module, int]]:
    """{name: (layer whose weight it is, channel dim of that layer's output)}."""
    layers = {}
    for m in model.modules():
        if isinstance(m, nn.Linear) or is_transposed_linear(m):  # HF Conv1D: x @ W + b
            layers[id(m.weight)] = (m, -1)
        elif isinstance(m, _CONV):
            layers[id(m.weight)] = (m, 1)
    out = {}
    for n, p in params.items():
        if id(p) not in layers:
            raise ValueError(
                f"taylor scores the output channels of Linear, Conv1D and Conv1d/2d/3d layers; {n!r} "
                "is not the weight of one (attention's in_proj_weight, ConvTranspose...): leave "
                "it out (prunable_parameters(model, exclude_types=(nn.MultiheadAttention,)) or "
                "exclude=...) or use 'taylor_weight' for such parameters"
            )
        out[n] = layers[id(p)]
    return out


@register_criterion
@dataclass(frozen=True)
class Taylor:
    """Taylor on activations: per channel |mean_m a_m dL/da_m| (Molchanov et al. 2017, ICLR).

    For each output channel (neuron of a Linear layer, feature map of a convolution) with
    output activation ``a`` over positions m = 1..M, and each example n, the paper's eq. (8)
    ``Theta_n = |1/M sum_m a_m dl_n/da_m|`` estimates (up to the factor M) the change of the
    example's loss ``l_n`` when the channel's activation is zeroed; scores average ``Theta_n``
    over the ``n_samples`` examples read. With ``normalize`` (default, the paper's eq. 9) each
    layer's scores are divided by their L2 norm over its channels.

    ``a`` is the output of the layer that owns the weight, before any nonlinearity after it
    (with a bias, pruning the channel's weights alone leaves the bias). Per-example gradients
    ``dl_n/da`` come from the sum of per-sample losses (``saliency.model_io``; the loss's own
    reduction over positions and ignore index), exact when examples do not interact, hence
    ``eval_mode=True`` by default (BatchNorm on running statistics). The sample axis of every
    scored layer is proven on each batch: by its values (``saliency.fastpaths.probe``), or,
    where they do not move with the samples (a squeeze-excitation conv behind a ReLU that is
    off for every sample outputs its bias), by one more backward showing that row n of its
    output reaches sample n's loss alone (``fastpaths.rows_reach_own_losses``). A layer whose
    output does not carry the samples on dim 0 (sequence-first transformers) is refused. Activations are
    captured by forward hooks (which hand a copy downstream, so in-place activations cannot
    overwrite them), removed in all cases; mode, ``.grad``, ``requires_grad`` and buffers are
    restored.

    These are channel scores: each channel's score is broadcast over its weights, and
    ``channel_reduce = "mean"`` gives back the exact channel score at granularity "channel".
    A layer called more than once per forward (weight sharing) is refused.
    """

    name: ClassVar[str] = "taylor"
    channel_reduce: ClassVar[str] = "mean"

    n_samples: int | None = 1024
    n_batches: int | None = None
    normalize: bool = True
    eval_mode: bool = True

    def __post_init__(self) -> None:
        check_counts(self.n_samples, self.n_batches)

    def channel_scores(
        self, model, params, data, loss_fn=None
    ) -> tuple[dict[str, Tensor], int, int]:
        """({name: [out_channels] scores}, samples, batches); call inside `scoring_mode`."""
        loss_fn = default_loss if loss_fn is None else loss_fn
        owners = _owners(model, params)
        names = list(params)
        outs: dict[str, list[Tensor]] = {n: [] for n in names}
        totals: dict[str, Tensor] = {}
        samples = batches = 0

        def capture(n):
            def hook(module, inputs, output):
                outs[n].append(output)
                # later in-place ops (ReLU6(inplace=True)...) must not overwrite a: they get a copy
                return output.clone()

            return hook

        fastpaths.check_per_sample(model)
        handles = []
        try:
            for n in names:
                handles.append(owners[n][0].register_forward_hook(capture(n)))
            device = model_device(model)
            for i, batch in enumerate(iter_batches(data, self.n_samples, device=device)):
                if self.n_batches is not None and i >= self.n_batches:
                    break
                for v in outs.values():
                    v.clear()
                # the sum of per-sample losses: its gradient at sample n's activation is dl_n/da
                loss_fn = resolve_loss(loss_fn, model, batch)
                losses = per_sample_losses(loss_fn, forward(model, batch), batch.targets)
                for n in names:
                    if len(outs[n]) != 1:
                        raise ValueError(
                            f"taylor needs each scored layer to run once per forward as a module; "
                            f"the layer of {n!r} ran {len(outs[n])} times (0: its weight is used "
                            "functionally, as MultiheadAttention does with out_proj). Leave it "
                            "out (prunable_parameters(model, exclude=...)) or use 'taylor_weight'"
                        )
                proven = fastpaths.probe(model, batch, [owners[n][0] for n in names])  # raises
                unproven = [n for n in names if owners[n][0] not in proven]  # if samples mix
                acts = [outs[n][0] for n in names]
                grads = torch.autograd.grad(
                    losses.sum(), acts, allow_unused=True, retain_graph=bool(unproven)
                )
                if unproven:  # values proved nothing (rows that do not move): gradients may
                    at = [names.index(n) for n in unproven]
                    ok = fastpaths.rows_reach_own_losses(
                        losses, [acts[i] for i in at], [grads[i] for i in at]
                    )
                    for n, good in zip(unproven, ok, strict=True):
                        if not good:
                            raise ValueError(_UNPROVEN.format(name=repr(n)))
                del losses
                for n, a, g in zip(names, acts, grads, strict=True):
                    dim = owners[n][1]
                    if g is None:
                        g = torch.zeros_like(a)
                    prod = (a.detach() * g).movedim(dim, 1)  # [B, C, positions]
                    prod = prod.reshape(prod.shape[0], prod.shape[1], -1)
                    theta = _position_mean(prod.double(), batch.token_mask).abs().sum(0)
                    totals[n] = totals[n] + theta if n in totals else theta
                samples, batches = samples + len(batch), batches + 1
        finally:
            for h in handles:
                h.remove()
            outs.clear()
        totals = distributed.all_reduce_dict(totals)  # sums and counts over every rank's batches
        samples, batches = distributed.sum_counts(samples, batches)
        scores = {}
        for n in names:
            s = totals[n] / samples
            if self.normalize:
                norm = s.norm()
                s = s / norm if norm > 0 else s
            scores[n] = s.float()
        return scores, samples, batches

    def score(self, model, params, data, loss_fn=None) -> Scores:
        with scoring_mode(model, params, eval_mode=self.eval_mode):
            ch, samples, batches = self.channel_scores(model, params, data, loss_fn)
        layout = channel_layout(model, params)  # HF Conv1D: output channels along dim 1
        scores = Scores(
            {
                n: ch[n][group_index(p.shape, "channel", None, ch[n].device, layout.get(n, (0, 1)))]
                for n, p in params.items()
            }
        )
        scores.cost.samples = samples
        scores.cost.backward_passes = batches
        return scores
