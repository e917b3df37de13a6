"""MLflow calls for what a run used and produced: its data set inputs, its model, the registry.

As in ``tasks.tracking``, every call names its tracking URI and run id. ``mlflow.pyfunc.log_model``
works on the thread's active run and the process-wide tracking URI, so the model is written with
``mlflow.pyfunc.save_model`` and logged through the client in the steps ``Model.log`` takes:
create the logged model, link it to the run as an output, upload its files, mark it READY.
Each step is safe to repeat when a finished run is resumed: data sets already on the run, a READY
model of the run and a registered version of it are not logged again.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal

import numpy as np
from mlflow.entities import Dataset, DatasetInput, InputTag, LoggedModelOutput
from mlflow.exceptions import MlflowException
from prefect import task

from tasks.tracking import RETRY_IO, client_for

MODEL_NAME = "model"  # the model's URI is runs:/<run id>/model
CODE_FILE = Path(__file__).with_name("mlflow_model.py")
# What loading the model imports, pinned to this environment's versions: given explicitly,
# because MLflow would otherwise load the model in a subprocess to find out (seconds).
_REQUIREMENTS = ("mlflow", "torch", "safetensors", "numpy", "pydantic", "PyYAML")


@dataclass(frozen=True)
class DataInput:
    """One split of the data set as an MLflow dataset input of the run.

    Attributes:
        name: the dataset's name (``digits/train``); with ``digest`` its identity in MLflow.
        context: ``train`` or ``test`` (the input tag ``mlflow.data.context``).
        x: samples ``[n, ...]``; y: labels ``[n]``.
        digest: a content digest of ``x`` and ``y``.
        tags: further input tags (the partition, for the training split).
        source: where the data comes from (tags of MLflow's code dataset source).
    """

    name: str
    context: Literal["train", "test"]
    x: np.ndarray
    y: np.ndarray
    digest: str
    tags: Mapping[str, str]
    source: Mapping[str, str]


def log_data_inputs(uri: str, run_id: str, inputs: Sequence[DataInput]) -> int:
    """Log the splits the run has not logged yet as dataset inputs; returns how many it logged."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.numpy_dataset import from_numpy
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    client = client_for(uri)
    run_inputs = client.get_run(run_id).inputs
    on_run = run_inputs.dataset_inputs if run_inputs is not None else []
    logged = {(d.dataset.name, d.dataset.digest) for d in on_run}
    new = []
    for item in inputs:
        if (item.name, item.digest) in logged:
            continue
        source = CodeDatasetSource(tags=dict(item.source))
        data = from_numpy(item.x, source=source, targets=item.y, name=item.name, digest=item.digest)
        tags = [InputTag(k, v) for k, v in item.tags.items()]
        tags.append(InputTag(MLFLOW_DATASET_CONTEXT, item.context))
        new.append(DatasetInput(Dataset(**data.to_dict()), tags))
    if new:
        client.log_inputs(run_id, datasets=new)
    return len(new)


def _signature(example: Any, *, generates: bool = False) -> Any:
    """Samples ``[n, d]`` (float32) -> classes ``[n]``, or a ``text`` column of raw strings ->
    label names; param ``output`` (class|probabilities). A causal LM (``generates``): a
    ``text`` column of prompts -> their continuations; param ``max_new_tokens``."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    params = ParamSchema([ParamSpec("output", "string", "class")])
    if generates:
        params = ParamSchema([ParamSpec("max_new_tokens", "long", 32)])
    if hasattr(example, "columns"):  # a table of texts
        return ModelSignature(
            inputs=Schema([ColSpec("string", "text")]), outputs=None, params=params
        )
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, int(example.shape[1])))]),
        outputs=Schema([TensorSpec(np.dtype(np.int64), (-1,))]),
        params=params,
    )


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Only warnings from a logger inside the block (``save_model`` narrates at INFO)."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def run_model_id(uri: str, run_id: str) -> str | None:
    """The id of the run's READY model named ``model``, if it has logged one."""
    client = client_for(uri)
    outputs = client.get_run(run_id).outputs
    for output in outputs.model_outputs if outputs is not None else []:
        model = client.get_logged_model(output.model_id)
        if model.name == MODEL_NAME and str(model.status) == "READY":
            return str(model.model_id)
    return None


def log_model(
    uri: str,
    run_id: str,
    artifacts: Mapping[str, Path],
    example: Any,
    *,
    step: int,
    generates: bool = False,
) -> str:
    """Log the run's model (pyfunc from ``CODE_FILE`` over ``artifacts``) unless it has one.

    Args:
        artifacts: the files ``tasks.mlflow_model`` loads: ``spec``, ``base``, ``adapter``.
        example: a few samples ``[k, d]``, or a table with a ``text`` column of raw strings.
        step: the step the model is linked to the run at (the last round).
        generates: a causal LM, which continues its input texts.

    Returns:
        The logged model's id (``models:/<id>``).
    """
    from mlflow.models import Model
    from mlflow.pyfunc import save_model

    found = run_model_id(uri, run_id)
    if found is not None:
        return found
    client = client_for(uri)
    experiment = client.get_run(run_id).info.experiment_id
    model = client.create_logged_model(experiment, name=MODEL_NAME, source_run_id=run_id)
    try:
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
        meta = Model(
            artifact_path=model.artifact_location,
            run_id=run_id,
            model_id=model.model_id,
            model_uuid=model.model_id,
        )
        with tempfile.TemporaryDirectory() as tmp, _quiet("mlflow.pyfunc"):
            local = Path(tmp) / MODEL_NAME
            save_model(
                str(local),
                python_model=str(CODE_FILE),
                artifacts={name: str(path) for name, path in artifacts.items()},
                signature=_signature(example, generates=generates),
                input_example=example,
                pip_requirements=[f"{p}=={version(p)}" for p in _REQUIREMENTS],
                mlflow_model=meta,
            )
            client.log_model_artifacts(model.model_id, str(local))
    except BaseException:
        client.finalize_logged_model(model.model_id, "FAILED")
        raise
    client.finalize_logged_model(model.model_id, "READY")
    return str(model.model_id)


def register_model(uri: str, run_id: str, model_id: str, name: str) -> str:
    """Register the logged model as a new version of ``name`` (once per run); its version."""
    client = client_for(uri)
    for found in client.search_model_versions(f"run_id = '{run_id}'"):
        if found.name == name:
            return str(found.version)
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    # The model's own location: a models:/ source would be looked up through MLflow's global
    # tracking URI, not this store's.
    source = client.get_logged_model(model_id).artifact_location
    created = client.create_model_version(name, source=source, run_id=run_id, model_id=model_id)
    return str(created.version)


@task(**RETRY_IO)
def track_data_inputs(uri: str, run_id: str, inputs: Sequence[DataInput]) -> int:
    """Log the data set's splits (and the partition) as the run's dataset inputs."""
    return log_data_inputs(uri, run_id, inputs)


@task(**RETRY_IO)
def track_model(
    uri: str,
    run_id: str,
    artifacts: Mapping[str, Path],
    example: Any,
    *,
    step: int,
    register_as: str | None,
    generates: bool = False,
) -> str:
    """Log the global model as an MLflow model (and register it when asked)."""
    model_id = log_model(uri, run_id, artifacts, example, step=step, generates=generates)
    if register_as is not None:
        register_model(uri, run_id, model_id, register_as)
    return model_id
