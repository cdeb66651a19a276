"""Kronecker-factored curvature (K-FAC) of Linear and Conv1d/2d weights, for OBD and OBS.

transformers' Conv1D (weight ``[in, out]``, ``x @ W + b``) is its Linear: the factors below are
those of ``W.T``, and ``KroneckerFactors`` takes and gives tensors in the weight's own shape.

K-FAC (Martens & Grosse 2015; KFC for convolutions, Grosse & Martens 2016; used for pruning by
EigenDamage, Wang et al. 2019) approximates the Fisher block of a layer with weight
``W [out, in]`` (convolutions: ``in = C_in * prod(kernel)``) by a Kronecker product

    F_W ~ A (x) G,   A = (1/m) sum_n (1/T) sum_t a_nt a_nt^T,   G = (1/m) sum_n sum_t g_nt g_nt^T,

``a_nt`` the layer's input at position t (a patch for convolutions, T positions per sample),
``g_nt = dl_n / ds_nt`` the gradient of sample n's own loss w.r.t. the layer's output there,
m samples. In the row-major vec of ``W``: ``F[(j, i), (j', i')] = G[j, j'] A[i, i']``, so that
``F vec(V) = vec(G V A)``. ``fisher="empirical"`` uses the data's labels, ``"true"`` labels
drawn from the model (``mc_samples`` per sample).

What it is. For a Linear on ``[B, in]`` (one position) and a loss with constant output Hessian
(least squares) and the true Fisher, ``A (x) G`` is the GGN exactly when the layer has one
output (``G`` is a scalar); with several outputs, K-FAC assumes ``a`` and ``g`` independent. With
the empirical Fisher on least squares and one output, ``A (x) G`` is the Hessian times a scalar.
Over positions (a Linear on ``[B, L, D]``, convolutions) it further assumes positions
uncorrelated (K-FAC "expand", Eschenhagen et al. 2023). Elsewhere it is an approximation only.

Refused (``ValueError`` naming the parameter): a target that is not the weight of an
``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` with its own ``forward`` (biases, attention's
``in_proj_weight``, ConvTranspose, embeddings), a weight held by two modules, a layer run more
or less than once per forward, a layer whose sample axis the two-sample probe does not prove
(``saliency.fastpaths.probe``), grouped convolutions, and models that mix samples.

Inverse. ``A = U_A diag(s_A) U_A^T``, ``G = U_G diag(s_G) U_G^T`` (eigendecompositions), so
``(A (x) G + lambda I)^-1 vec(V) = vec(U_G [(U_G^T V U_A) / (s_G s_A^T + lambda)] U_A^T)`` and its
diagonal is ``(U_G^2) [1 / (s_G s_A^T + lambda)] (U_A^2)^T``; the full matrix is never formed.
``lambda = damp * mean(diag A) * mean(diag G) + damp_absolute``: relative to the layer's mean
Fisher diagonal, as the block inverse (``saliency.inverse_fisher``), floored relative to the
mean K-FAC diagonal over all targets.

Curvature of round-off (``saliency.negligible``). An input j whose column of the K-FAC diagonal
is negligible (``A_jj max(diag G)``, against the mean K-FAC diagonal ``G_ii A_jj`` over all
targets), and likewise an output i (``G_ii max(diag A)``), has its row and column of A (of G)
set to exactly 0: the weights it touches are decoupled, score 0 and move no other weight.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from saliency import distributed, fastpaths, negligible
from saliency.model_io import (
    LossFn,
    default_loss,
    forward,
    iter_batches,
    model_device,
    per_sample_losses,
    resolve_loss,
)
from saliency.per_sample import _delta_factor, _input_factor, _linear, check_params, requiring_grad
from saliency.targets import is_transposed_linear, transposed_linear_types

log = logging.getLogger(__name__)

_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)


def stable_eigh(M: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` of a symmetric PSD factor that does not crash on rank deficiency.

    LAPACK's divide-and-conquer ``syevd`` occasionally fails to converge on large factors of
    low rank (a 4608 x 4608 A of rank 16 from 16 samples: about 1 draw in 6). On failure the
    factor is symmetrised in float64 and shifted by a tiny relative jitter ``eps = 1e-10 x
    mean(diag M)`` (then 1e-8, 1e-6): the eigenvectors are those of the jittered matrix and the
    jitter is subtracted from the eigenvalues, so the result differs from an exact
    decomposition by far less than the damping that every use adds. Returned in M's dtype."""
    try:
        return torch.linalg.eigh(M)
    except torch.linalg.LinAlgError as err:
        first = err
    S = (M.double() + M.double().T) / 2
    scale = float(torch.diagonal(S).abs().mean()) or 1.0
    eye = torch.eye(len(S), dtype=S.dtype, device=S.device)
    for rel in (1e-10, 1e-8, 1e-6):
        try:
            s, U = torch.linalg.eigh(S + rel * scale * eye)
        except torch.linalg.LinAlgError:
            continue
        log.warning(
            "K-FAC: eigh of a %d x %d factor failed to converge; used float64 with a relative "
            "jitter of %g (eigenvalues shifted back)",
            len(M),
            len(M),
            rel,
        )
        return (s - rel * scale).to(M.dtype), U.to(M.dtype)
    raise ValueError(
        f"K-FAC: eigh of a {len(M)} x {len(M)} factor failed even in float64 with a relative "
        "jitter of up to 1e-6 (is the factor finite?); use hessian='fisher' or more samples"
    ) from first


