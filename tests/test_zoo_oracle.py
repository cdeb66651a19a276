"""Every estimator and criterion on every architecture of the zoo, against references written
here with plain per-sample autograd loops (never `functional_call`), in float64.

Each estimator is a pair (library call, reference); each architecture either matches the
reference to 1e-8 (relative to the reference's largest entry) or raises the documented refusal
listed in `REFUSED`. A new estimator joins `ESTIMATORS` and is checked on every architecture.
"""

from __future__ import annotations

import contextlib
import copy
import re

import pytest
import torch
from arch_zoo import ARCH_IDS, ARCHS, _logits, loop_grads, loop_losses
from torch.nn.attention import SDPBackend, sdpa_kernel

import saliency
from saliency import curvature as C
from saliency import inverse_fisher as IF
from saliency import per_sample as P

TOL = 1e-8
MIXES = "track_running_stats=False"

# ----------------------------------------------------------------------------- references


@contextlib.contextmanager
def requiring(ps):
    """Gradients for the references, whatever the model's requires_grad (frozen layers)."""
    saved = [(p, p.requires_grad) for p in ps]
    try:
        with torch.enable_grad():
            for p in ps:
                p.requires_grad_(True)
            yield
    finally:
        for p, r in saved:
            p.requires_grad_(r)


@contextlib.contextmanager
def smooth_hardsigmoid(model):
    """The references' own twice-differentiable Hardsigmoid, relu6(x + 3) / 6 (torch has no
    double backward for aten::hardsigmoid_backward; the library swaps in a clamp)."""
    mods = [m for m in model.modules() if type(m) is torch.nn.Hardsigmoid]
    try:
        for m in mods:
            m.forward = lambda x: torch.nn.functional.relu6(x + 3) / 6
        yield
    finally:
        for m in mods:
            del m.forward


def _grad_or_zeros(out, ps, **kw):
    gs = torch.autograd.grad(out, ps, allow_unused=True, **kw)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(ps, gs, strict=True)]


class Ref:
    """Brute-force quantities of one (model, params, batch, loss), computed lazily."""

    def __init__(self, model, params, x, y, loss):
        self.model, self.params, self.x, self.y, self.loss = model, params, x, y, loss
        self.names = list(params)
        self.ps = [params[n] for n in self.names]
        self.N = len(x)
        self._cache = {}

    def __getattr__(self, key):
        if key.startswith("_") or key not in type(self).__dict__.get("_lazy", ()):
            raise AttributeError(key)
        if key not in self._cache:
            # first derivatives on the model as built (torch's Hardsigmoid backward multiplies
            # by 1/6 rounded to float32, 3e-8 off, also in float64: the library differentiates
            # that model); the Hessian needs a double backward, hence the smooth Hardsigmoid
            smooth = smooth_hardsigmoid if key == "hessian" else lambda m: contextlib.nullcontext()
            with requiring(self.ps), smooth(self.model):
                self._cache[key] = getattr(self, "_" + key)()
        return self._cache[key]

    _lazy = ("grads", "hessian", "ggn")

    def split(self, flat):
        out, i = {}, 0
        for n, p in zip(self.names, self.ps, strict=True):
            out[n] = flat[i : i + p.numel()].view_as(p)
            i += p.numel()
        return out

    def _grads(self):
        return loop_grads(self.model, self.params, self.x, self.y, self.loss)

    def _hessian(self):
        """Full Hessian of (1/N) sum_n l_n over all params, one double backward per row."""
        with sdpa_kernel([SDPBackend.MATH]):  # fused attention kernels have no double backward
            return self._hessian_rows()

    def _hessian_rows(self):
        L = sum(loop_losses(self.model, self.x, self.y, self.loss)) / self.N
        g = torch.cat([t.reshape(-1) for t in _grad_or_zeros(L, self.ps, create_graph=True)])
        rows = []
        for i in range(len(g)):
            if g.requires_grad:
                r = _grad_or_zeros(g[i], self.ps, retain_graph=True)
                rows.append(torch.cat([t.reshape(-1) for t in r]))
            else:
                rows.append(torch.zeros_like(g))
        return torch.stack(rows).detach()

    def out_hessian(self, n):
        with requiring(self.ps):
            return self._out_hessian(n)

    def _out_hessian(self, n):
        out = _logits(self.model(self.x[n : n + 1])).detach()
        f = lambda o: self.loss(o.reshape(out.shape), self.y[n : n + 1])
        return torch.autograd.functional.hessian(f, out.reshape(-1))

    def jacobian(self, n):
        with requiring(self.ps):
            return self._jacobian(n)

    def _jacobian(self, n):
        out = _logits(self.model(self.x[n : n + 1])).reshape(-1)
        rows = [
            torch.cat([t.reshape(-1) for t in _grad_or_zeros(out[k], self.ps, retain_graph=True)])
            for k in range(len(out))
        ]
        return torch.stack(rows)  # [outputs, P]

    def _ggn(self):
        G = 0
        for n in range(self.N):
            J, H = self._jacobian(n), self._out_hessian(n)
            G = G + ((H @ J) * J).sum(0)
        return self.split(G / self.N)


