"""FLAP (An et al. 2024): structured pruning by input fluctuation, with bias compensation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from saliency import capture, layerwise
from saliency.criteria import register_criterion
from saliency.structured_solvers import (
    flap_compensation,
    flap_standardize,
    fluctuation,
    input_variance,
)


def _out_stats(crit, model, structure, data):
    """Dense-model input statistics of every out projection: ``{group: (module, Stats)}``."""
    params = dict(model.named_parameters())
    names = {gi: f"{g.output}.weight" for gi, g in enumerate(structure.groups)}
    stats = layerwise.dense_stats(model, {n: params[n] for n in names.values()}, data,
                                  n_samples=crit.n_samples, diag_only=True)  # fmt: skip
    modules = capture.layer_modules(model, {n: params[n] for n in names.values()})
    return {gi: (modules[n], stats[n]) for gi, n in names.items()}


@register_criterion
@dataclass(frozen=True)
class FLAP:
    """FLAP fluctuation Var[x_j] ||W[:, j]||^2 of each input channel, bias-compensated (An et al. 2024).

    A unit (head, MLP neuron) of a transformer is scored by the weighted input feature variance
    of its out-projection columns, standardized over the layer's channels so that heads and
    neurons of all layers compare (eq. 6); removing it adds ``W[:, R] mu_R`` to the out
    projection's bias (a zero bias is created where there is none), so that the layer's mean
    output is unchanged: ``saliency.prune(model, "flap", 0.2, data=calib, granularity="width")``
    (``saliency.structured``). ``score`` alone gives every Linear / Conv weight
    ``Var[x_j] W_ij^2`` (its column sums are the fluctuation), statistics from the dense model.
    """

    name: ClassVar[str] = "flap"
    per_parameter: ClassVar[bool] = False  # standardized scores compare as they are (eq. 6)
    n_samples: int | None = 128

    def __post_init__(self) -> None:
        layerwise.check_hparams(self)

    def score(self, model, params, data, loss_fn=None):
        stats = layerwise.dense_stats(model, params, data, n_samples=self.n_samples, diag_only=True)
        modules = capture.layer_modules(model, params)
        out = {}
        for n, st in stats.items():
            W = capture.weight_matrix(modules[n]).detach().double().cpu()
            s = (W.square() * input_variance(st.mean, st.sum / st.n)).float()
            out[n] = capture.from_matrix(modules[n], s).to(params[n].device).contiguous()
        return out

    def unit_scores(self, model, structure, data):
        out = {}
        for gi, (m, st) in _out_stats(self, model, structure, data).items():
            W = capture.weight_matrix(m).detach().cpu()
            f = fluctuation(W, st.mean, st.sum / max(st.n, 1))
            out[gi] = flap_standardize(f, structure.groups[gi].columns)
        return out

    def compensate(self, model, structure, data, removed) -> None:
        for gi, (m, st) in _out_stats(self, model, structure, data).items():
            if not len(removed.get(gi, ())):
                continue
            W = capture.weight_matrix(m).detach().cpu()
            b = flap_compensation(W.double(), st.mean, removed[gi], structure.groups[gi].columns)
            if m.bias is None:
                _give_biases(model, structure, structure.groups[gi].kind)
            with torch.no_grad():
                m.bias.add_(b.to(m.bias))


_BIAS_FLAGS = {"head": "attention_bias", "neuron": "mlp_bias"}  # LLaMA-family config fields


def _give_biases(model: nn.Module, structure, kind: str) -> None:
    """Zero biases on every projection of every ``kind`` branch that has none, and the config's
    flag set, so that the compensated model saves and reloads in plain transformers (a LLaMA
    config has one bias flag for all attention projections and one for the MLP's)."""
    mods = dict(model.named_modules())
    for g in structure.groups:
        if g.kind != kind:
            continue
        for name in (*g.inputs, g.output):
            m = mods[name]
            if m.bias is None:  # an nn.Linear (transformers' Conv1D always has one)
                m.bias = nn.Parameter(torch.zeros(m.out_features, dtype=m.weight.dtype,
                                                  device=m.weight.device))  # fmt: skip
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, _BIAS_FLAGS[kind]):
        setattr(cfg, _BIAS_FLAGS[kind], True)
