"""Structured OBS (ZipLM, SlimGPT): whole heads and MLP neurons with the joint weight update."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from saliency import capture, layerwise
from saliency.criteria import register_criterion
from saliency.structured_solvers import structured_obs, unit_obs_costs


@register_criterion
@dataclass(frozen=True)
class StructuredOBS:
    """Structured OBS: remove out-projection columns of least 0.5 tr(W_Q [H^-1]_QQ^-1 W_Q^T), refit the rest (Kurtic et al. 2023).

    Each head / MLP neuron of a transformer owns input columns ``Q`` of its out projection
    (``o_proj``, ``down_proj``); with ``H = 2 X^T X / n`` of that layer's inputs (damped by
    ``damp * mean diag H``), removing ``Q`` and updating the other columns optimally costs
    ``0.5 tr(W_Q ([H^-1]_QQ)^-1 W_Q^T)`` (Hassibi & Stork 1993 for a group; ZipLM, Kurtic et
    al. 2023; SlimGPT, Ling et al. 2024). Units go one at a time, cheapest first under the
    inverse left by the ones before, block by block with the pruned blocks' outputs as the next
    block's inputs (``saliency.blocks``). How many go from each layer comes from the dense
    costs relative to the layer's output energy ``tr(W H W^T) / 2``, per parameter.
    ``saliency.prune(model, "structured_obs", 0.3, data=calib, granularity="width")``.
    ``score`` alone gives the element layer-wise OBS saliency ``w^2 / (2 [H^-1]_qq)``.
    """

    name: ClassVar[str] = "structured_obs"
    diag_only: ClassVar[bool] = False
    damp: float = 0.01
    n_samples: int | None = 128

    def __post_init__(self) -> None:
        layerwise.check_hparams(self)

    def score(self, model, params, data, loss_fn=None):
        return layerwise.obs_scores(self, model, params, data)

    def _outputs(self, model, structure):
        params = dict(model.named_parameters())
        names = {f"{g.output}.weight": gi for gi, g in enumerate(structure.groups)}
        return {n: params[n] for n in names}, names

    def unit_scores(self, model, structure, data):
        """Dense one-shot costs, relative to the layer's output energy (comparable across
        layers), higher = keep."""
        outs, names = self._outputs(model, structure)
        stats = layerwise.dense_stats(model, outs, data, n_samples=self.n_samples, diag_only=False)
        modules = capture.layer_modules(model, outs)
        scores = {}
        for n, st in stats.items():
            W = capture.weight_matrix(modules[n]).detach().cpu().double()
            energy = 0.5 * torch.einsum("ij,jk,ik->", W, st.H, W).clamp_min(1e-300)
            g = structure.groups[names[n]]
            scores[names[n]] = unit_obs_costs(W, st.H, g.columns, damp=self.damp) / energy
        return scores

    def solve_units(self, model, structure, data, counts):
        """Remove ``counts[group]`` units of each group greedily with the joint update, block by
        block; returns ``{group: removed unit ids}``."""
        outs, names = self._outputs(model, structure)
        removed = {gi: torch.zeros(0, dtype=torch.long) for gi in counts}

        def solve_group(group, modules, stats, keep):
            written = {}
            for n in group:
                gi, m = names[n], modules[n]
                W = capture.weight_matrix(m).detach()
                W2, gone, _ = structured_obs(W.cpu().double(), stats[n].H,
                                             structure.groups[gi].columns, counts.get(gi, 0),
                                             damp=self.damp)  # fmt: skip
                removed[gi] = gone.sort().values
                k = torch.ones_like(W2, dtype=torch.bool)
                k[:, structure.groups[gi].columns[gone].reshape(-1)] = False
                with torch.no_grad():
                    m.weight.copy_(capture.from_matrix(m, W2.to(W)))
                keep[n] = capture.from_matrix(m, k.to(W.device)).contiguous()
                written[n] = (m.weight.detach(), keep[n])
            return written

        layerwise.prune_layerwise(model, self, outs, data, 0.0, solve_group=solve_group)
        return removed