@dataclass
class KroneckerFactors:
    """``A [in, in]``, ``G [out, out]`` of one layer's weight ``[out, *]`` (float64), their
    eigendecompositions, the damping ``lambda`` and the weight's shape. ``transposed``: the
    weight is stored ``[in, out]`` (transformers' Conv1D); methods take and give tensors in the
    weight's own shape, ``as_matrix`` views them as ``[out, in]``."""

    A: Tensor
    G: Tensor
    shape: torch.Size
    damping: float = 0.0
    live: Tensor | None = None  # [out, in] bool: False where the curvature is negligible
    transposed: bool = False

    def __post_init__(self) -> None:
        self.sA, self.UA = stable_eigh(self.A)
        self.sG, self.UG = stable_eigh(self.G)
        # tiny negative eigenvalues from rounding of a PSD matrix
        self.sA, self.sG = self.sA.clamp(min=0), self.sG.clamp(min=0)

    def live_mask(self) -> Tensor:
        """``[out, in]`` True where the weight's curvature is not negligible."""
        if self.live is None:
            return torch.ones(len(self.G), len(self.A), dtype=torch.bool, device=self.A.device)
        return self.live

    def as_matrix(self, v: Tensor) -> Tensor:
        """A tensor shaped like the weight as ``[out, in]`` (float64)."""
        v = v.to(self.A.dtype)
        return v.T if self.transposed else v.reshape(self.shape[0], -1)

    def from_matrix(self, M: Tensor) -> Tensor:
        """Inverse of ``as_matrix``."""
        return M.T.contiguous() if self.transposed else M.reshape(self.shape)

    def diag(self) -> Tensor:
        """``diag(A (x) G) + lambda``, shaped like the weight."""
        d = torch.outer(torch.diagonal(self.G), torch.diagonal(self.A)) + self.damping
        return self.from_matrix(d)

    def matvec(self, V: Tensor) -> Tensor:
        """``(A (x) G + lambda I) vec(V)`` as ``G V A + lambda V``."""
        V = self.as_matrix(V)
        return self.from_matrix(self.G @ V @ self.A + self.damping * V)

    def inv_diag(self) -> Tensor:
        """``diag((A (x) G + lambda I)^-1)``, shaped like the weight."""
        M = 1.0 / self._eig()
        return self.from_matrix((self.UG**2) @ M @ (self.UA**2).T)

    def row_inverse(self, rows: slice) -> Tensor:
        """The diagonal blocks of ``(A (x) G + lambda I)^-1`` for ``rows`` of ``as_matrix(W)``,
        ``[r, in, in]``: block j is ``U_A diag(c_j) U_A^T`` with ``c = (U_G^2) / (s_G s_A^T +
        lambda)`` summed over G's eigenvectors; exact sub-blocks of the K-FAC inverse."""
        c = (self.UG[rows] ** 2) @ (1.0 / self._eig())  # [r, in]
        return (self.UA[None] * c[:, None, :]) @ self.UA.T[None]

    def _eig(self) -> Tensor:
        e = torch.outer(self.sG, self.sA) + self.damping
        if bool((e <= 0).any()):
            raise ValueError(
                f"the K-FAC curvature of a {tuple(self.shape)} weight is singular: pass damp "
                "(relative) or damp_absolute > 0, or use more samples than inputs"
            )
        return e


@dataclass
class KFAC:
    """Per-parameter Kronecker factors, with what they cost."""

    factors: dict[str, KroneckerFactors]
    samples: int = 0
    backward_passes: int = 0
    state: dict[str, tuple[float, float]] = field(default_factory=dict)


