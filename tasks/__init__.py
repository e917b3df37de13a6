"""Thin Prefect tasks over the autorank library; every MLflow call lives in tasks.tracking.

Importing this package (flows import it) switches off Prefect's and MLflow's telemetry before
either is imported: nothing here reaches outside the machine.
"""

import os

OFFLINE_ENV = {
    "DO_NOT_TRACK": "true",  # MLflow ignores "1"
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",  # 6-20 s on 2 busy cores
}
for _key, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)
