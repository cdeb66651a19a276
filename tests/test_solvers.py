"""Layer-wise solvers on plain matrices against straightforward references written here."""

import pytest
import torch

from saliency import solvers


def _problem(rows=6, d=16, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d, n, generator=g, dtype=torch.float64)
    X[1] *= 3.0  # uneven input scales: Wanda and OBS differ from magnitude
    W = torch.randn(rows, d, generator=g, dtype=torch.float64)
    return W, X, 2 * X @ X.T / n


def _err(W, W2, X):
    return float(((W - W2) @ X).square().sum())


def _refit(w0, keep, H):
    """min (w - w0)^T H (w - w0) subject to w = 0 off `keep`: w_K = w0_K + H_KK^-1 H_KP w0_P."""
    K, P = keep, ~keep
    w = torch.zeros_like(w0)
    w[K] = w0[K] + torch.linalg.solve(H[K][:, K], H[K][:, P] @ w0[P])
    return w


@pytest.mark.parametrize("pattern", [(0.5, None), (0.3, None), (None, (2, 4)), (None, (4, 8))])
def test_obc_rows_are_the_least_squares_refit_on_their_mask(pattern):
    W, X, H = _problem()
    W2, keep = solvers.obc(W, H, pattern, damp=0.0, rows_per_batch=4)
    for r in range(W.shape[0]):
        torch.testing.assert_close(W2[r], _refit(W[r], keep[r], H), rtol=1e-7, atol=1e-9)
    assert bool((W2[~keep] == 0).all())


def _sparsegpt_reference(W, H, pattern, B):
    """Column by column, the OBS update on the columns not yet visited, from an explicit
    inverse of the trailing block of H (no Cholesky): W[:, j:] -= (w_j - q_j) / Fj[0, 0] Fj[0]."""
    sparsity, nm = pattern
    W, (rows, d) = W.clone(), W.shape
    prune = torch.zeros(rows, d, dtype=torch.bool)
    trailing = [torch.linalg.inv(H[j:, j:]) for j in range(d)]
    u2 = torch.tensor([F[0, 0] for F in trailing], dtype=torch.float64)
    for j in range(d):
        if nm is None and j % B == 0:
            b = slice(j, min(j + B, d))
            k = round(sparsity * rows * d * b.stop / d) - int(prune.sum())
            s = (W[:, b].square() / u2[b]).reshape(-1)
            idx = torch.sort(s, stable=True).indices[:k]
            prune[:, b] = (
                torch.zeros(s.numel(), dtype=torch.bool).index_fill(0, idx, True).view(rows, -1)
            )
        if nm is not None and j % nm[1] == 0:
            g = slice(j, j + nm[1])
            s = W[:, g].square() / u2[g]
            lowest = torch.sort(s, dim=1, stable=True).indices[:, : nm[1] - nm[0]]
            prune[:, g] = torch.zeros_like(s, dtype=torch.bool).scatter(1, lowest, True)
        q = torch.where(prune[:, j], 0.0, W[:, j])
        W[:, j:] -= ((W[:, j] - q) / trailing[j][0, 0])[:, None] * trailing[j][0][None, :]
        W[:, j] = q
    return W, ~prune


