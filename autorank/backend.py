"""The client-training boundary: ``train_clients(base, jobs) -> results``.

Flows and aggregation see only ``ClientJob`` in and ``LocalResult`` out, so a backend that trains
many clients at once (batched on one GPU, spread over several) can replace ``SequentialBackend``
without touching them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch
from peft import PeftModel
from torch import nn

from autorank.adapters import AdapterState
from autorank.config import LoraConfig
from autorank.evaluation import EvalResult, evaluate
from autorank.lora import AlphaPolicy, get_adapter_state, set_adapter_state, wrap_lora
from autorank.training import LocalResult, TrainSettings, client_seed, train_local

logger = logging.getLogger(__name__)

DevicePreference = Literal["auto", "cpu", "cuda"]


@dataclass(frozen=True)
class LoraSettings:
    """How clients' adapters are built (see ``autorank.lora.wrap_lora``)."""

    policy: AlphaPolicy
    alpha: float
    alpha_ratio: float
    dropout: float
    head: tuple[str, ...]

    @classmethod
    def from_config(cls, lora: LoraConfig, head: Sequence[str]) -> LoraSettings:
        """From the ``lora`` config section and the model's ``head_modules``."""
        return cls(lora.alpha_policy, lora.alpha, lora.alpha_ratio, lora.dropout, tuple(head))


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
    """

    client: int
    ranks: dict[str, int]
    state: AdapterState | None
    x: torch.Tensor
    y: torch.Tensor
    epochs: int
    seed: int


def _substreams(seed: int) -> tuple[int, int]:
    """Independent seeds for LoRA initialisation and data order."""
    init, order = np.random.SeedSequence(seed).generate_state(2, dtype=np.uint32)
    return int(init), int(order)


def build_client_model(
    base: nn.Module,
    ranks: dict[str, int],
    state: AdapterState | None,
    lora: LoraSettings,
    seed: int,
) -> PeftModel:
    """A wrapped copy of ``base`` at ``ranks`` holding ``state`` (fresh LoRA if None)."""
    model = wrap_lora(
        base,
        ranks,
        policy=lora.policy,
        alpha=lora.alpha,
        alpha_ratio=lora.alpha_ratio,
        dropout=lora.dropout,
        head=lora.head,
        seed=seed,
    )
    if state is not None:
        set_adapter_state(model, state)
    return model


def run_client_job(
    base: nn.Module, job: ClientJob, lora: LoraSettings, train: TrainSettings, device: torch.device
) -> LocalResult:
    """Wrap a copy of ``base`` with the job's ranks, load its state, train, and read it back."""
    start = time.perf_counter()
    init_seed, order_seed = _substreams(job.seed)
    model = build_client_model(base, job.ranks, job.state, lora, init_seed)
    losses, steps = train_local(
        model, job.x, job.y, train, epochs=job.epochs, seed=order_seed, device=device
    )
    state = get_adapter_state(model)
    seconds = time.perf_counter() - start
    logger.debug("client %d: %d steps in %.3f s, losses %s", job.client, steps, seconds, losses)
    return LocalResult(job.client, state, int(job.x.shape[0]), tuple(losses), seconds, steps)


class ClientBackend(Protocol):
    """Trains a round's clients; returns one result per job, in the jobs' order."""

    def train_clients(self, base: nn.Module, jobs: Sequence[ClientJob]) -> list[LocalResult]:
        """Run every job from the same frozen ``base``."""
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


class SequentialBackend:
    """Runs jobs one after another on one device (``pick_device(preference)``).

    Args:
        lora: adapter settings shared by all clients.
        train: optimiser settings shared by all clients.
        device: a device, or a preference resolved with ``pick_device``.
    """

    def __init__(
        self,
        lora: LoraSettings,
        train: TrainSettings,
        device: torch.device | DevicePreference = "auto",
    ) -> None:
        self.lora = lora
        self.train = train
        self.device = device if isinstance(device, torch.device) else pick_device(device)

    def train_clients(self, base: nn.Module, jobs: Sequence[ClientJob]) -> list[LocalResult]:
        """Run every job from the same frozen ``base``; results in the jobs' order."""
        return [run_client_job(base, job, self.lora, self.train, self.device) for job in jobs]


def warmup_jobs(
    xs: Sequence[torch.Tensor],
    ys: Sequence[torch.Tensor],
    *,
    ranks: dict[str, int],
    epochs: int,
    seed: int,
    round_idx: int = 0,
) -> list[ClientJob]:
    """The warm-up round: every client at the maximum ranks, fresh LoRA from the common base.

    Args:
        xs, ys: each client's training inputs and labels, client ``i`` at position ``i``.
        ranks: the maximum rank of each target.
        epochs: local epochs ``E >= 2`` (learning difficulty needs a loss curve).
        seed: the experiment seed; round ``round_idx`` (keep it distinct from training rounds).
    """
    if epochs < 2:
        raise ValueError(f"warm-up epochs must be >= 2 for learning difficulty, got {epochs}")
    if len(xs) != len(ys):
        raise ValueError(f"xs and ys must list the same clients, got {len(xs)} and {len(ys)}")
    return [
        ClientJob(i, dict(ranks), None, x, y, epochs, client_seed(seed, round_idx, i))
        for i, (x, y) in enumerate(zip(xs, ys, strict=True))
    ]


def warmup(
    backend: ClientBackend, base: nn.Module, jobs: Sequence[ClientJob]
) -> list[tuple[float, ...]]:
    """Run the warm-up jobs; each client's per-epoch mean losses (input to learning difficulty)."""
    return [r.epoch_losses for r in backend.train_clients(base, jobs)]


def personalised_eval(
    base: nn.Module,
    state: AdapterState,
    ranks: dict[str, int],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lora: LoraSettings,
    device: torch.device,
) -> EvalResult:
    """Evaluate a client's state (at its ranks) on the client's own held-out split."""
    model = build_client_model(base, ranks, state, lora, seed=0)
    return evaluate(model, x, y, device=device)
