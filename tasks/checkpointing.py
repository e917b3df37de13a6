"""The round's record (checkpoint, then MLflow), and loading the newest checkpoint on resume."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from torch import nn

from autorank.lora.adapters import AdapterState
from autorank.models.zoo import base_state
from autorank.rounds.checkpoint import DECISION_FILE, Checkpoint, load_checkpoint, save_checkpoint
from tasks import round_writer


@dataclass(frozen=True)
class RunTarget:
    """Where a run's rounds are recorded, and what binds them: built once per run.

    Attributes:
        root: the checkpoint directory; uri, run_id: the MLflow run.
        digest: the config digest the checkpoints are bound to.
        n_clients: the run's registered clients; keyed_clients: whether round metrics are
            keyed per client (``tracking.keyed_clients_max``).
        threads: torch threads of the server's task.
    """

    root: Path
    uri: str
    run_id: str
    digest: str
    n_clients: int
    keyed_clients: bool
    threads: int


@dataclass(frozen=True)
class RoundRecord:
    """Everything one completed round leaves behind.

    Attributes:
        target: the run's checkpoint directory, MLflow run and config digest.
        base, global_state, fresh: the state the next round starts from.
        metrics: the round's metrics (one MLflow batch at step ``round_idx``; the checkpoint
            keeps them too, to log them on resume if the crash came first).
        history: global accuracy of every round so far; sampled: this round's clients.
        table: per-client columns for the round's table artifact, or None this round.
        decision_file: the rank decision the next round trains under (``checkpoint.save_decision``).
    """

    target: RunTarget
    round_idx: int
    base: nn.Module
    global_state: AdapterState
    fresh: bool
    metrics: Mapping[str, float]
    history: Sequence[float]
    sampled: Sequence[int]
    table: Mapping[str, list[Any]] | None
    decision_file: str = DECISION_FILE


def write_record(record: RoundRecord, *, attempts: int = 3, delay_s: float = 1.0) -> None:
    """Checkpoint the round atomically (its metrics and client table too), then hand those to
    the tracking writer, which stores them while the next round trains.

    I/O errors are retried (``attempts`` in all); a retry writes the same files again and the
    tracking writer takes each round once.
    """
    run = record.target
    ckpt = Checkpoint(
        record.round_idx,
        run.run_id,
        run.digest,
        base_state(record.base),
        record.global_state,
        record.fresh,
        {
            "metrics": dict(record.metrics),
            "history": list(record.history),
            "sampled": list(record.sampled),
            "table": None if record.table is None else dict(record.table),
            "decision_file": record.decision_file,
        },
    )
    for attempt in range(1, attempts + 1):
        try:
            save_checkpoint(run.root, ckpt)
            round_writer.log_round(
                run.uri,
                run.run_id,
                record.metrics,
                record.round_idx,
                table=record.table,
                background=True,
            )
            return
        except OSError:
            if attempt == attempts:
                raise
            time.sleep(delay_s)


@task(cache_policy=NO_CACHE, persist_result=False)
def load_round(root: Path, *, run_id: str, digest: str) -> Checkpoint | None:
    """The run's newest checkpoint, or None before its first completed round."""
    return load_checkpoint(root, run_id, config_digest=digest)
