"""Where client tasks run: local threads by default, or an existing Dask cluster."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from types import FrameType
from typing import Any, TypeVar, cast

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from autorank.config import RuntimeConfig

T = TypeVar("T")


def opaque(value: T) -> T:
    """Hand ``value`` to a task without Prefect walking it (``prefect...annotations.quote``).

    Prefect visits every list, dict and dataclass of a task's parameters to find futures and
    record inputs: for a cohort's jobs (tensors, adapter states) that cost about 1 ms per client
    per round, more than some clients' training.
    """
    return cast(T, quote(value))


def task_runner_for(runtime: RuntimeConfig) -> TaskRunner[Any]:
    """Threads (``max_workers``, default one per core), or Dask at ``runtime.dask_address``.

    Each client task bounds its own torch threads (``threads_per_client``), so threads times
    workers stays near the core count.
    """
    if runtime.task_runner == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise ValueError(
                "runtime.task_runner 'dask' needs prefect-dask: pip install -e '.[dask]'"
            ) from None
        runner: TaskRunner[Any] = DaskTaskRunner(address=runtime.dask_address)
        return runner
    return ThreadPoolTaskRunner(max_workers=runtime.max_workers or os.cpu_count() or 1)


def client_task_resources(runtime: RuntimeConfig) -> AbstractContextManager[Any]:
    """Where client tasks are submitted: Dask resource annotations (e.g. one GPU each), if any.

    Dask schedules an annotated task only on a worker started with that resource
    (``dask worker ADDRESS --resources GPU=1``), so a GPU cluster runs one client per GPU.
    """
    if runtime.task_runner != "dask" or not runtime.dask_resources:
        return nullcontext()
    import dask

    return dask.annotate(resources=dict(runtime.dask_resources))


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block is done, then act on them as before.

    A round's close (aggregation, checkpoint, handing its records to the tracking writer) runs
    whole or not at all, so an interrupt lands between rounds. (Before the records were written
    in the background, an interrupted sqlite write kept the store locked and the run could not
    be marked KILLED.) So does a cohort's submission: ``ThreadPoolExecutor`` starts a worker
    thread (waiting, interruptibly, until it runs) before it records it, and a Ctrl-C in that
    wait left a cohort training that neither ``Engines.stop`` nor the runner's shutdown waited
    for; it ended during the interpreter's exit, after Prefect's event worker had stopped, with
    a traceback. Only the main thread can install handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[tuple[int, FrameType | None]] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        caught.append((signum, frame))

    previous = {int(sig): signal.signal(sig, hold) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum, frame in caught[:1]:  # the first signal, to whoever handled it before
            handler = previous[signum]
            if callable(handler):
                handler(signum, frame)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)