def _owners(model: nn.Module, params: Mapping[str, Tensor]) -> dict[str, nn.Module]:
    """name -> the Linear/Conv module whose ``weight`` it is; refuses anything else."""
    holders: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        for attr, p in m._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append((mname, m, attr))
    out = {}
    for n, p in params.items():
        own = holders.get(id(p), [])
        if len({id(m) for _, m, _ in own}) != 1 or len(own) != 1:
            where = ", ".join(repr(mn) for mn, _, _ in own)
            raise ValueError(
                f"K-FAC needs {n!r} held by exactly one module, once; it is held by {where}: "
                "the Kronecker factors of a shared weight are undefined (use hessian='fisher')"
            )
        _, m, attr = own[0]
        why = fastpaths.closed_form_reason(m, attr)
        if why is None and attr != "weight":
            why = "K-FAC covers layer weights, not biases"
        if why is None and not isinstance(m, _TYPES + transposed_linear_types()):
            why = f"no K-FAC factors for {type(m).__name__}"
        if why is None and getattr(m, "groups", 1) != 1:
            why = f"grouped convolution (groups={m.groups}) has one Kronecker product per group"
        if why is not None:
            raise ValueError(
                f"K-FAC cannot factor {n!r} ({type(m).__name__}.{attr}): {why}. K-FAC covers "
                "weights of nn.Linear and nn.Conv1d/2d (groups=1), and transformers' Conv1D; "
                "use hessian='fisher' (block WoodFisher) or exclude the parameter"
            )
        out[n] = m
    return out


def kfac_factors(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    data: Iterable,
    loss_fn: LossFn = default_loss,
    *,
    fisher: Literal["empirical", "true"] = "empirical",
    n_samples: int | None = 1024,
    mc_samples: int = 1,
    seed: int = 0,
    damp: float = 1e-2,
    damp_absolute: float = 0.0,
) -> KFAC:
    """K-FAC factors of every target weight (module docstring), accumulated in float64 from
    one forward and one backward per batch (``mc_samples`` backwards for the true Fisher). The
    model's ``.grad``, mode and ``requires_grad`` are left as they were; call it in ``eval()``."""
    from saliency.curvature import _generator, _sample_targets

    if fisher not in ("empirical", "true"):
        raise ValueError(f"fisher must be 'empirical' or 'true'; got {fisher!r}")
    if not (damp >= 0 and damp_absolute >= 0):
        raise ValueError(f"damp and damp_absolute must be >= 0; got {damp!r}, {damp_absolute!r}")
    if not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"mc_samples must be a positive int; got {mc_samples!r}")
    params = dict(params)
    check_params(model, params)
    fastpaths.check_per_sample(model)
    owners = _owners(model, params)
    mods = {m: n for n, m in owners.items()}
    dev = model_device(model)
    gen = _generator(seed, dev)
    A = {n: 0.0 for n in params}
    G = {n: 0.0 for n in params}
    m_total, passes = 0, 0
    for batch in iter_batches(data, n_samples, device=dev):
        loss_fn, y = resolve_loss(loss_fn, model, batch), batch.targets
        fastpaths.require_sample_axis(
            model, batch, mods,
            "K-FAC cannot factor {name}: the two-sample probe did not prove that its layer "
            "carries the samples on dim 0 of its input and output, once per forward (a layer on "
            "transposed/reshaped tensors, or run twice); use hessian='fisher'",
        )  # fmt: skip
        calls: dict[nn.Module, list[tuple[Tensor, Tensor]]] = {m: [] for m in mods}

        def hook(m, inputs, out, calls=calls):
            calls[m].append((inputs[0].detach(), out))

        handles = [m.register_forward_hook(hook) for m in mods]
        try:
            with requiring_grad(params):
                out = forward(model, batch)
        finally:
            for h in handles:
                h.remove()
        for m, c in calls.items():
            if len(c) != 1:
                raise ValueError(
                    f"K-FAC cannot factor {mods[m]!r}: its layer ran {len(c)} times in one "
                    "forward (its factors are undefined); use hessian='fisher'"
                )
        outs = [calls[m][0][1] for m in mods]
        if fisher == "empirical":
            targets = [y]
        else:
            targets = [
                _sample_targets(out.detach(), y, loss_fn, "auto", gen) for _ in range(mc_samples)
            ]
        for k, t in enumerate(targets):
            with torch.enable_grad():
                loss = per_sample_losses(loss_fn, out, t).sum()
                grads = torch.autograd.grad(
                    loss, outs, retain_graph=k < len(targets) - 1, allow_unused=True
                )
            passes += 1
            for (m, n), g, o in zip(mods.items(), grads, outs, strict=True):
                g = torch.zeros_like(o) if g is None else g
                d = _delta_factor(m, g.detach()).to(torch.float64)  # [B, T, out] or [B,1,out,L]
                if not _linear(m):
                    d = d[:, 0].transpose(1, 2)  # [B, L, out]
                G[n] = G[n] + torch.einsum("bto,btp->op", d, d) / len(targets)
        tokens = batch.token_mask
        for m, n in mods.items():
            a = _input_factor(m, calls[m][0][0]).to(torch.float64)
            if not _linear(m):
                a = a[:, 0].transpose(1, 2)  # [B, L, in * k]
            A[n] = A[n] + _input_second_moment(a, tokens)
        m_total += len(batch)
    if distributed.world() is not None:  # sums and counts over every rank's samples
        A = distributed.all_reduce_dict(
            {n: torch.as_tensor(A[n], dtype=torch.float64) for n in params}
        )
        G = distributed.all_reduce_dict(
            {n: torch.as_tensor(G[n], dtype=torch.float64) for n in params}
        )
        m_total, passes = distributed.sum_counts(m_total, passes)
    if m_total == 0:
        raise ValueError("data yielded no samples")
    A = {n: A[n] / m_total for n in params}
    G = {n: G[n] / m_total for n in params}
    mean = {n: float(torch.diagonal(A[n]).mean() * torch.diagonal(G[n]).mean()) for n in params}
    s = sum(mean[n] * p.numel() for n, p in params.items()) / sum(
        p.numel() for p in params.values()
    )
    factors = {}
    for n, p in params.items():
        An, Gn, live = _decouple_negligible(A[n], G[n], s)
        lam = damp * negligible.floored(mean[n], s) + damp_absolute
        transposed = is_transposed_linear(owners[n])
        factors[n] = KroneckerFactors(An, Gn, p.shape, lam, live, transposed)
    from saliency.inverse_fisher import _fingerprint

    return KFAC(factors, m_total, passes, _fingerprint(params))


