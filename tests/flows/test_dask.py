"""Client training on an existing Dask cluster, given by address, with per-task resources."""

from collections.abc import Iterator
from pathlib import Path

import distributed
import pytest
from distributed.diagnostics.plugin import SchedulerPlugin
from mlflow.tracking import MlflowClient

from flows.experiment import federated_training
from tests.flows.conftest import tiny_config


class GpuTasks(SchedulerPlugin):
    """Counts tasks that finished under a one-GPU resource restriction."""

    def __init__(self, scheduler: object) -> None:
        self.scheduler = scheduler
        self.count = 0

    def transition(self, key: str, start: str, finish: str, *args: object, **kw: object) -> None:
        task = self.scheduler.tasks.get(key)  # type: ignore[attr-defined]
        if finish == "memory" and task is not None:
            self.count += (task.resource_restrictions or {}).get("GPU") == 1


@pytest.fixture
def cluster() -> Iterator[tuple[str, GpuTasks]]:
    # In-process workers (the test's Prefect API is in-process too); no dashboard, loopback only.
    with distributed.LocalCluster(
        n_workers=1,
        threads_per_worker=2,
        processes=False,
        protocol="tcp://",
        host="127.0.0.1",
        dashboard_address=None,
        resources={"GPU": 2},
    ) as local:
        seen = GpuTasks(local.scheduler)
        local.scheduler.add_plugin(seen)
        yield local.scheduler_address, seen


def test_cohorts_train_on_the_dask_cluster_at_the_given_address(
    prefect_harness: None, cluster: tuple[str, GpuTasks], tmp_path: Path
) -> None:
    address, seen = cluster
    config = tiny_config(
        tmp_path,
        runtime={
            "task_runner": "dask",
            "dask_address": address,
            "dask_resources": {"GPU": 1},
            "device": "cpu",
            "checkpoint_dir": str(tmp_path / "ckpt"),
        },
    )
    run_id = federated_training(config=config)

    history = MlflowClient(config.tracking.uri).get_metric_history(run_id, "global/accuracy")
    assert sorted(m.step for m in history) == [1, 2]
    # warm-up + 2 rounds, each as 2 cohort tasks (max_workers 2), went through the scheduler,
    # each needing a GPU slot
    assert seen.count == 3 * 2
