"""``tracking`` and ``runtime``: where records go, and where and how the clients train."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from autorank.config.vocab import RunName, Section

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
MAX_WORKERS = 1024  # a Dask cluster's cohorts in flight; a thread pool is held to the cores


class TrackingConfig(Section):
    """Where MLflow records go."""

    uri: str = Field(
        default_factory=lambda: os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI,
        description="MLflow tracking URI: this setting, else MLFLOW_TRACKING_URI, else "
        f"{DEFAULT_TRACKING_URI}",
    )
    experiment: str = Field("autorank", min_length=1, description="MLflow experiment of the run")
    run_name: RunName | None = Field(
        None,
        description="MLflow run name (at most 250 characters, no control characters or / \\); "
        "null: <assigner>-<aggregator>-<dataset>-s<seed>",
    )
    parent_run_id: str | None = Field(
        None, description="nest the run under this MLflow run (set by comparison grids)"
    )
    keyed_clients_max: int = Field(
        20,
        ge=0,
        description="per-client metric keys (per_client/cNN/...) only up to this many clients; "
        "above it per-client values go to one table artifact per round",
    )
    client_table_every: int = Field(
        1, ge=1, description="write the per-client table artifact every N rounds and the last"
    )
    prompts: tuple[str, ...] = Field(
        ("In the beginning", "And it came to pass", "The LORD is my"),
        description="causal LM: the prompts the global model continues (greedy) every "
        "generate_every rounds and at the end, logged as generations/round_NNNN.txt",
    )
    generate_every: int = Field(
        5, ge=0, description="causal LM: rounds between sample generations; 0: at the end only"
    )
    max_new_tokens: int = Field(
        32, ge=1, le=512, description="causal LM: tokens generated per prompt"
    )
    log_model: bool = Field(
        True,
        description="log the final global model as the MLflow model `model` at the end of the "
        "run (MLflow checks its requirements: the slowest record of a small run); false: the "
        "adapter and base files only",
    )
    register_as: str | None = Field(
        None,
        min_length=1,
        pattern=r"^[^/:'\"]+$",
        description="register the run's MLflow model as a new version of this registered model "
        "(no / : or quotes); null: log it without registering",
    )

    @model_validator(mode="after")
    def _registering_needs_a_model(self) -> TrackingConfig:
        if self.register_as is not None and not self.log_model:
            raise ValueError(
                f"register_as {self.register_as!r} needs the model logged: set log_model to true"
            )
        return self


class RuntimeConfig(Section):
    """Where and how the clients train."""

    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="auto: CUDA when present (cohort i on GPU i mod n), else the CPU; cpu; cuda "
        "(refused without CUDA)",
    )
    backend: Literal["auto", "sequential", "batched"] = Field(
        "auto",
        description="batched: a cohort's clients in one forward/backward per step; sequential: "
        "one client after another on peft models; auto: batched where the model allows it "
        "(not for LoRA on convolutions on a CPU)",
    )
    task_runner: Literal["threads", "dask"] = Field(
        "threads",
        description="threads: cohort tasks on a thread pool in this process; dask: on the Dask "
        "cluster at dask_address",
    )
    max_workers: int | None = Field(
        None,
        ge=1,
        le=MAX_WORKERS,
        description="parallel cohort tasks, and cohorts per round without cohort_size; null: one "
        f"per CPU core; with task_runner threads at most the cores (and {MAX_WORKERS})",
    )
    cohort_size: int | None = Field(
        None,
        ge=1,
        description="clients per cohort task; null: one cohort per worker (the batched engine "
        "on a CPU splits a round only where each cohort has enough work to keep a core busy)",
    )
    batch_clients: int = Field(
        64,
        ge=1,
        description="batched engine: clients trained together in one step at most (a larger "
        "cohort goes in chunks; bounds activation memory)",
    )
    threads_per_client: int = Field(
        1,
        ge=1,
        description="torch CPU threads of every task (cohorts, server, set-up); at most the cores",
    )
    dask_address: str | None = Field(
        None, description="task_runner dask: tcp://host:port of an existing Dask scheduler"
    )
    dask_resources: dict[str, float] = Field(
        default_factory=dict,
        description="task_runner dask: worker resources each cohort task needs, e.g. {GPU: 1}",
    )
    checkpoint_dir: Path = Field(
        Path("mlruns/checkpoints"),
        description="folder of the per-round checkpoints, one subfolder per run id (autorank "
        "resume --checkpoint-dir)",
    )

    @model_validator(mode="after")
    def _dask_needs_address(self) -> RuntimeConfig:
        if self.task_runner == "dask" and not self.dask_address:
            raise ValueError("runtime.dask_address is required when runtime.task_runner is 'dask'")
        return self
