"""The client-training boundary: ``train_clients(jobs, tests) -> outcomes``.

Flows and aggregation see only ``ClientJob`` in and ``ClientOutcome`` out. A backend is built
once per cohort slot and kept for the whole run: ``SequentialBackend`` (``engine.sequential``)
trains the cohort's clients one after another on persistent peft models, ``BatchedBackend``
(``engine.batched``) trains them together in one forward/backward per local step. Nothing here
imports peft.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch
from torch import nn

from autorank.engine.local import LocalResult, StopSignal, client_seed
from autorank.lora.adapters import AdapterState
from autorank.models.evaluation import EvalResult

logger = logging.getLogger(__name__)

DevicePreference = Literal["auto", "cpu", "cuda"]


@dataclass(frozen=True)
class ClientJob:
    """One client's local training in one round.

    Attributes:
        client: the client's index.
        ranks: target key -> rank of this client's adapter.
        state: the state to start from (the server's download), or None for a fresh LoRA init
            from the common base (the warm-up round).
        x: the client's training inputs ``[n, ...]``; y: labels ``[n]``.
        epochs: local epochs.
        seed: the job's seed (``client_seed(seed, round, client)``).
        max_steps: at most this many steps per epoch (``training.local_steps``), each epoch a
            fresh order of the client's data; None: every batch.
    """

    client: int
    ranks: dict[str, int]
    state: AdapterState | None
    x: torch.Tensor
    y: torch.Tensor
    epochs: int
    seed: int
    max_steps: int | None = None

    def batches_per_epoch(self, batch_size: int, accumulation: int = 1) -> int:
        """Mini-batches one local epoch visits: all of them, or ``max_steps`` optimiser steps of
        ``accumulation`` mini-batches each."""
        batches = math.ceil(int(self.x.shape[0]) / batch_size)
        return batches if self.max_steps is None else min(batches, self.max_steps * accumulation)

    def steps_per_epoch(self, batch_size: int, accumulation: int = 1) -> int:
        """Optimiser steps of one local epoch at ``batch_size``, ``accumulation`` mini-batches
        a step (the epoch's last step takes those left)."""
        return math.ceil(self.batches_per_epoch(batch_size, accumulation) / accumulation)


@dataclass(frozen=True)
class LocalSplit:
    """A client's held-out samples for its personalised accuracy: ``x [m, ...]``, ``y [m]``."""

    x: torch.Tensor
    y: torch.Tensor


@dataclass(frozen=True)
class ClientOutcome:
    """A client's trained update and its personalised accuracy (None without a local split)."""

    result: LocalResult
    personal: EvalResult | None


def substreams(seed: int) -> tuple[int, int]:
    """Independent seeds for LoRA initialisation and data order."""
    init, order = np.random.SeedSequence(seed).generate_state(2, dtype=np.uint32)
    return int(init), int(order)


class ClientBackend(Protocol):
    """Trains a cohort's clients from one frozen base; one outcome per job, in the jobs' order."""

    name: str
    stop: StopSignal  # set by the run: the next local step raises ``TrainingStoppedError``

    def train_clients(
        self, jobs: Sequence[ClientJob], tests: Sequence[LocalSplit | None] | None = None
    ) -> list[ClientOutcome]:
        """Train every job; evaluate each on its local split where one is given."""
        ...

    def sync_base(self, base: nn.Module, version: int) -> None:
        """See the base's weights as of ``version`` (FLoRA merges into it between rounds).

        A no-op when the engine already saw that version (or shares the base's tensors).
        """
        ...


def pick_device(preference: DevicePreference, client: int = 0) -> torch.device:
    """The device for a client: ``auto`` takes CUDA when present, clients spread over GPUs.

    Raises:
        ValueError: ``cuda`` requested without CUDA, or an unknown preference.
    """
    if preference not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {preference!r}")
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available (use 'auto' or 'cpu')")
    return torch.device("cuda", client % torch.cuda.device_count())


def limit_threads(n: int) -> None:
    """Bound torch's intra-op CPU threads (e.g. 1 per client task when tasks run in parallel)."""
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    torch.set_num_threads(n)


def capped_ranks(ranks: dict[str, int], cap: int | None) -> dict[str, int]:
    """``ranks`` on a device that holds at most rank ``cap`` (None: uncapped, ``ranks`` itself)."""
    return ranks if cap is None else {k: min(r, cap) for k, r in ranks.items()}


def warmup_jobs(
    xs: Sequence[torch.Tensor],
    ys: Sequence[torch.Tensor],
    *,
    ranks: dict[str, int],
    epochs: int,
    seed: int,
    round_idx: int = 0,
    caps: Sequence[int | None] | None = None,
    max_steps: int | None = None,
    first: int = 0,
) -> list[ClientJob]:
    """The warm-up round: every client at the maximum ranks (or at its device's cap, if lower),
    fresh LoRA from the common base.

    Args:
        xs, ys: each client's training inputs and labels, client ``i`` at position ``i``.
        ranks: the maximum rank of each target.
        epochs: local epochs ``E >= 2`` (learning difficulty needs a loss curve).
        seed: the experiment seed; round ``round_idx`` (keep it distinct from training rounds).
        caps: each client's rank cap (None: uncapped), as ``autorank.ranking.budget.draw_caps``
            gives them: a device that holds at most rank r warms up at rank r too.
        max_steps: at most this many steps per epoch (None: every batch).
        first: the client index of ``xs[0]`` (the warm-up trains a population a part at a time).
    """
    if epochs < 2:
        raise ValueError(f"warm-up epochs must be >= 2 for learning difficulty, got {epochs}")
    if len(xs) != len(ys):
        raise ValueError(f"xs and ys must list the same clients, got {len(xs)} and {len(ys)}")
    caps = [None] * len(xs) if caps is None else list(caps)
    if len(caps) != len(xs):
        raise ValueError(f"caps must list every client, got {len(caps)} for {len(xs)}")
    return [
        ClientJob(
            i,
            dict(capped_ranks(ranks, cap)),
            None,
            x,
            y,
            epochs,
            client_seed(seed, round_idx, i),
            max_steps,
        )
        for i, (x, y, cap) in enumerate(zip(xs, ys, caps, strict=True), start=first)
    ]


def warmup(backend: ClientBackend, jobs: Sequence[ClientJob]) -> list[tuple[float, ...]]:
    """Run the warm-up jobs; each client's per-epoch mean losses (input to learning difficulty)."""
    return [o.result.epoch_losses for o in backend.train_clients(jobs)]
