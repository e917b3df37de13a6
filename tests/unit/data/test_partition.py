"""Tests for autorank.data.partition: every scheme's properties and own shape, validation."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from sklearn.datasets import load_digits

from autorank.config import Scheme
from autorank.data.partition import (
    label_histogram,
    partition,
    scheme_params,
    split_local,
    split_public,
)
from autorank.ranking.profiling import label_entropy

SCHEMES: list[tuple[Scheme, dict[str, Any]]] = [
    ("iid", {}),
    ("dirichlet", {"alpha": 0.5}),
    ("shards", {"shards_per_client": 2}),
    ("quantity_skew", {"sigma": 1.0}),
    ("double_imbalance", {}),
]


def balanced_labels(n_classes: int = 10, per_class: int = 50, seed: int = 0) -> np.ndarray:
    """``per_class`` samples of each class, in a shuffled order."""
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(n_classes), per_class))


@pytest.fixture(scope="module")
def digits_labels() -> np.ndarray:
    return np.asarray(load_digits().target)


@pytest.mark.parametrize(("scheme", "params"), SCHEMES)
@pytest.mark.parametrize("n_clients", [1, 7, 10, 13])
def test_every_scheme_covers_each_index_exactly_once(
    scheme: Scheme, params: dict[str, Any], n_clients: int
) -> None:
    # Prepare
    labels = balanced_labels()

    # Execute
    parts = partition(labels, scheme, n_clients, seed=3, **params)

    # Assert
    assert len(parts) == n_clients
    assert all(p.dtype == np.int64 and p.size > 0 for p in parts)
    assert all(np.all(np.diff(p) > 0) for p in parts)  # sorted, no repeats
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(labels.size))


@pytest.mark.parametrize(("scheme", "params"), SCHEMES)
def test_same_seed_same_split_other_seed_other_split(
    scheme: Scheme, params: dict[str, Any]
) -> None:
    # Prepare
    labels = balanced_labels()

    # Execute
    first = partition(labels, scheme, 10, seed=11, **params)
    again = partition(labels, scheme, 10, seed=11, **params)
    other = partition(labels, scheme, 10, seed=12, **params)

    # Assert
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_iid_sizes_differ_by_at_most_one() -> None:
    parts = partition(balanced_labels(), "iid", 7, seed=0)

    sizes = [p.size for p in parts]

    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_label_entropy_falls_as_alpha_falls() -> None:
    # Prepare
    labels = balanced_labels(per_class=100)
    alphas = [100.0, 1.0, 0.1]

    # Execute
    mean_entropy = [
        np.mean(
            [
                label_entropy(label_histogram(labels, parts, 10)).mean()
                for parts in (
                    partition(labels, "dirichlet", 10, seed=s, alpha=a, min_size=1)
                    for s in range(3)
                )
            ]
        )
        for a in alphas
    ]

    # Assert
    assert mean_entropy[0] > mean_entropy[1] > mean_entropy[2]
    assert mean_entropy[0] > 0.95 * np.log(10)  # large alpha is close to IID


def test_dirichlet_gives_every_client_min_size() -> None:
    parts = partition(balanced_labels(), "dirichlet", 10, seed=0, alpha=0.3, min_size=20)

    assert min(p.size for p in parts) >= 20


def test_dirichlet_impossible_min_size_says_what_to_change() -> None:
    with pytest.raises(ValueError, match="raise alpha"):
        partition(balanced_labels(), "dirichlet", 10, seed=0, alpha=0.01, min_size=45)


def test_dirichlet_min_size_beyond_data_is_rejected_at_once() -> None:
    with pytest.raises(ValueError, match="min_size"):
        partition(balanced_labels(), "dirichlet", 10, seed=0, alpha=1.0, min_size=51)


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), "0.5"])
def test_dirichlet_rejects_a_bad_alpha(alpha: Any) -> None:
    with pytest.raises(ValueError, match="alpha"):
        partition(balanced_labels(), "dirichlet", 10, seed=0, alpha=alpha)


def test_dirichlet_needs_alpha() -> None:
    with pytest.raises(ValueError, match="needs parameter"):
        partition(balanced_labels(), "dirichlet", 10, seed=0)


def test_shards_give_each_client_at_most_its_shard_count_of_labels() -> None:
    # Prepare: 10 classes x 50 samples, 20 shards of 25: every shard holds one label.
    labels = balanced_labels()

    # Execute
    parts = partition(labels, "shards", 10, seed=4, shards_per_client=2)

    # Assert
    held = (label_histogram(labels, parts, 10) > 0).sum(axis=1)
    assert held.max() <= 2
    assert [p.size for p in parts] == [50] * 10


def test_shards_more_than_samples_is_rejected() -> None:
    with pytest.raises(ValueError, match="shards_per_client"):
        partition(np.arange(10), "shards", 5, seed=0, shards_per_client=3)


def test_quantity_skew_grows_with_sigma() -> None:
    # Prepare
    labels = balanced_labels(per_class=100)

    # Execute
    flat = [p.size for p in partition(labels, "quantity_skew", 10, seed=1, sigma=0.0)]
    skewed = [p.size for p in partition(labels, "quantity_skew", 10, seed=1, sigma=2.0)]

    # Assert
    assert max(flat) - min(flat) <= 1
    assert max(skewed) > 4 * min(skewed)


def test_quantity_skew_gives_every_client_a_sample_even_at_n_equal_k() -> None:
    parts = partition(np.zeros(6, dtype=int), "quantity_skew", 6, seed=0, sigma=3.0)

    assert [p.size for p in parts] == [1] * 6


@pytest.mark.parametrize("source", ["synthetic", "digits"])
def test_double_imbalance_matches_the_paper_at_ten_by_ten(
    source: str, digits_labels: np.ndarray
) -> None:
    # Prepare
    labels = balanced_labels(per_class=60) if source == "synthetic" else digits_labels

    # Execute
    parts = partition(labels, "double_imbalance", 10, seed=0)

    # Assert
    sizes = np.array([p.size for p in parts])
    assert np.all(np.diff(sizes) > 0)
    held = label_histogram(labels, parts, 10) > 0
    expected = np.tril(np.ones((10, 10), dtype=bool))  # client i holds classes 0..i
    np.testing.assert_array_equal(held, expected)


def test_double_imbalance_splits_each_class_evenly_among_holders() -> None:
    labels = balanced_labels(per_class=90)

    hist = label_histogram(labels, partition(labels, "double_imbalance", 10, seed=0), 10)

    for c in range(10):
        shares = hist[c:, c]  # clients c..9 hold class c
        assert shares.max() - shares.min() <= 1


def test_double_imbalance_repeats_its_pattern_when_clients_outnumber_classes() -> None:
    labels = balanced_labels(per_class=60)

    held = label_histogram(labels, partition(labels, "double_imbalance", 15, seed=0), 10) > 0

    assert [int(row.sum()) for row in held] == [*range(1, 11), *range(1, 6)]
    assert np.all(held[:, 0])


def test_double_imbalance_wraps_classes_when_classes_outnumber_clients() -> None:
    labels = balanced_labels(per_class=20)

    held = label_histogram(labels, partition(labels, "double_imbalance", 4, seed=0), 10) > 0

    expected = np.array([[c % 4 <= i for c in range(10)] for i in range(4)])
    np.testing.assert_array_equal(held, expected)


def test_double_imbalance_names_the_fix_when_a_client_ends_empty() -> None:
    # Prepare: class 0 has 5 samples for 12 holders; client 10 holds class 0 only.
    labels = np.concatenate([np.zeros(5, dtype=int), np.repeat(np.arange(1, 10), 30)])

    # Execute / Assert
    with pytest.raises(ValueError, match=r"client\(s\) \[10\].*lower n_clients"):
        partition(labels, "double_imbalance", 12, seed=0)


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (np.zeros((3, 2), dtype=int), "1-D"),
        (np.zeros(0, dtype=int), "at least one sample"),
        (np.array([0.0, 1.0]), "integer"),
        (np.array([0, -1, 2]), "non-negative"),
    ],
)
def test_bad_labels_are_rejected(labels: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        partition(labels, "iid", 1, seed=0)


@pytest.mark.parametrize(
    ("n_clients", "seed", "match"),
    [(0, 0, "n_clients"), (11, 0, "n_clients"), (True, 0, "n_clients"), (2, -1, "seed")],
)
def test_bad_counts_and_seeds_are_rejected(n_clients: Any, seed: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        partition(np.arange(10), "iid", n_clients, seed=seed)


def test_unknown_scheme_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="double_imbalance"):
        partition(np.arange(10), "pathological", 2, seed=0)  # type: ignore[arg-type]


def test_unknown_parameter_names_it_and_the_accepted_ones() -> None:
    with pytest.raises(ValueError, match=r"\['sigma'\].*'shards'.*\['shards_per_client'\]"):
        partition(np.arange(10), "shards", 2, seed=0, sigma=1.0)


def test_scheme_params_lists_what_partition_accepts() -> None:
    assert scheme_params("dirichlet") == ("alpha", "min_size")
    assert scheme_params("iid") == ()


def test_label_histogram_counts_by_hand() -> None:
    # Prepare
    labels = np.array([0, 1, 1, 2, 2, 2])
    parts = [np.array([0, 1]), np.array([2, 3, 4, 5]), np.array([], dtype=np.int64)]

    # Execute
    hist = label_histogram(labels, parts, 4)

    # Assert
    np.testing.assert_array_equal(hist, [[1, 1, 0, 0], [0, 1, 3, 0], [0, 0, 0, 0]])
    assert hist.dtype == np.int64


def test_label_histogram_rejects_a_label_beyond_n_classes() -> None:
    with pytest.raises(ValueError, match="n_classes"):
        label_histogram(np.array([0, 3]), [np.array([0, 1])], 3)


def test_label_histogram_rejects_an_index_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"parts\[0\]"):
        label_histogram(np.array([0, 1]), [np.array([2])], 2)


def test_split_local_holds_out_the_fraction_and_keeps_everything() -> None:
    # Prepare
    indices = np.arange(100, 120)

    # Execute
    train, test = split_local(indices, 0.25, seed=0)

    # Assert
    assert (train.size, test.size) == (15, 5)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), indices)
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)


def test_split_local_zero_fraction_gives_an_empty_test_set() -> None:
    train, test = split_local(np.arange(5), 0.0, seed=0)

    np.testing.assert_array_equal(train, np.arange(5))
    assert test.size == 0


def test_split_local_keeps_one_training_sample() -> None:
    train, test = split_local(np.array([7, 9]), 0.9, seed=0)

    assert (train.size, test.size) == (1, 1)


def test_split_local_is_deterministic_and_seed_dependent() -> None:
    indices = np.arange(50)

    first, again, other = (split_local(indices, 0.2, seed=s)[1] for s in (1, 1, 2))

    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize(
    ("indices", "fraction", "match"),
    [
        (np.arange(5), 1.0, "fraction"),
        (np.arange(5), -0.1, "fraction"),
        (np.array([]), 0.2, "empty"),
    ],
)
def test_split_local_rejects_bad_input(indices: np.ndarray, fraction: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        split_local(indices, fraction, seed=0)


def test_split_public_is_stratified_and_complementary(digits_labels: np.ndarray) -> None:
    # Prepare
    fraction = 0.1

    # Execute
    public, private = split_public(digits_labels, fraction, seed=0)

    # Assert
    np.testing.assert_array_equal(
        np.sort(np.concatenate([public, private])), np.arange(digits_labels.size)
    )
    assert public.size == round(fraction * digits_labels.size)
    per_class = np.bincount(digits_labels[public], minlength=10)
    ideal = fraction * np.bincount(digits_labels, minlength=10)
    assert np.all(np.abs(per_class - ideal) < 1)


def test_split_public_zero_fraction_keeps_everything_private() -> None:
    public, private = split_public(balanced_labels(), 0.0, seed=0)

    assert public.size == 0
    np.testing.assert_array_equal(private, np.arange(500))


def test_split_public_is_deterministic_and_seed_dependent() -> None:
    labels = balanced_labels()

    first, again, other = (split_public(labels, 0.2, seed=s)[0] for s in (5, 5, 6))

    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
