"""Client sampling and cohort splitting."""

from __future__ import annotations

import pytest

from autorank.engine.factory import CPU_BATCHED_GRAIN, cohort_count
from autorank.rounds.cohorts import participants, sample_clients, split_cohorts


def test_participants_from_a_count_a_fraction_or_everyone() -> None:
    assert participants(10, None) == 10
    assert participants(10, 3) == 3
    assert participants(1000, 0.1) == 100
    assert participants(10, 0.01) == 1  # at least one client
    with pytest.raises(ValueError, match="between 1 and the 10 clients, got 11"):
        participants(10, 11)
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\], got 1.5"):
        participants(10, 1.5)


def test_sampling_is_seeded_per_round_and_without_replacement() -> None:
    # Execute
    rounds = [sample_clients(50, 10, seed=3, round_idx=r) for r in range(1, 6)]

    # Assert
    assert rounds[0] == sample_clients(50, 10, seed=3, round_idx=1)  # what a resume redraws
    assert all(len(set(r)) == 10 and r == sorted(r) for r in rounds)
    assert all(0 <= c < 50 for r in rounds for c in r)
    assert len({tuple(r) for r in rounds}) == 5  # rounds differ
    assert sample_clients(50, 10, seed=4, round_idx=1) != rounds[0]  # seeds differ
    assert sample_clients(5, None, seed=3, round_idx=1) == [0, 1, 2, 3, 4]


def test_every_client_is_sampled_about_equally_often() -> None:
    counts = [0] * 20
    for r in range(1, 401):
        for c in sample_clients(20, 5, seed=0, round_idx=r):
            counts[c] += 1

    assert sum(counts) == 400 * 5
    assert min(counts) > 70 and max(counts) < 130  # expected 100 each


def test_split_without_work_gives_contiguous_near_equal_chunks() -> None:
    assert split_cohorts(list(range(7)), 3) == [[0, 1], [2, 3, 4], [5, 6]]
    assert split_cohorts([4, 9], 5) == [[4], [9]]  # never an empty cohort
    assert split_cohorts([], 2) == []
    with pytest.raises(ValueError, match="n_cohorts must be >= 1"):
        split_cohorts([1], 0)


def test_split_with_work_balances_the_load() -> None:
    # Prepare: one heavy client and many light ones
    items = ["a", "b", "c", "d", "e", "f"]
    work = [1.0, 1.0, 1.0, 1.0, 1.0, 5.0]

    # Execute
    cohorts = split_cohorts(items, 2, work)

    # Assert: every item once, in its given order, loads 5 and 5
    assert sorted(x for c in cohorts for x in c) == items
    assert all(c == sorted(c) for c in cohorts)
    loads = sorted(sum(work[items.index(x)] for x in c) for c in cohorts)
    assert loads == [5.0, 5.0]
    with pytest.raises(ValueError, match="work lists 1 items, expected 6"):
        split_cohorts(items, 2, [1.0])


def test_cohort_count_per_worker_or_by_size() -> None:
    assert cohort_count(1000, workers=2, cohort_size=None) == 2
    assert cohort_count(1, workers=8, cohort_size=None) == 1
    assert cohort_count(1000, workers=2, cohort_size=64) == 16


def test_cohort_count_gives_cpu_batched_cohorts_a_grain_of_work() -> None:
    grain = CPU_BATCHED_GRAIN
    assert cohort_count(10, workers=2, cohort_size=None, grain_work=grain - 1) == 1
    assert cohort_count(100, workers=2, cohort_size=None, grain_work=2 * grain) == 2
    assert cohort_count(100, workers=8, cohort_size=None, grain_work=3 * grain + 1) == 3
    assert cohort_count(100, workers=2, cohort_size=None, grain_work=50 * grain) == 2
    assert cohort_count(100, workers=2, cohort_size=10, grain_work=0) == 10  # asked for
