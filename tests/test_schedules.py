import pytest

from saliency import ConstantSparsity, Geometric, OneShot, PolynomialDecay


def test_polynomial_decay_matches_zhu_gupta_formula():
    s = PolynomialDecay(0.5, 0.8, begin_step=0, end_step=1000, power=3, frequency=100)
    assert s.sparsity_at(0) == pytest.approx(0.5)
    assert s.sparsity_at(500) == pytest.approx(0.8 + (0.5 - 0.8) * 0.5**3)
    assert s.sparsity_at(1000) == pytest.approx(0.8) and s.sparsity_at(5000) == pytest.approx(0.8)
    assert [t for t in range(0, 1200) if s.should_prune(t)] == list(range(0, 1001, 100))
    assert s.sparsity_at(-1) == 0.0


def test_tfmot_article_schedule_prunes_at_end_step_even_off_frequency():
    s = PolynomialDecay(0.2, 0.8, begin_step=1000, end_step=2050, frequency=100)
    steps = [t for t in range(3000) if s.should_prune(t)]
    assert steps[0] == 1000 and steps[-1] == 2050 and s.sparsity_at(2050) == pytest.approx(0.8)


def test_geometric_rounds_prune_a_fraction_of_the_remaining():
    g = Geometric(0.9, fraction=0.2)
    r = g.rounds()
    assert r[0] == pytest.approx(0.2) and r[1] == pytest.approx(0.36) and r[-1] == 0.9
    assert all(a < b for a, b in zip(r, r[1:], strict=False)) and len(r) == 11
    assert Geometric(0.0).rounds() == [0.0]


def test_constant_and_oneshot():
    c = ConstantSparsity(0.5, begin_step=10, frequency=5)
    assert c.sparsity_at(9) == 0 and c.sparsity_at(10) == 0.5
    assert [t for t in range(30) if c.should_prune(t)] == [10, 15, 20, 25]
    assert OneShot(0.7).rounds() == [0.7] and OneShot(0.7).should_prune(0)


def test_bad_schedules():
    with pytest.raises(ValueError, match=r"final_sparsity must be in \[0, 1\)"):
        PolynomialDecay(0.1, 1.0, 0, 10)
    with pytest.raises(ValueError, match="end_step"):
        PolynomialDecay(0.1, 0.5, 10, 5)
    with pytest.raises(ValueError, match="frequency"):
        ConstantSparsity(0.5, frequency=0)
    with pytest.raises(ValueError, match="fraction"):
        Geometric(0.5, fraction=1.0)
