"""Thin Prefect tasks over the autorank library; every MLflow call lives in tasks.tracking and,
for the run's model and data set, tasks.model_tracking.

Importing this package (flows import it) switches off Prefect's and MLflow's telemetry before
either is imported (nothing here reaches outside the machine), bounds MLflow's retries and
hides its artifact progress bars; a value the user exported wins.
"""

import os

OFFLINE_ENV = {
    "DO_NOT_TRACK": "true",  # MLflow ignores "1"
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",  # 6-20 s on 2 busy cores
    # MLflow's HTTP client retries a dead tracking server for minutes by default (7 retries,
    # 120 s timeouts): a few retries, then the round fails with one line and can be resumed.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    # Packaging the run's model copies its files with MLflow's download progress bars: noise in
    # a run's log.
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}
for _key, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)
