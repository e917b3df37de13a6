"""Prefect flows, deployments and the `autorank` CLI (composition of tasks and the library)."""

import tasks  # noqa: F401  (sets the no-telemetry environment before Prefect or MLflow load)
