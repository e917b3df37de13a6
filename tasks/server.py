"""The server's part of a round, as one task: aggregate, evaluate, checkpoint, log."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from torch import nn

from autorank.config import AggregatorName
from autorank.engine.jobs import ClientOutcome, limit_threads
from autorank.lora.adapters import AdapterState
from autorank.lora.functional import LoraTemplate
from autorank.rounds.checkpoint import DECISION_FILE
from autorank.rounds.steps import ServerStep, server_step
from tasks.checkpointing import RoundRecord, RunTarget, write_record


@dataclass(frozen=True)
class RoundClose:
    """What the server needs to close a round.

    Attributes:
        method: the aggregator; outcomes: the sampled clients' results, in client order.
        previous: the global adapter the round started from.
        base, template: the base model (FLoRA merges into it) and the evaluator over it.
        x, y: the global test split.
        round_idx: this round.
        started, train_seconds: when the round began (``time.perf_counter``) and how long its
            cohorts took.
        table_due: whether this round writes its per-client table.
        history: global accuracy of the rounds before; sampled: this round's clients.
        target: where the record goes and the config it is bound to (built once per run).
        decision_file: the rank decision the next round trains under.
    """

    method: AggregatorName
    outcomes: Sequence[ClientOutcome]
    previous: AdapterState
    base: nn.Module
    template: LoraTemplate
    x: torch.Tensor
    y: torch.Tensor
    round_idx: int
    started: float
    train_seconds: float
    table_due: bool
    history: Sequence[float]
    sampled: Sequence[int]
    target: RunTarget
    decision_file: str = DECISION_FILE


@dataclass(frozen=True)
class ClosedRound:
    """A closed round: the server's step, the round's metrics and its wall seconds."""

    step: ServerStep
    metrics: Mapping[str, float]
    seconds: float


@task(
    cache_policy=NO_CACHE,
    persist_result=False,
    task_run_name="round-{closing.round_idx}-aggregate-evaluate-record",
)
def close_round(closing: RoundClose) -> ClosedRound:
    """Merge the clients' heterogeneous-rank adapters, test the global model, then checkpoint
    the round and hand its metrics and client table to MLflow's writer.

    Not retried as a whole (a FLoRA merge must happen once); the record retries its own I/O.
    """
    c, run = closing, closing.target
    limit_threads(run.threads)
    step = server_step(
        c.method,
        c.outcomes,
        previous=c.previous,
        base=c.base,
        template=c.template,
        x=c.x,
        y=c.y,
        round_idx=c.round_idx,
    )
    report = step.report(
        c.round_idx,
        c.outcomes,
        n_clients=run.n_clients,
        seconds=time.perf_counter() - c.started,
        train_seconds=c.train_seconds,
    )
    metrics = report.metrics(keyed_clients=run.keyed_clients)
    table: dict[str, list[Any]] | None = dict(report.client_table()) if c.table_due else None
    write_record(
        RoundRecord(
            target=run,
            round_idx=c.round_idx,
            base=c.base,
            global_state=step.global_state,
            fresh=step.aggregation.fresh,
            metrics=metrics,
            history=[*c.history, step.evaluation.accuracy],
            sampled=c.sampled,
            table=table,
            decision_file=c.decision_file,
        )
    )
    return ClosedRound(step, metrics, report.seconds)
