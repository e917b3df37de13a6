"""Running the flow in this process: task runner choice, logging, and the closing message."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autorank.config import ExperimentConfig, RuntimeConfig

if TYPE_CHECKING:
    from prefect.task_runners import TaskRunner


def task_runner_for(runtime: RuntimeConfig) -> TaskRunner[Any]:
    """Local threads (one per client task, bounded), or an existing Dask cluster by address."""
    if runtime.task_runner == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise ValueError(
                "runtime.task_runner 'dask' needs prefect-dask: pip install -e '.[dask]'"
            ) from None
        return DaskTaskRunner(address=runtime.dask_address)
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=runtime.max_workers or os.cpu_count() or 1)


def configure_logging(verbose: bool) -> None:
    """Round-by-round progress on stderr; Prefect's own lines only with ``verbose``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[autorank] %(message)s"))
    progress = logging.getLogger("autorank.progress")
    progress.addHandler(handler)
    progress.setLevel(logging.INFO)
    progress.propagate = False
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")


def run_locally(config: ExperimentConfig, *, resume_run_id: str | None, verbose: bool) -> str:
    """Run (or resume) the flow here and print where to find the results."""
    os.environ.setdefault("PREFECT_HOME", str(Path(".prefect").resolve()))
    configure_logging(verbose)
    from flows.experiment import federated_training

    runner = task_runner_for(config.runtime)
    run_id = federated_training.with_options(task_runner=runner)(
        config=config, resume_run_id=resume_run_id
    )
    print(f"MLflow run id: {run_id}")
    print(f"Open the UI with `autorank ui --uri {config.tracking.uri}` -> http://127.0.0.1:5000")
    return str(run_id)
