"""Structured solvers on plain matrices against least-squares references written here."""

import itertools

import pytest
import torch

from saliency import structured_solvers as ss
from saliency.solvers import damped


def _problem(out=5, d=12, n=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64) + 0.5  # rows are tokens
    X[:, 1] *= 3.0
    W = torch.randn(out, d, generator=g, dtype=torch.float64)
    return W, X, 2 * X.T @ X / n


HEADS = torch.arange(12).view(4, 3)  # 4 units of 3 columns
NEURONS = torch.arange(12).view(12, 1)


def _refit(W, H, removed_cols):
    """argmin over W' with the columns ``removed_cols`` zero of 0.5 tr((W'-W) H (W'-W)^T), by
    least squares on the square root of H (lstsq, no inverse of H), and its error."""
    d = W.shape[1]
    keep = torch.ones(d, dtype=torch.bool)
    keep[removed_cols] = False
    R = torch.linalg.cholesky(H).T  # H = R^T R: the error is 0.5 ||R (W' - W)^T||^2
    sol = torch.linalg.lstsq(R[:, keep], R @ W.T).solution
    W2 = torch.zeros_like(W)
    W2[:, keep] = sol.T
    return W2, _err(W2, W, H)


def _err(W2, W, H):
    D = W2 - W
    return float(0.5 * torch.trace(D @ H @ D.T))


@pytest.mark.parametrize("units", [HEADS, NEURONS], ids=["heads", "neurons"])
@pytest.mark.parametrize("damp", [0.0, 0.05])
def test_unit_costs_are_the_least_squares_error_increase(units, damp):
    W, _, H = _problem()
    costs = ss.unit_obs_costs(W, H, units, damp=damp)
    Hd = damped(H, damp)
    ref = torch.tensor([_refit(W, Hd, u)[1] for u in units], dtype=torch.float64)
    torch.testing.assert_close(costs, ref, rtol=1e-9, atol=0)


@pytest.mark.parametrize("units,n_remove", [(HEADS, 3), (NEURONS, 7)], ids=["heads", "neurons"])
def test_structured_obs_is_the_joint_refit_and_greedy(units, n_remove):
    W, _, H = _problem(seed=1)
    Hd = damped(H, 0.01)
    W2, removed, costs = ss.structured_obs(W, H, units, n_remove)
    assert removed.dtype == torch.long and len(set(removed.tolist())) == n_remove
    prev_err = 0.0
    for t in range(n_remove):
        gone = units[removed[:t]].flatten()
        # greedy: the unit chosen at step t is the cheapest next removal, by brute force
        trial = {
            int(u): _refit(W, Hd, torch.cat([gone, units[u]]))[1] - prev_err
            for u in range(len(units))
            if u not in removed[:t].tolist()
        }
        assert int(removed[t]) == min(trial, key=trial.get)
        ref = torch.tensor(trial[int(removed[t])], dtype=torch.float64)
        torch.testing.assert_close(costs[t], ref, rtol=1e-9, atol=1e-12)
        prev_err += float(costs[t])
    Wref, err = _refit(W, Hd, units[removed].flatten())
    torch.testing.assert_close(W2, Wref, rtol=1e-9, atol=1e-10)
    assert bool((W2[:, units[removed].flatten()] == 0).all())
    assert abs(float(costs.sum()) - err) <= 1e-9 * err


def test_structured_obs_respects_alive_and_keeps_dtype():
    W, _, H = _problem(seed=2)
    alive = torch.tensor([True, False, True, True])
    W0 = W.clone()
    W0[:, HEADS[1]] = 0.0
    W2, removed, _ = ss.structured_obs(W0.float(), H, HEADS, 2, alive=alive)
    assert W2.dtype == torch.float32 and 1 not in removed.tolist()
    gone = HEADS[[1, *removed.tolist()]].flatten()
    Wref, _ = _refit(W0, damped(H, 0.01), gone)  # the refit of the columns alive before
    torch.testing.assert_close(W2.double(), Wref, rtol=1e-5, atol=1e-5)
    assert bool((W2[:, gone] == 0).all())
    with pytest.raises(ValueError, match="accepted are the integers 0..3"):
        ss.structured_obs(W, H, HEADS, 4, alive=alive)


