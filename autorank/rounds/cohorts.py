"""Cohorts: which clients train in a round, and how they are split into cohorts.

The unit of orchestration is a cohort (a chunk of a round's sampled clients), not a client: a
round is a handful of tasks whatever the number of clients. Sampling is seeded per round, so a
resumed run samples the same clients as an uninterrupted one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

logger = logging.getLogger(__name__)

T = TypeVar("T")
_SAMPLING_STREAM = 0x5A  # keeps the sampling stream apart from the clients' (seed, round, client)


def participants(n_clients: int, per_round: int | float | None) -> int:
    """How many clients train each round: all (None), a count, or a fraction (at least one).

    Raises:
        ValueError: a count above ``n_clients``, below 1, or a fraction outside (0, 1].
    """
    if per_round is None:
        return n_clients
    if isinstance(per_round, float):
        if not 0.0 < per_round <= 1.0:
            raise ValueError(f"clients_per_round as a fraction must be in (0, 1], got {per_round}")
        return max(1, round(per_round * n_clients))
    if not 1 <= per_round <= n_clients:
        raise ValueError(
            f"clients_per_round must be between 1 and the {n_clients} clients, got {per_round}"
        )
    return per_round


def sample_clients(
    n_clients: int, per_round: int | float | None, *, seed: int, round_idx: int
) -> list[int]:
    """The clients that train in round ``round_idx``, ascending.

    Drawn without replacement from ``SeedSequence([seed, round_idx, stream])``: the same for a
    given seed and round whatever ran before (resume), independent of the clients' own streams.
    """
    m = participants(n_clients, per_round)
    if m == n_clients:
        return list(range(n_clients))
    rng = np.random.default_rng(np.random.SeedSequence([seed, round_idx, _SAMPLING_STREAM]))
    return sorted(int(c) for c in rng.choice(n_clients, size=m, replace=False))


def split_cohorts(
    items: Sequence[T], n_cohorts: int, work: Sequence[float] | None = None
) -> list[list[T]]:
    """Split ``items`` into at most ``n_cohorts`` non-empty cohorts of near-equal work.

    Longest-processing-time first: items in decreasing ``work`` (ties by position) each join
    the cohort with the least work so far; each cohort keeps its items in their given order.
    Without ``work`` every item counts the same, giving contiguous near-equal chunks.

    Raises:
        ValueError: ``n_cohorts`` below 1, or ``work`` of another length than ``items``.
    """
    if n_cohorts < 1:
        raise ValueError(f"n_cohorts must be >= 1, got {n_cohorts}")
    k = min(n_cohorts, len(items))
    if k == 0:
        return []
    if work is None:
        bounds = [round(i * len(items) / k) for i in range(k + 1)]
        return [list(items[bounds[i] : bounds[i + 1]]) for i in range(k)]
    if len(work) != len(items):
        raise ValueError(f"work lists {len(work)} items, expected {len(items)}")
    loads = [0.0] * k
    members: list[list[int]] = [[] for _ in range(k)]
    for pos in sorted(range(len(items)), key=lambda p: (-work[p], p)):
        lightest = min(range(k), key=lambda c: (loads[c], c))
        loads[lightest] += work[pos]
        members[lightest].append(pos)
    return [[items[p] for p in sorted(m)] for m in members]