@pytest.mark.parametrize("pattern", [(0.5, None), (0.3, None), (None, (2, 4)), (None, (4, 8))])
@pytest.mark.parametrize("block_size", [8, 16])
def test_sparsegpt_matches_the_column_by_column_reference(pattern, block_size):
    W, X, H = _problem()
    W2, keep = solvers.sparsegpt(W, H, pattern, damp=0.0, block_size=block_size)
    R, keep_ref = _sparsegpt_reference(W, H, pattern, block_size)
    assert torch.equal(keep, keep_ref)
    torch.testing.assert_close(W2, R, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("pattern", [(0.5, None), (0.7, None), (None, (2, 4)), (None, (2, 16))])
def test_sparsegpt_sub_blocks_and_ties_match_the_reference(pattern):
    """Blocks wider than the rank-1 sub-blocks (64 > solvers._STEP), a partial last block, and
    weights on a grid (equal scores within a column: ties go by position, as a stable sort)."""
    W, X, H = _problem(rows=6, d=80, n=256)
    W = (W * 2).round() / 2
    W2, keep = solvers.sparsegpt(W, H, pattern, damp=0.0, block_size=64)
    R, keep_ref = _sparsegpt_reference(W, H, pattern, 64)
    assert torch.equal(keep, keep_ref)
    torch.testing.assert_close(W2, R, rtol=1e-8, atol=1e-10)


def test_inverse_factor_is_the_upper_cholesky_factor_of_the_inverse():
    _, _, H = _problem(d=24, n=64)
    U = solvers.inverse_factor(H)
    torch.testing.assert_close(U, torch.linalg.cholesky(torch.linalg.inv(H), upper=True))
    assert torch.equal(U, U.triu())


def test_lowest_selects_like_a_stable_sort():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        s = torch.randint(0, 5, (40,), generator=g).double()
        s[torch.randint(0, 40, (3,), generator=g)] = -float("inf")
        for k in (-1, 0, 1, 7, 20, 39, 40, 41):
            ref = torch.zeros(40, dtype=torch.bool)
            ref[torch.sort(s, stable=True).indices[: max(k, 0)]] = True
            assert torch.equal(solvers._lowest(s, k), ref), (s, k)


def test_wanda_prunes_the_lowest_product_in_each_row():
    W, X, H = _problem(rows=5, d=12)
    W2, keep = solvers.wanda(W, X.norm(dim=1), (0.5, None))
    for r in range(W.shape[0]):
        s = W[r].abs() * X.norm(dim=1)
        assert set(torch.nonzero(~keep[r]).flatten().tolist()) == set(s.argsort()[:6].tolist())
    assert torch.equal(W2, W * keep)


@pytest.mark.parametrize("solver", ["obc", "sparsegpt", "wanda"])
@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4)])
def test_nm_patterns_are_valid(solver, nm):
    W, X, H = _problem(rows=4, d=16)
    W2, keep = _run(solver, W, X, H, (None, nm))
    assert bool((keep.view(4, -1, nm[1]).sum(2) == nm[0]).all())
    assert bool((W2[~keep] == 0).all())


def _run(solver, W, X, H, pattern, alive=None):
    if solver == "wanda":
        return solvers.wanda(W, X.norm(dim=1), pattern, alive)
    kw = {"block_size": 8} if solver == "sparsegpt" else {}
    return getattr(solvers, solver)(W, H, pattern, alive, damp=0.01, **kw)


@pytest.mark.parametrize("solver", ["obc", "sparsegpt", "wanda"])
@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.3, 0.55, 0.9])
def test_exact_counts_and_old_zeros_stay(solver, sparsity):
    W, X, H = _problem(rows=7, d=10)
    alive = torch.ones_like(W, dtype=torch.bool)
    alive[0, :3] = False
    alive[4, 5] = False
    W = W * alive
    W2, keep = _run(solver, W, X, H, (sparsity, None), alive)
    assert int((~keep).sum()) == max(round(sparsity * 70), 4) and not bool(keep[~alive].any())
    assert bool((W2[~keep] == 0).all())


def test_second_order_beats_first_order_and_obc_beats_sparsegpt():
    W, X, _ = _problem(rows=8, d=32, n=256)
    X = (torch.eye(32, dtype=X.dtype) + 0.3 * torch.ones(32, 32, dtype=X.dtype)) @ X  # correlated
    H = 2 * X @ X.T / 256
    mag = W * ~solvers.lowest_per_row(W.abs(), solvers.row_counts(8, 32, 0.5))
    errs = {s: _err(W, _run(s, W, X, H, (0.5, None))[0], X) for s in ("obc", "sparsegpt", "wanda")}
    assert errs["obc"] <= errs["sparsegpt"] < 0.5 * min(errs["wanda"], _err(W, mag, X)), errs


def test_singular_hessian_is_refused_with_the_way_out():
    W, X, _ = _problem(d=16, n=4)
    with pytest.raises(ValueError, match="damp > 0 or more calibration samples"):
        solvers.sparsegpt(W, 2 * X @ X.T / 4, (0.5, None), damp=0.0)
    solvers.sparsegpt(W, 2 * X @ X.T / 4, (0.5, None), damp=0.01)  # damped: fine
