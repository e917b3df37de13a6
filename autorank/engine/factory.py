"""Which engine trains a cohort, and how many cohorts a round has: the engine registry, the
batched engine's probe (``why_not_batched``) and the cohort count."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from autorank.engine.jobs import ClientBackend, ClientJob
from autorank.engine.local import TrainSettings
from autorank.lora.settings import LoraSettings

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
    from autorank.engine.batched import BatchedBackend

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


@dataclass(frozen=True)
class EngineRequest:
    """What an engine of one cohort slot is built from."""

    base: nn.Module
    targets: Sequence[str]
    lora: LoraSettings
    train: TrainSettings
    device: torch.device
    max_clients: int


def _sequential(r: EngineRequest) -> ClientBackend:
    from autorank.engine.sequential import SequentialBackend  # peft's import costs seconds

    return SequentialBackend(r.base, r.lora, r.train, r.device)


def _batched(r: EngineRequest) -> ClientBackend:
    from autorank.engine.batched import BatchedBackend

    return BatchedBackend(r.base, r.targets, r.lora, r.train, r.device, max_clients=r.max_clients)


# ``runtime.backend`` (once ``auto`` is resolved) -> the engine of one cohort slot.
ENGINES: dict[str, Callable[[EngineRequest], ClientBackend]] = {
    "sequential": _sequential,
    "batched": _batched,
}


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
    if kind not in ENGINES:
        raise ValueError(f"backend must be one of {sorted(ENGINES)}, got {kind!r}")
    return ENGINES[kind](EngineRequest(base, targets, lora, train, device, max_clients))
