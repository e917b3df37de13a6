"""Test-wide settings: no telemetry, no network, Prefect and MLflow state in temp dirs."""

import os

import tasks  # noqa: F401  (sets the project's no-telemetry environment)

for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_key, "1")  # tests only: users online need the Hub
