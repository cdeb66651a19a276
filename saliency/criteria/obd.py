"""Optimal Brain Damage (LeCun, Denker & Solla 1990): saliency ``1/2 H_qq w_q^2``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from saliency import curvature, negligible
from saliency.criteria import Scores, register_criterion
from saliency.criteria.base import default_loss, preserve_model_state

_HESSIANS = ("fisher", "true_fisher", "ggn", "hutchinson", "exact", "kfac", "kfac_true")
_LINEAR = ("hutchinson", "exact")  # linear in second derivatives (saliency.negligible)


@register_criterion
@dataclass(frozen=True)
class OBD:
    """Optimal Brain Damage: predicted loss increase 1/2 H_qq w_q^2 (LeCun et al. 1990).

    ``H_qq`` negligible against the mean over all targets (``saliency.negligible``: round-off,
    e.g. an attention key bias) counts as exactly 0.

    The second-order Taylor expansion of the loss around a minimum, with the Hessian taken
    diagonal, predicts that zeroing weight ``w_q`` raises the loss by ``1/2 H_qq w_q^2``
    (``loss_units``: the sum of the pruned scores predicts the loss change, off-diagonal terms
    and the gradient term ignored). ``hessian`` picks the diagonal, all as means over
    ``n_samples`` per-sample losses (see ``saliency.curvature``):

    - ``"ggn"`` (default): the generalized Gauss-Newton diagonal, exact (``exact_ggn=True``) or
      one-sample Monte Carlo; LeCun et al.'s own choice drops the second derivatives of the
      network as the GGN does. For ReLU/max-pool networks it equals the exact Hessian diagonal.
    - ``"fisher"``: empirical Fisher ``(1/N) sum_n g_n^2`` (one backward per batch; cheapest).
    - ``"true_fisher"``: Fisher with labels drawn from the model, ``mc_samples`` per sample.
    - ``"hutchinson"``: Rademacher estimate with ``n_probes`` Hessian-vector products (a
      fallback: noisy, entries may be negative).
    - ``"kfac"`` / ``"kfac_true"``: the diagonal ``diag(G)_j diag(A)_i`` of the K-FAC
      approximation ``A (x) G`` (empirical / true Fisher; ``saliency.kfac``, Martens & Grosse
      2015), undamped; Linear and Conv1d/2d weights only (others are refused).
    - ``"exact"``: the exact Hessian diagonal (BackPACK, or autograd up to ``max_params``
      weights). It can be negative away from a minimum: such weights are predicted to lower
      the loss and are pruned first.

    At granularity "channel" the scores of a channel's weights are summed (``channel_reduce``):
    the diagonal model's prediction for removing the whole channel.

    ``eval_mode=True`` scores with the model in ``eval()`` mode (BatchNorm on running
    statistics, no dropout) so per-sample curvature is defined and scores are deterministic; the
    mode is restored afterwards. ``backend`` ("auto", "backpack", "torch") chooses how exact GGN
    and Hessian diagonals are computed.
    """

    name: ClassVar[str] = "obd"
    loss_units: ClassVar[bool] = True
    # a channel's predicted loss increase is the sum of its weights' (diagonal: no cross terms)
    channel_reduce: ClassVar[str] = "sum"

    hessian: Literal["fisher", "true_fisher", "ggn", "hutchinson", "exact", "kfac", "kfac_true"] = (
        "ggn"
    )
    n_samples: int | None = 1024
    mc_samples: int = 1
    exact_ggn: bool = True
    n_probes: int = 64
    seed: int = 0
    eval_mode: bool = True
    backend: Literal["auto", "backpack", "torch"] = "auto"
    max_params: int = 20_000

    def __post_init__(self) -> None:
        if self.hessian not in _HESSIANS:
            raise ValueError(f"hessian must be one of {', '.join(_HESSIANS)}; got {self.hessian!r}")
        if self.backend not in ("auto", "backpack", "torch"):
            raise ValueError(f"backend must be 'auto', 'backpack' or 'torch'; got {self.backend!r}")

    def curvature(self, model, params, data, loss_fn=None) -> curvature.DiagCurvature:
        """The diagonal ``H_qq`` this criterion uses, per parameter name."""
        loss_fn = default_loss if loss_fn is None else loss_fn
        kw = {"n_samples": self.n_samples}
        if self.hessian == "fisher":
            return curvature.diag_fisher(model, params, data, loss_fn, kind="empirical", **kw)
        if self.hessian == "true_fisher":
            return curvature.diag_fisher(
                model, params, data, loss_fn, kind="true", mc_samples=self.mc_samples,
                seed=self.seed, **kw,
            )  # fmt: skip
        if self.hessian == "ggn":
            return curvature.diag_ggn(
                model, params, data, loss_fn, exact=self.exact_ggn, mc_samples=self.mc_samples,
                seed=self.seed, backend=self.backend, **kw,
            )  # fmt: skip
        if self.hessian in ("kfac", "kfac_true"):
            from saliency import kfac

            fisher = "true" if self.hessian == "kfac_true" else "empirical"
            K = kfac.kfac_factors(
                model, params, data, loss_fn, fisher=fisher, mc_samples=self.mc_samples,
                seed=self.seed, damp=0.0, **kw,
            )  # fmt: skip
            return curvature.DiagCurvature(
                {n: f.diag().to(params[n]) for n, f in K.factors.items()},
                samples=K.samples, backward_passes=K.backward_passes,
            )  # fmt: skip
        if self.hessian == "hutchinson":
            return curvature.diag_hessian_hutchinson(
                model, params, data, loss_fn, n_probes=self.n_probes, seed=self.seed, **kw
            )
        backend = "autograd" if self.backend == "torch" else self.backend
        return curvature.diag_hessian_exact(
            model, params, data, loss_fn, backend=backend, max_params=self.max_params, **kw
        )

    def score(self, model, params, data, loss_fn=None) -> Scores:
        with preserve_model_state(model):
            if self.eval_mode:
                model.eval()
            H = self.curvature(model, params, data, loss_fn)
        rtol = negligible.SECOND_DERIVATIVES if self.hessian in _LINEAR else negligible.SQUARES
        D = negligible.zero_negligible(dict(H), rtol)  # round-off curvature: exactly 0
        scores = Scores({n: 0.5 * D[n] * p.detach() ** 2 for n, p in params.items()})
        scores.cost.samples = H.samples
        scores.cost.backward_passes = H.backward_passes
        scores.extra["hessian_diag"] = D
        return scores
