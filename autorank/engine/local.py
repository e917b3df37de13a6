"""Local training of one client: a tight loop over tensors already on the device.

Determinism: the data order comes from a ``torch.Generator`` seeded per call, so the same seed
gives bit-identical results on CPU whatever ran before or beside it; per-client seeds are derived
with ``np.random.SeedSequence`` so sequential and parallel runs see the same streams.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from autorank.config import TrainingConfig
from autorank.engine.optim import ClientOptimizer
from autorank.lora.adapters import AdapterState
from autorank.models.objectives import objective_of, per_sample

logger = logging.getLogger(__name__)

Optimizer = Literal["sgd", "adam", "adamw"]


def client_seed(seed: int, round_idx: int, client: int) -> int:
    """A 63-bit seed for one client in one round: ``SeedSequence([seed, round_idx, client])``."""
    for label, value in (("seed", seed), ("round_idx", round_idx), ("client", client)):
        if value < 0:
            raise ValueError(f"{label} must be >= 0, got {value}")
    state = np.random.SeedSequence([seed, round_idx, client]).generate_state(1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


class TrainingStoppedError(Exception):
    """Training was asked to stop between two steps: the run is ending (Ctrl-C, SIGTERM, or
    another cohort failed), and this cohort's unfinished work is dropped."""


class StopSignal:
    """A flag the run raises so that its engines stop at their next local step.

    Without it an interrupted run waited for every cohort in flight to finish its round (or a
    long warm-up) before it could exit. A plain attribute, read once per step: setting and
    reading it is atomic under the GIL, and it pickles (an engine shipped to a Dask worker gets
    a copy, which the run cannot raise).
    """

    def __init__(self) -> None:
        self.raised = False

    def set(self) -> None:
        """Ask the engine to stop at its next step."""
        self.raised = True

    def check(self) -> None:
        """Raise ``TrainingStoppedError`` if the run asked to stop."""
        if self.raised:
            raise TrainingStoppedError("training stopped: the run is ending")


@dataclass(frozen=True)
class LocalResult:
    """What one client's local training produced.

    Attributes:
        client: the client's index.
        state: the trained adapter state, on CPU.
        n_samples: training samples the client used (its aggregation weight).
        epoch_losses: mean training loss of each local epoch.
        seconds: wall time of the job (wrapping, training, state extraction).
        steps: optimiser steps taken.
    """

    client: int
    state: AdapterState
    n_samples: int
    epoch_losses: tuple[float, ...]
    seconds: float
    steps: int


def _check_data(x: torch.Tensor, y: torch.Tensor, batch_size: int, epochs: int) -> None:
    if x.shape[0] == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x and y must hold the same positive number of samples, got {x.shape[0]} and "
            f"{y.shape[0]}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")


@dataclass(frozen=True)
class TrainSettings:
    """The local optimiser and batch size (``momentum`` is ignored by Adam)."""

    optimizer: Optimizer
    lr: float
    momentum: float
    weight_decay: float
    batch_size: int
    grad_clip: float | None
    accumulation: int = 1  # mini-batches a step (``training.grad_accumulation``)

    @classmethod
    def from_config(cls, training: TrainingConfig) -> TrainSettings:
        """From the ``training`` config section."""
        return cls(
            optimizer=training.optimizer,
            lr=training.lr,
            momentum=training.momentum,
            weight_decay=training.weight_decay,
            batch_size=training.batch_size,
            grad_clip=training.grad_clip,
            accumulation=training.grad_accumulation,
        )


def train_local(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: TrainSettings,
    *,
    epochs: int,
    seed: int,
    device: torch.device,
    stop: StopSignal | None = None,
    max_steps: int | None = None,
) -> tuple[list[float], int]:
    """Train the parameters of ``model`` that require grad with cross-entropy, in place.

    The model is moved to ``device`` and stays there. Each epoch visits every sample once in an
    order drawn from a CPU ``torch.Generator`` seeded with ``seed``; the last batch may be short.

    Args:
        model: maps ``x [b, ...]`` to logits ``[b, n_classes]``.
        x: inputs ``[n, ...]``; y: integer labels ``[n]``.
        settings: optimiser, learning rate, momentum, weight decay, batch size, and the max
            global gradient norm (None: no clipping).
        epochs: passes over the data.
        seed: data-order seed.
        device: where to train.
        stop: checked before every step; ``TrainingStoppedError`` is raised once it is set.
        max_steps: at most this many optimiser steps per epoch (the first batches of its
            order); None: every batch. A step is ``settings.accumulation`` mini-batches whose
            gradients add up (each loss divided by the step's number of mini-batches).

    Returns:
        The sample-weighted mean loss of each epoch (over the samples it saw), and the number
        of optimiser steps.
    """
    batch_size = settings.batch_size
    _check_data(x, y, batch_size, epochs)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (nothing requires grad)")
    model.to(device)
    model.train()
    x, y = x.to(device), y.to(device=device, dtype=torch.long)
    opt = ClientOptimizer(params, settings)
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    group = settings.accumulation
    seen = n if max_steps is None else min(n, max_steps * batch_size * group)
    starts = range(0, seen, batch_size)
    losses: list[float] = []
    steps = 0
    objective = objective_of(model)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(device)
        total = torch.zeros((), device=device)  # summed on device: no host sync per step
        weight = torch.zeros((), device=device)  # what the epoch's loss is a mean over
        for first in range(0, len(starts), group):
            micro = starts[first : first + group]
            for p in params:
                p.grad = None
            for start in micro:
                if stop is not None:
                    stop.check()
                idx = order[start : start + batch_size]
                if objective == "classification":
                    loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                    batch_weight: torch.Tensor | int = idx.shape[0]
                else:  # a mean per scored token, and the epoch's too
                    summed, w, _ = per_sample(objective, model(x[idx]), y[idx], x[idx])
                    batch_weight = w.sum().detach()
                    loss = summed.sum() / w.sum().clamp_min(1.0)
                (loss / len(micro)).backward()  # the step's mean; / 1 is exact
                total += loss.detach() * batch_weight
                weight += batch_weight
            opt.clip()
            opt.step()
            steps += 1
        losses.append(
            float(total) / seen
            if objective == "classification"
            else float(total) / max(float(weight), 1.0)
        )
    logger.debug("trained %d steps, epoch losses %s", steps, losses)
    return losses, steps


def pretrain(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    optimizer: Optimizer = "sgd",
    momentum: float = 0.9,
    device: torch.device | None = None,
) -> list[float]:
    """Server-side full-parameter training on a public share of data, in place.

    Gives LoRA a meaningful base to adapt instead of random features.

    Args:
        model: the base model; every parameter is trained.
        x: inputs ``[n, ...]``; y: labels ``[n]``.
        epochs, lr, batch_size, optimizer, momentum: the training schedule.
        seed: data-order seed.
        device: where to train (default CPU); the model returns to its original device.

    Returns:
        Mean training loss of each epoch.
    """
    home = next(model.parameters()).device
    for p in model.parameters():
        p.requires_grad_(True)
    settings = TrainSettings(optimizer, lr, momentum, 0.0, batch_size, None)
    losses, _ = train_local(
        model, x, y, settings, epochs=epochs, seed=seed, device=device or torch.device("cpu")
    )
    model.to(home)
    logger.info("pre-trained base model for %d epochs: loss %s", epochs, losses)
    return losses
