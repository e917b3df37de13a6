"""Cohorts: which clients train in a round, how they are split, and the engine each chunk uses.

The unit of orchestration is a cohort (a chunk of a round's sampled clients), not a client: a
round is a handful of tasks whatever the number of clients. Sampling is seeded per round, so a
resumed run samples the same clients as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Literal, TypeVar

import numpy as np
import torch
from torch import nn

from autorank.backend import ClientBackend
from autorank.lora.settings import LoraSettings
from autorank.training import TrainSettings

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


# A batched cohort on a CPU runs Python for every step (vmap, the optimiser) and only its
# matrix products release the GIL, so cohorts on parallel threads pay off only with enough
# arithmetic per step. Measured on 2 cores: the digits MLP (55k base parameters), 10 clients, ran
# a round in 0.31 s as one cohort and 0.39 s as two; the Fashion-MNIST MLP (199k), 100 clients,
# in 1.21 s as one and 0.96 s as two.
CPU_BATCHED_GRAIN = 4_000_000  # clients x base parameters per cohort thread, at least


def cohort_count(
    n_sampled: int, *, workers: int, cohort_size: int | None, grain_work: int | None = None
) -> int:
    """Cohorts per round: ``ceil(n / cohort_size)``, or one per worker by default.

    Args:
        grain_work: without ``cohort_size``, the round's work in clients x base parameters,
            to give each cohort at least ``CPU_BATCHED_GRAIN`` of it (the batched engine on a
            CPU); None: one cohort per worker.
    """
    if cohort_size is not None:
        return max(1, math.ceil(n_sampled / cohort_size))
    if grain_work is not None:
        workers = min(workers, grain_work // CPU_BATCHED_GRAIN)
    return max(1, min(workers, n_sampled))


def why_not_batched(
    base: nn.Module, targets: Sequence[str], lora: LoraSettings, x: torch.Tensor
) -> str | None:
    """Why the batched engine cannot train this model, or None when it can.

    Tries one batched forward and backward of two clients on two samples of ``x``.
    """
    from autorank.backend import ClientJob
    from autorank.batched import BatchedBackend

    if lora.dropout != 0:
        return f"lora.dropout is {lora.dropout} (the batched forward draws no dropout masks)"
    probe_train = TrainSettings("sgd", 0.0, 0.0, 0.0, 2, None)
    try:
        engine = BatchedBackend(base, targets, lora, probe_train, torch.device("cpu"))
        y = torch.zeros(min(2, x.shape[0]), dtype=torch.long)
        ranks = dict.fromkeys(targets, 1)
        jobs = [ClientJob(i, ranks, None, x[:2], y, 1, i) for i in range(2)]
        engine.train_clients(jobs)
    except Exception as err:  # any failure to trace the model means: not batchable
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".strip()
    return None


def make_backend(
    kind: Literal["sequential", "batched"],
    base: nn.Module,
    targets: Sequence[str],
    lora: LoraSettings,
    train: TrainSettings,
    device: torch.device,
    *,
    max_clients: int,
) -> ClientBackend:
    """The engine of one cohort slot, of a kind already resolved from ``runtime.backend``."""
    if kind == "batched":
        from autorank.batched import BatchedBackend

        return BatchedBackend(base, targets, lora, train, device, max_clients=max_clients)
    if kind != "sequential":
        raise ValueError(f"backend must be 'sequential' or 'batched', got {kind!r}")
    from autorank.sequential import SequentialBackend

    return SequentialBackend(base, lora, train, device)