def _close(got, ref, tol=TOL, scale=None):
    """Max error relative to ``scale`` (default: the reference's largest entry)."""
    scale = (float(ref.abs().max()) if scale is None else scale) + 1e-30
    err = float((got.double() - ref.double()).abs().max()) / scale
    assert got.shape == ref.shape and err <= tol, f"relative error {err:.2e} > {tol:.0e}"


def _close_dicts(got, ref, tol=TOL):
    """Every tensor relative to the largest entry of all (an entry that is zero in exact
    arithmetic, e.g. a bias a softmax is invariant to, is rounding noise around 0)."""
    assert set(got) == set(ref)
    scale = max(float(r.abs().max()) for r in ref.values())
    for n in ref:
        try:
            _close(got[n], ref[n], tol, scale)
        except AssertionError as e:
            raise AssertionError(f"{n}: {e}") from None


# ----------------------------------------------------------------------------- estimators


def per_sample_grads(model, params, x, y, loss, ref):
    _close_dicts(P.per_sample_grads(model, params, x, y, loss), ref.grads)


def sum_grad_squared(model, params, x, y, loss, ref):
    got = P.sum_grad_squared(model, params, x, y, loss)
    _close_dicts(got, {n: g.pow(2).sum(0) for n, g in ref.grads.items()})


def fisher_empirical(model, params, x, y, loss, ref):
    got = C.diag_fisher(model, params, [(x, y)], loss)
    _close_dicts(got, {n: g.pow(2).mean(0) for n, g in ref.grads.items()})


def fisher_true(model, params, x, y, loss, ref):
    mc = 2
    got = C.diag_fisher(model, params, [(x, y)], loss, kind="true", mc_samples=mc, seed=3)
    gen = torch.Generator().manual_seed(3)  # the library's draws, replayed
    out = _logits(model(x)).detach()
    targets = [C._sample_targets(out, y, loss, "auto", gen) for _ in range(mc)]
    want = {n: 0 for n in params}
    for t in targets:
        for n, g in loop_grads(model, params, x, t, loss).items():
            want[n] = want[n] + g.pow(2).sum(0) / (len(x) * mc)
    _close_dicts(got, want)


def ggn(backend):
    def run(model, params, x, y, loss, ref):
        _close_dicts(C.diag_ggn(model, params, [(x, y)], loss, backend=backend), ref.ggn)

    run.__name__ = f"ggn_{backend}"
    return run


def ggn_monte_carlo(model, params, x, y, loss, ref):
    mc = 2
    got = C.diag_ggn(model, params, [(x, y)], loss, exact=False, mc_samples=mc, seed=5)
    out = _logits(model(x)).detach()
    S = C._loss_hessian_sqrt(loss, out, y)  # the library's square root, checked here
    gen = torch.Generator().manual_seed(5)
    eps = [torch.randint(0, 2, S.shape[::2], generator=gen).double() * 2 - 1 for _ in range(mc)]
    G = 0
    for n in range(len(x)):
        _close(S[n] @ S[n].T, ref.out_hessian(n))
        J = ref.jacobian(n)
        for e in eps:
            G = G + (J.T @ (S[n] @ e[n])) ** 2
    _close_dicts(got, ref.split(G / (len(x) * mc)))