def _input_second_moment(a: Tensor, tokens: Tensor | None) -> Tensor:
    """``sum_n (1/T_n) sum_t a_nt a_nt^T`` over ``a [B, T, in]``: T_n the sample's unpadded
    positions where ``tokens [B, T]`` (``Batch.token_mask``) lines up with them, else all T."""
    if tokens is None or tuple(tokens.shape) != tuple(a.shape[:2]):
        return torch.einsum("bti,btj->ij", a, a) / a.shape[1]
    w = tokens.to(a) / tokens.sum(1, keepdim=True).clamp(min=1).to(a)
    return torch.einsum("bt,bti,btj->ij", w, a, a)


def _decouple_negligible(A: Tensor, G: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """A and G with the rows and columns of negligible inputs / outputs zeroed (module
    docstring), and the ``[out, in]`` mask of the weights left with curvature."""
    dA, dG = torch.diagonal(A), torch.diagonal(G)
    live_in = ~negligible.negligible(dA * dG.max(), scale)
    live_out = ~negligible.negligible(dG * dA.max(), scale)
    A = A * (live_in[:, None] & live_in[None, :])
    G = G * (live_out[:, None] & live_out[None, :])
    return A, G, live_out[:, None] & live_in[None, :]


def masked_solve(
    f: KroneckerFactors,
    w: Tensor,
    keep: Tensor,
    *,
    tol: float = 1e-8,
    max_iter: int = 2000,
) -> Tensor:
    """The OBS update within one layer under K-FAC: the weights ``w + dw`` minimizing
    ``1/2 dw^T (A (x) G + lambda I) dw`` subject to ``(w + dw)[~keep] = 0`` (Hassibi & Stork
    1993, jointly over every removed weight). Solved by conjugate gradients on the kept
    coordinates, ``H_KK u = -(H d0)_K`` with ``d0 = -w`` off K, using only Kronecker products
    (``G V A``), Jacobi-preconditioned; a warning is logged if it stops short of ``tol``."""
    w = w.to(torch.float64)
    K = keep.to(torch.float64).reshape(w.shape)
    d0 = -w * (1 - K)
    b = -f.matvec(d0) * K
    pre = torch.where(K.bool(), 1.0 / f.diag().clamp(min=1e-300), 0.0)
    u = torch.zeros_like(w)
    r = b.clone()
    z = pre * r
    p = z.clone()
    rz = float((r * z).sum())
    b_norm = float(b.norm()) + 1e-300
    for _ in range(max_iter):
        if float(r.norm()) <= tol * b_norm:
            break
        Hp = f.matvec(p) * K
        alpha = rz / float((p * Hp).sum())
        u += alpha * p
        r -= alpha * Hp
        z = pre * r
        rz_new = float((r * z).sum())
        p = z + (rz_new / rz) * p
        rz = rz_new
    else:
        log.warning(
            "K-FAC OBS update: conjugate gradients stopped at relative residual %.2e after %d "
            "iterations (raise damp for a better conditioned system)",
            float(r.norm()) / b_norm,
            max_iter,
        )
    return (w + d0 + u) * K
