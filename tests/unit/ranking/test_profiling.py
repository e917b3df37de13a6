"""Tests for autorank.ranking.profiling: hand-computed criteria, bounds, and validation."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from autorank.ranking.profiling import (
    gini_simpson,
    label_entropy,
    learning_difficulty,
    profile_clients,
)


def test_uniform_and_single_class_by_hand() -> None:
    # Prepare: client 0 uniform over 4 classes, client 1 a single class.
    hist = np.array([[5, 5, 5, 5], [0, 7, 0, 0]])

    # Execute
    entropy, gs = label_entropy(hist), gini_simpson(hist)

    # Assert
    np.testing.assert_allclose(entropy, [math.log(4), 0.0], atol=1e-12)
    np.testing.assert_allclose(gs, [1 - 1 / 4, 0.0], atol=1e-12)
    assert entropy.shape == (2,) and gs.shape == (2,)


def test_skewed_two_class_client_by_hand() -> None:
    # p = (1/4, 3/4)
    hist = np.array([[1, 3]])

    entropy, gs = label_entropy(hist)[0], gini_simpson(hist)[0]

    assert entropy == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    assert gs == pytest.approx(1 - (0.25**2 + 0.75**2))


def test_criteria_depend_on_shares_not_counts() -> None:
    small, large = np.array([[1, 2, 3]]), np.array([[10, 20, 30]])

    assert label_entropy(small) == pytest.approx(label_entropy(large))
    assert gini_simpson(small) == pytest.approx(gini_simpson(large))


@pytest.mark.parametrize("criterion", [label_entropy, gini_simpson])
def test_client_without_samples_is_rejected(
    criterion: Callable[[np.ndarray], np.ndarray],
) -> None:
    hist = np.array([[3, 1], [0, 0]])

    with pytest.raises(ValueError, match=r"client\(s\) \[1\]"):
        criterion(hist)


@pytest.mark.parametrize(
    "hist",
    [np.array([1, 2, 3]), np.zeros((0, 3)), np.array([[1, -1]]), np.array([[1.0, np.nan]])],
)
def test_bad_histograms_are_rejected(hist: np.ndarray) -> None:
    with pytest.raises(ValueError, match="histogram"):
        label_entropy(hist)


def test_flat_loss_curve_is_maximally_difficult() -> None:
    assert learning_difficulty([0.7, 0.7, 0.7, 0.7]) == pytest.approx(1.0)


def test_collapsing_loss_curve_is_easy() -> None:
    assert learning_difficulty([1.0, 0.01, 0.01]) < 0.15


def test_learning_difficulty_by_hand() -> None:
    # q = (1/4, 3/4), E = 2: LD = H(q) / ln 2
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(2)

    assert learning_difficulty([1.0, 3.0]) == pytest.approx(expected)


def test_learning_difficulty_orders_curves_by_flatness() -> None:
    steep, gentle = learning_difficulty([2.0, 0.5, 0.1]), learning_difficulty([2.0, 1.6, 1.3])

    assert steep < gentle


def test_learning_difficulty_stays_in_unit_interval() -> None:
    rng = np.random.default_rng(0)
    curves = [rng.exponential(size=rng.integers(2, 12)) for _ in range(200)]

    values = [learning_difficulty(c.tolist()) for c in curves]

    assert all(0.0 <= v <= 1.0 for v in values)


def test_learning_difficulty_ignores_loss_scale() -> None:
    curve = [2.3, 1.1, 0.7, 0.6]

    assert learning_difficulty(curve) == pytest.approx(learning_difficulty([9 * v for v in curve]))


def test_loss_only_in_first_epoch_is_zero_difficulty() -> None:
    assert learning_difficulty([0.5, 0.0, 0.0]) == pytest.approx(0.0)


def test_all_zero_losses_are_defined_as_zero() -> None:
    assert learning_difficulty([0.0, 0.0, 0.0]) == 0.0


@pytest.mark.parametrize(
    "losses",
    [[1.0], [], [1.0, -0.1], [1.0, float("nan")], [float("inf"), 1.0], [[1.0, 2.0]]],
)
def test_bad_loss_curves_are_rejected(losses: list[float]) -> None:
    with pytest.raises(ValueError, match="epoch_losses"):
        learning_difficulty(losses)


def test_profile_clients_fills_every_field() -> None:
    # Prepare
    hist = np.array([[4, 0, 0], [2, 2, 0]])

    # Execute
    profiles = profile_clients(hist)

    # Assert
    assert [p.client for p in profiles] == [0, 1]
    assert [p.n_samples for p in profiles] == [4, 4]
    assert profiles[1].histogram == (2, 2, 0)
    assert [p.labels_held for p in profiles] == [1, 2]
    assert profiles[0].entropy == 0.0
    assert profiles[1].entropy == pytest.approx(math.log(2))
    assert profiles[1].gini_simpson == pytest.approx(0.5)
    assert all(p.learning_difficulty is None for p in profiles)


def test_profile_clients_adds_learning_difficulty_after_warmup() -> None:
    hist = np.array([[4, 0], [2, 2]])

    profiles = profile_clients(hist, [[1.0, 1.0], [1.0, 3.0]])

    assert profiles[0].learning_difficulty == pytest.approx(1.0)
    assert profiles[1].criterion("learning_difficulty") == pytest.approx(
        learning_difficulty([1.0, 3.0])
    )


def test_profile_clients_names_the_client_with_a_bad_curve() -> None:
    with pytest.raises(ValueError, match="client 1: epoch_losses"):
        profile_clients(np.array([[1, 1], [2, 0]]), [[1.0, 0.5], [1.0]])


def test_profile_clients_needs_one_curve_per_client() -> None:
    with pytest.raises(ValueError, match="one loss curve per client"):
        profile_clients(np.array([[1, 1], [2, 0]]), [[1.0, 0.5]])


def test_profile_clients_rejects_an_empty_client() -> None:
    with pytest.raises(ValueError, match=r"client\(s\) \[0\]"):
        profile_clients(np.array([[0, 0], [2, 0]]))


def test_profile_clients_rejects_fractional_counts() -> None:
    with pytest.raises(ValueError, match="integer"):
        profile_clients(np.array([[1.5, 1.0]]))