def hessian_diag(backend):
    def run(model, params, x, y, loss, ref):
        got = C.diag_hessian_exact(model, params, [(x, y)], loss, backend=backend)
        _close_dicts(got, ref.split(torch.diagonal(ref.hessian)))

    run.__name__ = f"hessian_{backend}"
    return run


def hutchinson(model, params, x, y, loss, ref):
    K = 3
    got = C.diag_hessian_hutchinson(model, params, [(x, y)], loss, n_probes=K, seed=7)
    # the library's probes, replayed: one per parameter whose gradient depends on the weights
    with requiring(ref.ps), sdpa_kernel([SDPBackend.MATH]), smooth_hardsigmoid(model):
        L = sum(loop_losses(model, x, y, loss))
        gs = torch.autograd.grad(L, ref.ps, create_graph=True, allow_unused=True)
    live = [i for i, g in enumerate(gs) if g is not None and g.requires_grad]
    gen = torch.Generator().manual_seed(7)
    acc = torch.zeros(sum(p.numel() for p in ref.ps), dtype=torch.float64)
    offsets = torch.tensor([0] + [p.numel() for p in ref.ps]).cumsum(0)
    for _ in range(K):
        z = torch.zeros_like(acc)
        for i in live:
            zi = 2.0 * torch.randint(0, 2, ref.ps[i].shape, generator=gen).double() - 1
            z[offsets[i] : offsets[i + 1]] = zi.reshape(-1)
        acc += z * (ref.hessian @ z)
    _close_dicts(got, ref.split(acc / K))


def _ref_negligible(ref, n):
    """Weights of ``n`` whose Fisher diagonal is at most 1e-10 of the mean over the nonzero
    weights of all parameters: zero up to round-off (an attention key bias), never inverted."""
    diag = {k: (g.reshape(ref.N, -1) ** 2).mean(0) for k, g in ref.grads.items()}
    alive = {k: p.detach().reshape(-1) != 0 for k, p in ref.params.items()}
    scale = sum(float(diag[k][alive[k]].sum()) for k in diag) / sum(
        int(a.sum()) for a in alive.values()
    )
    return diag[n] <= 1e-10 * scale


