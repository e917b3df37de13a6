"""Paired differences and the paired t-test, by hand and against scipy's independent route."""

import math

import pytest

from autorank.reporting.paired import paired_difference, paired_on_seeds, t_two_sided_p

stats = pytest.importorskip("scipy.stats")  # scikit-learn's dependency: the independent route


def test_three_seeds_by_hand() -> None:
    method = [0.81, 0.73, 0.92]
    reference = [0.80, 0.70, 0.90]  # d = [0.01, 0.03, 0.02]

    d = paired_difference([m - r for m, r in zip(method, reference, strict=True)])

    # mean 0.02, std sqrt((0.01^2 + 0.01^2 + 0) / 2) = 0.01, t = 0.02 / (0.01 / sqrt(3))
    # = 2 sqrt(3); df = 2: P(|T| >= t) = 1 - t / sqrt(t^2 + 2) = 1 - sqrt(12 / 14)
    assert d.mean == pytest.approx(0.02) and d.std == pytest.approx(0.01)
    assert d.p == pytest.approx(1 - math.sqrt(6 / 7))
    assert d.p == pytest.approx(stats.ttest_rel(method, reference).pvalue)
    assert (d.wins, d.n) == (3, 3)


def test_two_seeds_by_hand() -> None:
    d = paired_difference([0.05, -0.01])

    # mean 0.02, std sqrt(2 * 0.03^2) = 0.03 sqrt(2), t = 0.02 / 0.03 = 2/3;
    # df = 1 (Cauchy): P(|T| >= t) = 1 - 2 atan(t) / pi
    assert d.std == pytest.approx(0.03 * math.sqrt(2))
    assert d.p == pytest.approx(1 - 2 * math.atan(2 / 3) / math.pi)
    assert (d.wins, d.n) == (1, 2)


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 8, 9, 30])
@pytest.mark.parametrize("t", [0.0, 0.3, -1.2, 2.0, 4.5, 25.0])
def test_t_distribution_matches_scipy(t: float, df: int) -> None:
    assert t_two_sided_p(t, df) == pytest.approx(2 * stats.t.sf(abs(t), df), abs=1e-12)


def test_ten_seeds_match_scipys_paired_test() -> None:
    method = [0.70, 0.72, 0.69, 0.75, 0.71, 0.73, 0.68, 0.74, 0.70, 0.72]
    reference = [0.69, 0.70, 0.70, 0.72, 0.70, 0.71, 0.69, 0.71, 0.70, 0.70]

    d = paired_difference([m - r for m, r in zip(method, reference, strict=True)])

    assert d.p == pytest.approx(stats.ttest_rel(method, reference).pvalue)
    assert (d.wins, d.n) == (7, 10)  # two losses and one tie


def test_no_p_value_for_one_seed_or_equal_differences() -> None:
    one = paired_difference([0.03])
    # 0.9 - 0.88 and 0.5 - 0.48 differ in the last bits: still equal differences
    equal = paired_difference([0.9 - 0.88, 0.5 - 0.48, 0.02])

    assert (one.mean, one.std, one.p, one.wins, one.n) == (0.03, 0.0, None, 1, 1)
    assert equal.p is None and equal.mean == pytest.approx(0.02) and equal.wins == 3


def test_only_the_seeds_both_ran_are_paired() -> None:
    d = paired_on_seeds({0: 0.8, 1: 0.9, 2: 0.7}, {1: 0.85, 2: 0.75, 3: 0.1})

    assert d is not None and d.n == 2 and d.mean == pytest.approx(0.0)
    assert paired_on_seeds({0: 0.8}, {1: 0.8}) is None


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="df is 0"):
        t_two_sided_p(1.0, 0)
    with pytest.raises(ValueError, match="diffs is empty"):
        paired_difference([])
