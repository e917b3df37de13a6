"""CRITIC weights and TOPSIS closeness: hand-worked tables, pymcdm agreement, properties, edges."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from pymcdm.methods import TOPSIS
from pymcdm.normalizations import vector_normalization
from pymcdm.weights import critic_weights as pymcdm_critic

from autorank.ranking.mcda import critic_weights, topsis

# Three alternatives whose min-max normalised columns are permutations of {0, 0.5, 1}.
HAND = np.array([[1.0, 10.0, 5.0], [2.0, 30.0, 3.0], [3.0, 20.0, 1.0]])


def _random_problems(n: int = 20) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(1234)
    problems = []
    for _ in range(n):
        n_alt, n_crit = int(rng.integers(3, 15)), int(rng.integers(2, 7))
        matrix = rng.uniform(0.1, 100.0, size=(n_alt, n_crit)) * rng.uniform(0.01, 10.0, n_crit)
        benefit = rng.random(n_crit) < 0.6
        problems.append((matrix, benefit))
    return problems


# ---- CRITIC ---------------------------------------------------------------------------------


def test_critic_hand_example_all_benefit() -> None:
    # Prepare. Normalised columns: c1 = [0, .5, 1], c2 = [0, 1, .5], c3 = [1, .5, 0].
    # Each has sample std (ddof=1): sqrt((.25 + 0 + .25) / 2) = 0.5.
    # Centred: c1 = [-.5, 0, .5], c2 = [-.5, .5, 0], c3 = [.5, 0, -.5]; each |centred|^2 = .5.
    # rho12 = .25 / .5 = .5;  rho13 = -.5 / .5 = -1;  rho23 = -.25 / .5 = -.5.
    # c_1 = .5 * ((1 - .5) + (1 + 1)) = 1.25;  c_2 = .5 * (.5 + 1.5) = 1.0;
    # c_3 = .5 * (2 + 1.5) = 1.75;  sum = 4  ->  w = [.3125, .25, .4375].
    expected = [0.3125, 0.25, 0.4375]

    # Execute
    weights = critic_weights(HAND)

    # Assert
    np.testing.assert_allclose(weights, expected, atol=1e-12)


def test_critic_hand_example_with_a_cost_column() -> None:
    # Prepare. Column 3 as a cost reverses to [0, .5, 1], identical to column 1:
    # rho13 = 1, rho12 = rho23 = .5, every std .5.
    # c_1 = .5 * (.5 + 0) = .25;  c_2 = .5 * (.5 + .5) = .5;  c_3 = .5 * (0 + .5) = .25.
    expected = [0.25, 0.5, 0.25]

    # Execute
    weights = critic_weights(HAND, benefit=[True, True, False])

    # Assert
    np.testing.assert_allclose(weights, expected, atol=1e-12)


@pytest.mark.parametrize("case", range(20))
def test_critic_agrees_with_pymcdm(case: int) -> None:
    # Prepare: pymcdm's CRITIC treats every column as a benefit, so a cost column is handed to it
    # negated, which min-max normalises to exactly the reversed column.
    matrix, benefit = _random_problems()[case]
    signed = matrix * np.where(benefit, 1.0, -1.0)

    # Execute
    ours = critic_weights(matrix, benefit=list(benefit))
    theirs = pymcdm_critic(signed)

    # Assert
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-9)


def test_critic_all_benefit_equals_pymcdm_directly() -> None:
    # Prepare
    matrix, _ = _random_problems()[0]

    # Execute
    ours = critic_weights(matrix)
    theirs = pymcdm_critic(matrix)

    # Assert
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-9)


@pytest.mark.parametrize("case", range(0, 20, 4))
def test_critic_weights_are_a_distribution(case: int) -> None:
    # Prepare
    matrix, benefit = _random_problems()[case]

    # Execute
    weights = critic_weights(matrix, benefit=list(benefit))

    # Assert
    assert weights.shape == (matrix.shape[1],)
    assert (weights >= 0).all()
    assert math.isclose(weights.sum(), 1.0, abs_tol=1e-12)


def test_critic_invariant_to_positive_column_scaling() -> None:
    # Prepare
    matrix, benefit = _random_problems()[3]
    scale = np.linspace(0.001, 1000.0, matrix.shape[1])

    # Execute
    plain = critic_weights(matrix, benefit=list(benefit))
    scaled = critic_weights(matrix * scale, benefit=list(benefit))

    # Assert
    np.testing.assert_allclose(scaled, plain, atol=1e-12)


def test_critic_constant_column_gets_zero_and_leaves_the_rest_unchanged() -> None:
    # Prepare
    with_constant = np.column_stack([HAND[:, 0], np.full(3, 7.0), HAND[:, 1:]])

    # Execute
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no division-by-zero or NaN warnings either
        weights = critic_weights(with_constant)

    # Assert
    np.testing.assert_allclose(weights, [0.3125, 0.0, 0.25, 0.4375], atol=1e-12)


def test_critic_all_columns_constant_gives_equal_weights() -> None:
    # Prepare
    matrix = np.array([[1.0, 5.0, 0.0], [1.0, 5.0, 0.0]])

    # Execute
    weights = critic_weights(matrix)

    # Assert
    np.testing.assert_allclose(weights, [1 / 3, 1 / 3, 1 / 3])


def test_critic_single_alternative_gives_equal_weights() -> None:
    # Execute
    weights = critic_weights(np.array([[0.3, 12.0]]))

    # Assert
    np.testing.assert_allclose(weights, [0.5, 0.5])


@pytest.mark.parametrize(
    "matrix",
    [
        np.array([[1.0, 4.0], [2.0, 4.0], [5.0, 4.0]]),  # one informative column
        np.array([[1.0, 10.0, 3.0], [2.0, 20.0, 3.0]]),  # two clients: columns agree fully
    ],
)
def test_critic_fully_redundant_columns_share_weight_equally(matrix: np.ndarray) -> None:
    # Prepare: every informative column has c_j = sigma_j * 0; constant columns still get 0.
    informative = matrix.max(axis=0) > matrix.min(axis=0)
    expected = informative / informative.sum()

    # Execute
    weights = critic_weights(matrix)

    # Assert
    np.testing.assert_allclose(weights, expected, atol=1e-12)


# ---- TOPSIS ---------------------------------------------------------------------------------


TOPSIS_HAND = np.array([[3.0, 4.0], [4.0, 3.0], [0.0, 0.0]])


def test_topsis_hand_example_benefits() -> None:
    # Prepare. Column norms are both 5: r = [[.6, .8], [.8, .6], [0, 0]].
    # w = [.5, .5]: v = [[.3, .4], [.4, .3], [0, 0]]; A+ = [.4, .4], A- = [0, 0].
    # A1: D+ = sqrt(.1^2) = .1, D- = sqrt(.09 + .16) = .5 -> C = .5 / .6 = 5/6; A2 likewise.
    # A3: D- = 0 -> C = 0.
    expected = [5 / 6, 5 / 6, 0.0]

    # Execute
    closeness = topsis(TOPSIS_HAND, np.array([0.5, 0.5]))

    # Assert
    np.testing.assert_allclose(closeness, expected, atol=1e-12)


def test_topsis_hand_example_with_a_cost_column() -> None:
    # Prepare. Column 2 a cost: A+ = [.4, 0], A- = [0, .4].
    # A1 (.3, .4): D+ = sqrt(.01 + .16) = sqrt(.17), D- = .3 -> C = .3 / (.3 + sqrt(.17)).
    # A2 (.4, .3): D+ = .3, D- = sqrt(.16 + .01) = sqrt(.17) -> C = sqrt(.17) / (.3 + sqrt(.17)).
    # A3 (0, 0): D+ = .4, D- = .4 -> C = .5.
    s = math.sqrt(0.17)
    expected = [0.3 / (0.3 + s), s / (0.3 + s), 0.5]

    # Execute
    closeness = topsis(TOPSIS_HAND, np.array([0.5, 0.5]), benefit=[True, False])

    # Assert
    np.testing.assert_allclose(closeness, expected, atol=1e-12)


@pytest.mark.parametrize("case", range(20))
def test_topsis_agrees_with_pymcdm_vector_normalisation(case: int) -> None:
    # Prepare
    matrix, benefit = _random_problems()[case]
    weights = np.random.default_rng(case).dirichlet(np.ones(matrix.shape[1]))
    types = np.where(benefit, 1, -1)

    # Execute
    ours = topsis(matrix, weights, benefit=list(benefit))
    theirs = TOPSIS(vector_normalization)(matrix, weights, types, validation=False)

    # Assert
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-9)


@pytest.mark.parametrize("case", range(0, 20, 4))
def test_topsis_closeness_in_unit_interval(case: int) -> None:
    # Prepare
    matrix, benefit = _random_problems()[case]
    weights = critic_weights(matrix, benefit=list(benefit))

    # Execute
    closeness = topsis(matrix, weights, benefit=list(benefit))

    # Assert
    assert closeness.shape == (matrix.shape[0],)
    assert ((closeness >= 0) & (closeness <= 1)).all()


def test_topsis_invariant_to_positive_column_scaling() -> None:
    # Prepare
    matrix, benefit = _random_problems()[7]
    weights = np.full(matrix.shape[1], 1.0 / matrix.shape[1])
    scale = np.linspace(0.001, 1000.0, matrix.shape[1])

    # Execute
    plain = topsis(matrix, weights, benefit=list(benefit))
    scaled = topsis(matrix * scale, weights, benefit=list(benefit))

    # Assert
    np.testing.assert_allclose(scaled, plain, atol=1e-12)


def test_topsis_single_alternative_is_neutral() -> None:
    # Execute
    closeness = topsis(np.array([[2.0, 9.0]]), np.array([0.5, 0.5]))

    # Assert
    np.testing.assert_array_equal(closeness, [0.5])


def test_topsis_identical_rows_are_all_neutral() -> None:
    # Prepare
    matrix = np.tile([1.0, 2.0, 3.0], (4, 1))

    # Execute
    closeness = topsis(matrix, np.array([0.2, 0.3, 0.5]))

    # Assert
    np.testing.assert_array_equal(closeness, [0.5, 0.5, 0.5, 0.5])


def test_topsis_all_zero_column_is_ignored_without_nan() -> None:
    # Prepare
    with_zeros = np.column_stack([TOPSIS_HAND, np.zeros(3)])

    # Execute
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        closeness = topsis(with_zeros, np.array([0.25, 0.25, 0.5]))

    # Assert: the zero column is at ideal and anti-ideal for everyone, so the hand answer stands.
    np.testing.assert_allclose(closeness, [5 / 6, 5 / 6, 0.0], atol=1e-12)


def test_topsis_only_zero_weight_columns_vary_gives_neutral() -> None:
    # Execute
    closeness = topsis(np.array([[1.0, 3.0], [1.0, 8.0]]), np.array([1.0, 0.0]))

    # Assert
    np.testing.assert_array_equal(closeness, [0.5, 0.5])


# ---- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("matrix", "message"),
    [
        (np.array([[1.0, np.nan], [2.0, 3.0]]), "finite"),
        (np.array([[1.0, np.inf], [2.0, 3.0]]), "finite"),
        (np.array([1.0, 2.0, 3.0]), "2-D"),
        (np.ones((2, 2, 2)), "2-D"),
        (np.empty((0, 3)), "at least one row"),
        (np.empty((3, 0)), "at least one row"),
        ([["a", "b"], ["c", "d"]], "numbers"),
    ],
)
def test_bad_matrix_is_rejected_by_both(matrix: np.ndarray, message: str) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=message) as critic_err:
        critic_weights(matrix)
    with pytest.raises(ValueError, match=message):
        topsis(matrix, np.ones(2))
    assert "matrix" in str(critic_err.value)


@pytest.mark.parametrize("benefit", [[True], [True, False, True], [1, -1]])
def test_bad_benefit_is_rejected_by_both(benefit: list[bool]) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="benefit"):
        critic_weights(TOPSIS_HAND, benefit=benefit)
    with pytest.raises(ValueError, match="benefit"):
        topsis(TOPSIS_HAND, np.array([0.5, 0.5]), benefit=benefit)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        (np.array([1.0]), "shape"),
        (np.array([0.2, 0.3, 0.5]), "shape"),
        (np.array([[0.5, 0.5]]), "shape"),
        (np.array([1.5, -0.5]), "non-negative"),
        (np.array([0.0, 0.0]), "positive sum"),
        (np.array([np.nan, 1.0]), "finite"),
    ],
)
def test_bad_weights_are_rejected(weights: np.ndarray, message: str) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=message) as err:
        topsis(TOPSIS_HAND, weights)
    assert "weights" in str(err.value)