def _ref_block_inverse(ref, n, block, damp, scope="layer"):
    """WoodFisher blocks conditioned on the nonzero weights (zeros count as pruned) of
    non-negligible curvature, damped by ``damp`` times the mean alive Fisher diagonal of the
    tensor (``scope="layer"``) or of the block (``"block"``, a dead block borrowing the
    tensor's)."""
    alive = (ref.params[n].detach().reshape(-1) != 0) & ~_ref_negligible(ref, n)
    G = ref.grads[n].reshape(ref.N, -1) * alive
    P_ = G.shape[1]
    nb = -(-P_ // block)
    G = torch.nn.functional.pad(G, (0, nb * block - P_)).view(ref.N, nb, block)
    alive = torch.nn.functional.pad(alive, (0, nb * block - P_)).view(nb, block)
    out = []
    whole = (G**2).sum(0)[alive].mean() / ref.N
    for b in range(nb):
        F = G[:, b].T @ G[:, b] / ref.N
        mean = torch.diagonal(F)[alive[b]].mean()
        lam = damp * (mean if mean > 0 and scope == "block" else whole)
        out.append(torch.linalg.inv(F + torch.diag(torch.where(alive[b], lam, 1.0))))
    return torch.stack(out)


def obs_fisher_blocks(model, params, x, y, loss, ref):
    for scope in ("layer", "block"):
        inv = IF.block_inverse_fisher(
            model, params, [(x, y)], loss, block_size=8, damp=1e-2, dtype="float64",
            damp_scope=scope,
        )  # fmt: skip
        for blk in inv.blocks:
            (n,) = blk.names
            _close(blk.Hinv, _ref_block_inverse(ref, n, 8, 1e-2, scope))


def obs_exact_hessian(model, params, x, y, loss, ref):
    alive = torch.cat([p.detach().reshape(-1) != 0 for p in ref.ps])  # zeros count as pruned
    H = ref.hessian * (alive[:, None] & alive[None, :])
    scale = float(torch.diagonal(H)[alive].abs().mean())  # rows of round-off: as pruned
    alive &= H.abs().amax(1) > 1e-5 * scale
    H = ref.hessian * (alive[:, None] & alive[None, :])
    lam = float(torch.linalg.eigvalsh(H).abs().max()) + 1.0  # definite whatever the model
    inv = IF.exact_inverse_hessian(model, params, [(x, y)], loss, damp_absolute=lam)
    damping = alive.to(H.dtype) * lam + (~alive).to(H.dtype)
    _close(inv.blocks[0].Hinv[0], torch.linalg.inv(H + torch.diag(damping)))


def _patches(m, a):
    """``[T, C_in * k]`` input patches of one sample ``a [1, C, *spatial]`` of a Conv1d/2d,
    padded as the module pads (for the K-FAC reference)."""
    pad = m._reversed_padding_repeated_twice
    if any(pad):
        a = torch.nn.functional.pad(
            a, pad, mode="constant" if m.padding_mode == "zeros" else m.padding_mode
        )
    k, d, st = m.kernel_size, m.dilation, m.stride
    if isinstance(m, torch.nn.Conv1d):
        a, k, d, st = a.unsqueeze(2), (1, *k), (1, *d), (1, *st)
    return torch.nn.functional.unfold(a, k, dilation=d, stride=st)[0].T


def kfac(model, params, x, y, loss, ref):
    """K-FAC factors A = (1/N) sum_n (1/T) sum_t a a^T, G = (1/N) sum_n sum_t g g^T of the
    prunable weights, from a loop over samples (layer input and d l_n / d output by hooks),
    and OBS's K-FAC saliency w^2 / (2 [(A (x) G + lambda I)^-1]_qq) from them, and its greedy
    scores on each output row's block of that explicit inverse, and obs_channel's row costs."""
    from saliency import kfac as K

    ps = {n: p for n, p in saliency.prunable_parameters(model).items() if n in params}
    got = K.kfac_factors(model, ps, [(x, y)], loss, damp=1e-2)
    mods = {n: model.get_submodule(n.rsplit(".", 1)[0]) for n in ps}
    A = {n: 0 for n in ps}
    G = {n: 0 for n in ps}
    with requiring(list(ps.values())):
        for i in range(len(x)):
            seen = {}
            hs = [m.register_forward_hook(lambda m, a, o, n=n, seen=seen: seen.__setitem__(n, (a[0], o)))
                  for n, m in mods.items()]  # fmt: skip
            try:
                li = loss(_logits(model(x[i : i + 1])), y[i : i + 1])
            finally:
                for h in hs:
                    h.remove()
            gs = _grad_or_zeros(li, [seen[n][1] for n in ps])
            for (n, m), g in zip(mods.items(), gs, strict=True):
                a = seen[n][0].detach()
                if isinstance(m, torch.nn.Linear):
                    a, g = a.reshape(-1, m.in_features), g.reshape(-1, m.out_features)
                else:
                    a, g = _patches(m, a), g[0].reshape(m.out_channels, -1).T
                A[n] = A[n] + a.T @ a / len(a) / len(x)
                G[n] = G[n] + g.T @ g / len(x)
    from saliency.criteria.obs import greedy_scores

    kw = {"params": ps, "hessian": "kfac"}
    single = saliency.score(model, "obs", [(x, y)], loss, selection="single", **kw)
    greedy = saliency.score(model, "obs", [(x, y)], loss, **kw)  # default: greedy per row
    channel = saliency.score(model, "obs_channel", [(x, y)], loss, params=ps)  # K-FAC default
    # inputs (outputs) whose column (row) of the K-FAC diagonal G_ii A_jj is at most 1e-10 of its
    # mean over all layers: round-off, decoupled and scored 0
    mean = {n: float(torch.diagonal(A[n]).mean() * torch.diagonal(G[n]).mean()) for n in ps}
    scale = sum(mean[n] * p.numel() for n, p in ps.items()) / sum(p.numel() for p in ps.values())
    for n, p in ps.items():
        dA, dG = torch.diagonal(A[n]), torch.diagonal(G[n])
        live_in, live_out = dA * dG.max() > 1e-10 * scale, dG * dA.max() > 1e-10 * scale
        A[n] = A[n] * (live_in[:, None] & live_in[None, :])
        G[n] = G[n] * (live_out[:, None] & live_out[None, :])
        live = (live_out[:, None] & live_in[None, :]).view_as(p)
        _close(got.factors[n].A, A[n])
        _close(got.factors[n].G, G[n])
        lam = 1e-2 * max(mean[n], 1e-10 * scale)
        H = torch.kron(G[n], A[n]) + lam * torch.eye(A[n].shape[0] * G[n].shape[0])
        Hinv = torch.linalg.inv(H)
        d = torch.diagonal(Hinv).view_as(p)
        _close(single[n], torch.where(live, p.detach() ** 2 / (2 * d), 0), 1e-6)
        w, k = p.detach().reshape(len(G[n]), -1).double(), len(A[n])
        live = live.reshape(w.shape)
        blocks = torch.stack([Hinv[k * j : k * j + k, k * j : k * j + k] for j in range(len(w))])
        want = greedy_scores(blocks, w, (w != 0) & live).view_as(p)
        _close(greedy[n], want, 1e-5)
        # obs_channel (K-FAC): 1/2 w_c^T (Hinv[c, c])^-1 w_c per output row c over its nonzero
        # weights, an equal share on each weight of the row
        cost = []
        for j in range(len(w)):
            q = (torch.arange(len(w) * k) // k == j) & (w.reshape(-1) != 0) & live.reshape(-1)
            wq = w.reshape(-1)[q]
            cost.append(0.5 * wq @ torch.linalg.solve(Hinv[q][:, q].double(), wq))
        share = (torch.stack(cost) / k).view(-1, *[1] * (p.dim() - 1)).expand(p.shape)
        _close(channel[n], share, 1e-5)


ESTIMATORS = [
    per_sample_grads,
    sum_grad_squared,
    fisher_empirical,
    fisher_true,
    ggn("torch"),
    ggn("auto"),
    ggn_monte_carlo,
    hessian_diag("autograd"),
    hessian_diag("auto"),
    hutchinson,
    obs_fisher_blocks,
    obs_exact_hessian,
    kfac,
]

# (estimator or criterion, arch) -> regex of the refusal; "*" as arch: every arch
PER_SAMPLE = [e.__name__ for e in ESTIMATORS] + ["obd", "obs", "obs_exact", "taylor"]
REFUSED = {(e, "resnet_bn_batch_stats"): MIXES for e in PER_SAMPLE}
_UNPROVEN = "carry the samples on dim 0"
_ATTENTION = "is not the weight of one"  # MultiheadAttention.in_proj_weight: a raw Parameter
for _arch in ("encoder_seq_first", "encoder_batch_first", "vit_block", "cross_attention"):
    REFUSED["taylor", _arch] = _ATTENTION
for _arch in ("linear_transposed", "linear_reshaped", "learned_queries"):
    REFUSED["taylor", _arch] = "carry the samples on dim 0"
for _arch in ("shared_twice", "seq_registered_twice"):
    REFUSED["taylor", _arch] = "run once per forward"
for _arch in ("conv_transpose", "conv_transpose_grouped"):
    REFUSED["taylor", _arch] = "is not the weight of one"
_KFAC_TYPES = "K-FAC covers weights of nn.Linear and nn.Conv1d/2d"
for _arch, _why in {
    **dict.fromkeys(("encoder_seq_first", "encoder_batch_first", "vit_block"), _KFAC_TYPES),
    **dict.fromkeys(("cross_attention", "conv_transpose", "conv_transpose_grouped"), _KFAC_TYPES),
    "conv1d_3d": _KFAC_TYPES,
    "conv_variants": "groups=2",
    **dict.fromkeys(("mobile_se", "mobile_se_zero_init"), "groups=4"),
    **dict.fromkeys(("linear_transposed", "linear_reshaped", "learned_queries"), "did not prove"),
    **dict.fromkeys(("tied_lm_ignore_index", "tied_lm_sum"), "held by exactly one module"),
    **dict.fromkeys(("shared_twice", "seq_registered_twice"), "held by exactly one module"),
}.items():
    REFUSED["kfac", _arch] = _why
REFUSED["synflow", "tied_lm_ignore_index"] = REFUSED["synflow", "tied_lm_sum"] = "real-valued"


def _expect(name, arch):
    return REFUSED.get((name, arch.name))


@pytest.fixture(params=ARCHS, ids=ARCH_IDS)
def arch(request):
    return request.param


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=lambda e: e.__name__)
def test_estimator_matches_brute_force(arch, estimator):
    model, x, y = arch.make()
    params = dict(model.named_parameters())
    before = copy.deepcopy(model.state_dict())
    ref = Ref(model, params, x, y, arch.loss)
    why = _expect(estimator.__name__, arch)
    if why:
        with pytest.raises(ValueError, match=why):
            estimator(model, params, x, y, arch.loss, ref)
    else:
        estimator(model, params, x, y, arch.loss, ref)
    _untouched(model, params, before)


def _untouched(model, params, before):
    """Same Parameter objects, values, buffers, no .grad, requires_grad as built."""
    assert all(p is params[n] and p.is_leaf for n, p in model.named_parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_backpack_takes_the_sequential_models_it_supports_and_only_those():
    pytest.importorskip("backpack", reason="BackPACK is optional (pip install --no-deps ...)")
    for a in ARCHS:
        model, x, y = a.make()
        why = C.backpack_unsupported(model, a.loss, [(x, y)])
        assert (why is None) == ("backpack" in a.tags), (a.name, why)


def test_true_fisher_keeps_ignored_positions_ignored():
    out = torch.randn(2, 5, 3, dtype=torch.float64)
    y = torch.randint(0, 5, (2, 3))
    y[0, 1] = -100
    t = C._sample_targets(out, y, torch.nn.CrossEntropyLoss(), "auto", torch.Generator())
    assert t[0, 1] == -100 and bool((t[y != -100] >= 0).all())


# ----------------------------------------------------------------------------- criteria


def _taylor_ref(model, params, x, y, loss):
    """Per-sample loop: Theta_n = |mean over positions of a * dl_n/da| per output channel."""
    owners = {id(m.weight): m for m in model.modules() if hasattr(m, "weight")}
    total = {n: 0 for n in params}
    for i in range(len(x)):
        acts = {}

        def keep(n, acts=acts):  # the activation itself; a copy goes on (in-place activations)
            return lambda m, inp, out: (acts.__setitem__(n, out), out.clone())[1]

        hooks = [owners[id(p)].register_forward_hook(keep(n)) for n, p in params.items()]
        try:
            with requiring(list(params.values())):
                li = loss(_logits(model(x[i : i + 1])), y[i : i + 1])
                gs = torch.autograd.grad(li, [acts[n] for n in params])
        finally:
            for h in hooks:
                h.remove()
        for n, g in zip(params, gs, strict=True):
            a = acts[n]
            dim = 1 if isinstance(owners[id(params[n])], torch.nn.modules.conv._ConvNd) else -1
            prod = (a.detach() * g).movedim(dim, 1)
            total[n] = total[n] + prod.reshape(1, prod.shape[1], -1).mean(2).abs()[0]
    out = {}
    for n, p in params.items():
        s = total[n] / len(x)
        s = s / s.norm() if s.norm() > 0 else s  # all zero: a dead branch (mobile_se's SE)
        out[n] = s.view(-1, *[1] * (p.dim() - 1)).expand(p.shape)
    return out


def _batch_grad(model, params, x, y, loss, T=1.0):
    with requiring(list(params.values())):
        gs = _grad_or_zeros(loss(_logits(model(x)) / T, y), list(params.values()))
        return dict(zip(params, gs, strict=True))


def _grasp_ref(model, params, x, y, loss):
    ps = list(params.values())
    with requiring(ps), sdpa_kernel([SDPBackend.MATH]), smooth_hardsigmoid(model):
        L = loss(_logits(model(x)) / 200.0, y)
        g = _grad_or_zeros(L, ps, create_graph=True)
        z = sum((gi * gi.detach()).sum() for gi in g if gi.requires_grad)
        Hg = _grad_or_zeros(z, ps)
    raw = {n: p.detach() * h for (n, p), h in zip(params.items(), Hg, strict=True)}
    norm = abs(sum(float(s.sum()) for s in raw.values())) + 1e-10
    return {n: s / norm for n, s in raw.items()}


def _synflow_ref(model, params, x):
    lin = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for t in lin.state_dict().values():
            if t.is_floating_point():
                t.abs_()
    named = {id(p): n for n, p in model.named_parameters()}
    lp = dict(lin.named_parameters())
    ts = [lp[named[id(p)]] for p in params.values()]
    with requiring(ts):
        R = _logits(lin(torch.ones(1, *x.shape[1:], dtype=torch.float64))).sum()
        gs = _grad_or_zeros(R, ts)
    return {n: (g * t).abs() for n, g, t in zip(params, gs, ts, strict=True)}


def _obs_ref(ref, params, block):
    out = {}
    for n, p in params.items():
        Hinv = _ref_block_inverse(ref, n, block, 1e-2)
        d = torch.diagonal(Hinv, dim1=1, dim2=2).reshape(-1)[: p.numel()].view_as(p)
        live = (p.detach() != 0) & ~_ref_negligible(ref, n).view_as(p)
        out[n] = torch.where(live, p.detach() ** 2 / (2 * d), 0)
    return out


def _obs_greedy_ref(ref, params, block):
    """OBS's default selection: the greedy joint costs (``greedy_scores``, checked against a
    brute-force greedy search in test_obs.py) on the reference block inverses."""
    from saliency.criteria.obs import greedy_scores

    out = {}
    for n, p in params.items():
        w = p.detach().double().reshape(-1)
        pad = -len(w) % block
        w = torch.nn.functional.pad(w, (0, pad)).view(-1, block)
        live = torch.nn.functional.pad(~_ref_negligible(ref, n), (0, pad)).view(-1, block)
        g = greedy_scores(_ref_block_inverse(ref, n, block, 1e-2).double(), w, (w != 0) & live)
        out[n] = g.reshape(-1)[: p.numel()].view_as(p)
    return out


def _criteria():
    """name -> (hyperparameters, reference(model, params, x, y, loss, ref), tolerance).
    OBS and taylor return float32 scores: compared at float32 precision."""
    half_w2 = lambda H, params: {n: 0.5 * H[n] * p.detach() ** 2 for n, p in params.items()}
    return {
        "magnitude": ({}, lambda m, ps, x, y, loss, r: {n: p.abs() for n, p in ps.items()}, TOL),
        "obd": (
            {"hessian": "fisher"},
            lambda m, ps, x, y, loss, r: half_w2(
                {n: g.pow(2).mean(0) for n, g in r.grads.items()}, ps
            ),
            TOL,
        ),
        "obd_ggn": ({"hessian": "ggn"}, lambda m, ps, x, y, loss, r: half_w2(r.ggn, ps), TOL),
        "obs": (
            {"block_size": 8, "dtype": "float64", "selection": "single"},
            lambda m, ps, x, y, loss, r: _obs_ref(r, ps, 8),
            1e-6,
        ),
        "obs_greedy": (
            {"block_size": 8, "dtype": "float64", "selection": "greedy"},
            lambda m, ps, x, y, loss, r: _obs_greedy_ref(r, ps, 8),
            1e-6,
        ),
        "taylor": ({}, lambda m, ps, x, y, loss, r: _taylor_ref(m, ps, x, y, loss), 1e-6),
        "taylor_weight": (
            {},
            lambda m, ps, x, y, loss, r: {
                n: (g * ps[n].detach()).abs() for n, g in _batch_grad(m, ps, x, y, loss).items()
            },
            1e-6,
        ),
        "snip": ({"eval_mode": True}, None, 1e-6),
        "grasp": ({"eval_mode": True}, lambda m, ps, x, y, l, r: _grasp_ref(m, ps, x, y, l), 1e-6),
        "synflow": ({"rounds": 1}, lambda m, ps, x, y, loss, r: _synflow_ref(m, ps, x), 1e-6),
    }


def _snip_ref(m, ps, x, y, loss):
    raw = {n: (g * ps[n].detach()).abs() for n, g in _batch_grad(m, ps, x, y, loss).items()}
    total = sum(float(s.sum()) for s in raw.values()) or 1.0  # all zero: a zero-initialised head
    return {n: s / total for n, s in raw.items()}


CRITERIA = _criteria()


@pytest.mark.parametrize("crit", list(CRITERIA))
def test_criterion_matches_brute_force(arch, crit):
    model, x, y = arch.make()
    params = saliency.prunable_parameters(model)
    hp, reference, tol = CRITERIA[crit]
    ref_fn = reference or _snip_ref
    name = re.sub(r"_(ggn|greedy)$", "", crit)
    before = copy.deepcopy(model.state_dict())
    why = _expect(name, arch)
    if why:
        with pytest.raises(ValueError, match=why):
            saliency.score(model, name, data=[(x, y)], loss_fn=arch.loss, **hp)
        return
    got = saliency.score(model, name, data=[(x, y)], loss_fn=arch.loss, **hp)
    _untouched(model, dict(model.named_parameters()), before)
    if reference is None:
        want = _snip_ref(model, params, x, y, arch.loss)
    else:
        want = ref_fn(model, params, x, y, arch.loss, Ref(model, params, x, y, arch.loss))
    _close_dicts(dict(got), want, tol)


def test_obs_update_matches_the_constrained_optimum(arch):
    """prune(obs) = the joint OBS update dw = -Hinv[:, Q] (Hinv[Q, Q])^-1 w_Q per block, with the
    reference blocks, on every architecture (or the refusal)."""
    model, x, y = arch.make()
    params = saliency.prunable_parameters(model)
    why = _expect("obs", arch)
    kw = dict(data=[(x, y)], loss_fn=arch.loss, block_size=8, dtype="float64")
    if why:
        with pytest.raises(ValueError, match=why):
            saliency.prune(model, "obs", sparsity=0.5, **kw)
        return
    ref = Ref(model, params, x, y, arch.loss)
    w0 = {n: p.detach().clone() for n, p in params.items()}
    blocks = {n: _ref_block_inverse(ref, n, 8, 1e-2) for n in params}
    masks = saliency.prune(model, "obs", sparsity=0.5, **kw)
    for n, p in params.items():
        Hinv, nb = blocks[n], blocks[n].shape[0]
        w = torch.nn.functional.pad(w0[n].reshape(-1), (0, nb * 8 - w0[n].numel())).view(nb, 8)
        keep = torch.nn.functional.pad(masks[n].reshape(-1), (0, nb * 8 - w0[n].numel()))
        keep = keep.view(nb, 8).bool()
        want = torch.zeros_like(w)
        for b in range(nb):
            Q = (~keep[b]) & (torch.arange(8) < w0[n].numel() - 8 * b)
            dw = -Hinv[b][:, Q] @ torch.linalg.solve(Hinv[b][Q][:, Q], w[b][Q])
            want[b] = torch.where(keep[b], w[b] + dw, 0.0)
        _close(p.detach(), want.reshape(-1)[: p.numel()].view_as(p), scale=float(w0[n].abs().max()))


def test_obs_exact_with_train_mode_refuses_batch_statistics_and_keeps_running_stats():
    from arch_zoo import BY_NAME

    model, x, y = BY_NAME["resnet_bn_eval"].make()
    model.train()  # eval_mode=False scores in the model's own mode
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="BatchNorm2d in train mode"):
        saliency.score(model, "obs", data=[(x, y)], hessian="exact", eval_mode=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(m.training for m in model.modules())


def test_random_per_channel_draws_one_score_per_output_channel_of_conv_transpose():
    from arch_zoo import BY_NAME

    from saliency.allocate import group_index

    model, x, y = BY_NAME["conv_transpose_grouped"].make()
    w = model.up.weight  # [in, out/groups, k], groups=2
    s = saliency.score(model, "random", per="channel", params={"up.weight": w})["up.weight"]
    ids = group_index(w.shape, "channel", None, "cpu", (1, 2))
    for c in range(int(ids.max()) + 1):
        assert len(set(s[ids == c].tolist())) == 1
    assert len(set(s.reshape(-1).tolist())) == int(ids.max()) + 1
