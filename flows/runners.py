"""Where client tasks run: local threads by default, or an existing Dask cluster."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
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
