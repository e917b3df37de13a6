"""The background round writer: a round's metrics and client table go to MLflow on a thread of
our own while the next round trains, at most one round in flight per run (``settle``)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from tasks import tracking


def log_round(
    uri: str,
    run_id: str,
    metrics: Mapping[str, float],
    step: int,
    *,
    table: Mapping[str, list[Any]] | None = None,
    background: bool = False,
) -> None:
    """Log one round's metrics (one batch) and its per-client table, exactly once per step.

    Args:
        table: the round's per-client values (``log_client_table``), if this round keeps one.
        background: write on the project's writer thread while the next round trains. The
            previous round's writes are awaited first (``settle``), so at most one round's are
            in flight; the caller has checkpointed the round (metrics and table) before, and a
            resume writes them again if the process died first. Without it the store is asked
            first what it already holds of the round (a resume).
    """
    settle(run_id)

    def write_missing() -> None:
        if step not in tracking.logged_steps(uri, run_id, "global/accuracy"):
            tracking.log_metrics(uri, run_id, metrics, step)
        if table is not None and not tracking.has_artifact(
            uri, run_id, tracking.client_table_file(step)
        ):
            tracking.log_client_table(uri, run_id, table, step)

    if not background:
        write_missing()
        return

    def write() -> None:
        tracking.log_metrics(uri, run_id, metrics, step)
        if table is not None:
            tracking.log_client_table(uri, run_id, table, step)

    with _pending_lock:
        if _sent.get(run_id) == step:
            return  # a retry of the record that already sent this round
        _pending[run_id] = _Pending(step, _writer.submit(write), write_missing)
        _sent[run_id] = step


@dataclass
class _Pending:
    """One round's records being written in the background: ``write`` (None once it failed),
    and how to write what of them is missing, synchronously."""

    step: int
    write: Future[None] | None
    write_missing: Callable[[], None]


# One writer thread of our own rather than MLflow's asynchronous logging, whose queue makes a
# process wait up to a second at exit and logs an ERROR line for a write that is retried here.
_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="autorank-records")
_pending: dict[str, _Pending] = {}
_sent: dict[str, int] = {}
_pending_lock = threading.Lock()


def settle(run_id: str) -> None:
    """Wait until a run's round records written in the background are in the store.

    A background write that failed is completed here, synchronously (only what the store does
    not hold yet); if that fails too the error is raised and the round stays pending, for the
    next call.
    """
    with _pending_lock:
        pending = _pending.pop(run_id, None)
    if pending is None or _written(pending.write):
        return
    try:
        pending.write_missing()
    except Exception:
        with _pending_lock:
            _pending.setdefault(run_id, replace(pending, write=None))
        raise


def _written(write: Future[None] | None) -> bool:
    if write is None:
        return False
    try:
        write.result()
    except Exception:
        return False
    return True