def test_structured_obs_zero_steps_is_a_no_op():
    W, _, H = _problem()
    W2, removed, costs = ss.structured_obs(W, H, HEADS, 0)
    assert torch.equal(W2, W) and removed.numel() == 0 and costs.numel() == 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(n_remove=5), "n_remove=5: accepted are the integers 0..4"),
        (dict(n_remove=-1), "n_remove=-1"),
        (dict(units=torch.tensor([[0, 1], [2, 12]])), "column 12: accepted are 0..11"),
        (dict(units=torch.tensor([[0, 1], [1, 2]])), "column 1 belongs to more than one unit"),
        (dict(units=torch.tensor([0, 1])), r"units must be .* \[n_units, k\]"),
        (dict(W=torch.zeros(5, 10, dtype=torch.float64)), r"W of shape \(5, 10\)"),
        (
            dict(alive=torch.ones(3, dtype=torch.bool)),
            r"alive must be a bool tensor of shape \[4\]",
        ),
    ],
)
def test_structured_obs_rejects_bad_inputs(kwargs, match):
    W, _, H = _problem()
    args = dict(W=W, H=H, units=HEADS, n_remove=1) | kwargs
    with pytest.raises(ValueError, match=match):
        ss.structured_obs(**args)


def test_dead_inputs_cost_nothing_and_move_nothing():
    W, X, _ = _problem()
    X[:, 4] = 0.0  # input 4 never active: its weights do not touch the output
    H = 2 * X.T @ X / X.shape[0]
    costs = ss.unit_obs_costs(W, H, NEURONS)
    assert bool(costs.isfinite().all()) and float(costs[4]) == 0.0
    W2, removed, c = ss.structured_obs(W, H, NEURONS, 3)
    assert int(removed[0]) == 4 and float(c[0]) == 0.0 and bool(W2.isfinite().all())
    # unit 1 holds the dead column 4: costs as if that weight were 0
    W0 = W.clone()
    W0[:, 4] = 0.0
    ref = _refit(W0, damped(H, 0.01), HEADS[1])[1]
    torch.testing.assert_close(
        ss.unit_obs_costs(W, H, HEADS)[1], torch.tensor(ref, dtype=torch.float64)
    )


def test_flap_scores_against_a_loop_over_channels():
    W, X, _ = _problem()
    mean, second = X.mean(0), X.square().mean(0)
    ref = torch.zeros(len(HEADS), dtype=torch.float64)
    for u, cols in enumerate(HEADS):
        for j in cols:
            var = float(((X[:, j] - X[:, j].mean()) ** 2).mean())  # population variance
            ref[u] += var * float((W[:, j] ** 2).sum())
    torch.testing.assert_close(ss.flap_scores(W, mean, second, HEADS), ref, rtol=1e-10, atol=0)


def test_flap_standardize_is_a_per_layer_z_score_averaged_per_unit():
    s = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 9.0], dtype=torch.float64)
    units = torch.arange(6).view(3, 2)
    z = (s - s.mean()) / s.std()
    torch.testing.assert_close(ss.flap_standardize(s, units), z.view(3, 2).mean(1))
    assert (
        float(ss.flap_standardize(s * 7 + 3, units).sub(z.view(3, 2).mean(1)).abs().max()) < 1e-12
    )
    assert bool((ss.flap_standardize(torch.ones(6), units) == 0).all())


def test_flap_compensation_keeps_the_expected_output():
    W, X, _ = _problem()
    mean = X.mean(0)
    removed = torch.tensor([0, 2])
    W2 = W.clone()
    W2[:, HEADS[removed].flatten()] = 0.0
    b = ss.flap_compensation(W, mean, removed, HEADS)
    expected = (X @ W.T).mean(0)
    torch.testing.assert_close((X @ W2.T + b).mean(0), expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="removed_units \\[4\\]: accepted are 0..3"):
        ss.flap_compensation(W, mean, torch.tensor([4]), HEADS)


def test_small_greedy_is_not_always_the_best_subset():
    """Documents what greedy means: its cumulative error is never below the best pair's."""
    W, _, H = _problem(seed=3)
    Hd = damped(H, 0.01)
    _, _, costs = ss.structured_obs(W, H, HEADS, 2)
    best = min(
        _refit(W, Hd, HEADS[list(p)].flatten())[1] for p in itertools.combinations(range(4), 2)
    )
    assert float(costs.sum()) >= best * (1 - 1e-12)
