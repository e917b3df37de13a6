"""Every MLflow call of the project, each with an explicit run id.

MLflow's "active run" is per thread and Prefect runs tasks on threads, so nothing here uses
``mlflow.start_run``; a ``MlflowClient`` per tracking URI talks to the store directly, and
metrics go in one batch per round.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import posixpath
import tempfile
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from prefect import task
from prefect.cache_policies import NO_CACHE

if TYPE_CHECKING:  # matplotlib is imported where a figure is drawn, not by every command
    from matplotlib.figure import Figure

UI_ADDRESS = "http://127.0.0.1:5000"  # where `autorank ui` serves by default
_BATCH_PARAMS = 100
_BATCH_METRICS = 1000


@cache
def client_for(uri: str) -> MlflowClient:
    """One client per tracking URI (sqlite stores are created on first use).

    Creating a client creates or upgrades a sqlite store's schema; processes that do it at
    once race (runs failed and a store was left unusable), so they take turns on a lock of
    the store's folder.
    """
    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)
    folder = Path(uri.removeprefix("sqlite:///")).parent
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return MlflowClient(tracking_uri=uri)
    finally:
        os.close(fd)  # releases the lock


def artifact_root(uri: str) -> str | None:
    """Artifacts beside a sqlite store (``mlruns/artifacts``); the server's default otherwise."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri.removeprefix("sqlite:///")).resolve()
    return (db.parent / "artifacts").as_uri()


def experiment_id(uri: str, name: str) -> str:
    """The id of the named experiment, created on first use."""
    client = client_for(uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    return str(client.create_experiment(name, artifact_location=artifact_root(uri)))


def start_run(
    uri: str,
    experiment: str,
    *,
    run_name: str | None,
    tags: Mapping[str, str],
    parent_run_id: str | None = None,
) -> str:
    """Create a run (optionally nested under a parent) and return its id."""
    all_tags = dict(tags)
    if parent_run_id is not None:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client_for(uri).create_run(
        experiment_id(uri, experiment), run_name=run_name, tags=all_tags
    )
    return str(run.info.run_id)


def set_tags(uri: str, run_id: str, tags: Mapping[str, str]) -> None:
    """Set several tags in one call."""
    client_for(uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_params(uri: str, run_id: str, params: Mapping[str, str]) -> None:
    """Log params in batches of at most 100 (MLflow's limit per call)."""
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for start in range(0, len(items), _BATCH_PARAMS):
        client_for(uri).log_batch(run_id, params=items[start : start + _BATCH_PARAMS])


def log_metrics(uri: str, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    """Log one round's metrics as one batch at ``step``."""
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    for start in range(0, len(items), _BATCH_METRICS):
        client_for(uri).log_batch(run_id, metrics=items[start : start + _BATCH_METRICS])


def logged_steps(uri: str, run_id: str, key: str) -> set[int]:
    """The steps at which ``key`` was logged in a run (to log each round exactly once)."""
    return {m.step for m in client_for(uri).get_metric_history(run_id, key)}


def log_json(uri: str, run_id: str, payload: Any, artifact_file: str) -> None:
    """Store a JSON artifact."""
    client_for(uri).log_text(run_id, json.dumps(payload, indent=2), artifact_file)


def log_text(uri: str, run_id: str, text: str, artifact_file: str) -> None:
    """Store a text artifact."""
    client_for(uri).log_text(run_id, text, artifact_file)


def log_figure(uri: str, run_id: str, figure: Figure, artifact_file: str) -> None:
    """Store a matplotlib figure as PNG."""
    client_for(uri).log_figure(run_id, figure, artifact_file)


def log_file(uri: str, run_id: str, path: Path, artifact_path: str | None = None) -> None:
    """Store a local file as an artifact."""
    client_for(uri).log_artifact(run_id, str(path), artifact_path)


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark a run finished (or FAILED / KILLED)."""
    client_for(uri).set_terminated(run_id, status=status)


def run_info(uri: str, run_id: str) -> tuple[dict[str, str], dict[str, str], str]:
    """A run's (params, tags, status), for resuming and comparisons."""
    run = client_for(uri).get_run(run_id)
    return dict(run.data.params), dict(run.data.tags), str(run.info.status)


def run_seconds(uri: str, run_id: str) -> float:
    """Seconds from a finished run's start to its end, as MLflow recorded them."""
    info = client_for(uri).get_run(run_id).info
    if info.end_time is None:
        raise ValueError(f"run {run_id} has not ended (status {info.status})")
    return (info.end_time - info.start_time) / 1000


def reopen_run(uri: str, run_id: str) -> None:
    """Mark a run RUNNING again (it is being resumed)."""
    client_for(uri).update_run(run_id, status="RUNNING")


def find_run_tags(uri: str, run_id: str) -> dict[str, str] | None:
    """A run's tags, or None when the store has no such run."""
    try:
        return dict(client_for(uri).get_run(run_id).data.tags)
    except MlflowException:
        return None


@dataclass(frozen=True)
class ChildRun:
    """A run nested under a parent, as a resumed comparison sees it."""

    run_id: str
    name: str
    status: str
    config_digest: str | None
    start_time: int


def child_runs(uri: str, parent_run_id: str) -> list[ChildRun]:
    """The runs nested under ``parent_run_id`` (tag ``mlflow.parentRunId``), oldest first."""
    client = client_for(uri)
    experiment = client.get_run(parent_run_id).info.experiment_id
    query = f"tags.mlflow.parentRunId = '{parent_run_id}'"
    found, token = [], None
    while True:
        page = client.search_runs([experiment], query, max_results=1000, page_token=token)
        found += [
            ChildRun(
                r.info.run_id,
                r.data.tags.get("mlflow.runName", r.info.run_name or ""),
                str(r.info.status),
                r.data.tags.get("config_digest"),
                int(r.info.start_time or 0),
            )
            for r in page
        ]
        token = page.token
        if not token:
            return sorted(found, key=lambda c: c.start_time)


def run_page(uri: str, run_id: str) -> str:
    """The address of a run's charts in the MLflow UI: the server's for an HTTP store, else
    the one ``autorank ui`` (``mlflow ui``) serves on 127.0.0.1:5000.

    MLflow 3's UI opens an experiment on its GenAI overview and a run on a list of its params
    and tags; the run's "Model metrics" tab opens on the ``global`` charts (accuracy, loss),
    with the model-training sidebar (``CLASSIC``).
    """
    experiment = client_for(uri).get_run(run_id).info.experiment_id
    return f"{ui_server(uri)}/#/experiments/{experiment}/runs/{run_id}/model-metrics{CLASSIC}"


def ui_server(uri: str) -> str:
    """The UI that shows a store: the server itself for an HTTP store, else ``autorank ui``'s."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else UI_ADDRESS


def artifact_view(uri: str, run_id: str, path: str) -> str:
    """A run's artifact opened in the UI (an image shows at once), as an in-UI link ``#/...``."""
    experiment = client_for(uri).get_run(run_id).info.experiment_id
    return f"#/experiments/{experiment}/runs/{run_id}/artifacts/{path}{CLASSIC}"


def overlaid_metric(experiment: str, run_ids: Sequence[str], key: str) -> str:
    """MLflow's metric page with ``key`` of every run in ``run_ids`` (of ``experiment``) in one
    chart per step, and a table of each run's latest, least and largest value, as an in-UI
    link ``#/metric?...``.

    The page needs ``runs``, ``metric``, ``experiments`` and ``plot_metric_keys`` as JSON
    (without the last it shows a JSON error); ``x_axis=step`` plots per round, not per second.
    """
    query = {
        "runs": list(run_ids),
        "metric": key,
        "experiments": [experiment],
        "plot_metric_keys": [key],
    }
    encoded = "&".join(
        f"{name}={urllib.parse.quote(json.dumps(value, separators=(',', ':')), safe='')}"
        for name, value in query.items()
    )
    return f"#/metric?{encoded}&x_axis=step&{CLASSIC.removeprefix('?')}"


# MLflow 3's UI shows an experiment's GenAI pages (traces, judges, prompts) unless the address
# asks for the model-training ones: runs, models (seen in a headless Chromium, MLflow 3.17).
CLASSIC = "?workflowType=machine_learning"


def experiments_page(uri: str, server: str) -> str:
    """The classic runs view of the experiment whose run started last, or the list of
    experiments of a store that holds no run yet (a store not created yet is not created)."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return f"{server}/#/experiments{CLASSIC}"
    client = client_for(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    latest = client.search_runs(ids, order_by=["attributes.start_time DESC"], max_results=1)
    if not latest:
        return f"{server}/#/experiments{CLASSIC}"
    return f"{server}/#/experiments/{latest[0].info.experiment_id}/runs{CLASSIC}"


OVERLAID_RUNS_MAX = 60  # about 46 characters of the address a run


def overlaid_children(uri: str, parent_run_id: str, key: str) -> str:
    """``overlaid_metric`` of a comparison's runs, whole seeds (``<method>-s<seed>``) while they
    fit in ``OVERLAID_RUNS_MAX`` runs, so that every method shows for each seed shown."""

    def seed_then_name(child: ChildRun) -> tuple[int, str]:
        _, _, seed = child.name.rpartition("-s")
        return (int(seed) if seed.isdigit() else 0, child.name)

    experiment = client_for(uri).get_run(parent_run_id).info.experiment_id  # the children's
    children = sorted(child_runs(uri, parent_run_id), key=seed_then_name)
    ids: list[str] = []
    for _, same_seed in itertools.groupby(children, key=lambda c: seed_then_name(c)[0]):
        runs = [c.run_id for c in same_seed]
        if ids and len(ids) + len(runs) > OVERLAID_RUNS_MAX:
            break
        ids += runs
    return overlaid_metric(experiment, ids, key)


def run_metrics(uri: str, run_id: str) -> dict[str, float]:
    """The latest value of every metric of a run."""
    return dict(client_for(uri).get_run(run_id).data.metrics)


def metric_series(uri: str, run_id: str, key: str) -> list[float]:
    """A metric's values in step order, one per step (the latest logged at a step wins)."""
    history = sorted(client_for(uri).get_metric_history(run_id, key), key=lambda m: m.timestamp)
    by_step = {m.step: m.value for m in history}
    return [by_step[step] for step in sorted(by_step)]


def read_text(uri: str, run_id: str, artifact_file: str) -> str:
    """A text artifact of a run, read back."""
    with tempfile.TemporaryDirectory() as tmp:
        local = client_for(uri).download_artifacts(run_id, artifact_file, tmp)
        return Path(local).read_text()


def read_json(uri: str, run_id: str, artifact_file: str) -> Any:
    """A JSON artifact of a run, parsed."""
    return json.loads(read_text(uri, run_id, artifact_file))


def log_parquet(
    uri: str, run_id: str, columns: Mapping[str, list[Any]], artifact_file: str
) -> None:
    """Store columns (name -> values) as a Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder, name = posixpath.split(artifact_file)
    with tempfile.TemporaryDirectory() as tmp:
        pq.write_table(pa.table(dict(columns)), Path(tmp) / name)
        client_for(uri).log_artifact(run_id, str(Path(tmp) / name), folder or None)


def read_parquet(uri: str, run_id: str, artifact_file: str) -> dict[str, list[Any]]:
    """A Parquet artifact of a run as columns (name -> values)."""
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as tmp:
        local = client_for(uri).download_artifacts(run_id, artifact_file, tmp)
        return dict(pq.read_table(local).to_pydict())


def log_table(uri: str, run_id: str, columns: Mapping[str, list[Any]], artifact_file: str) -> None:
    """Store an MLflow table (column -> values); logging it again replaces it.

    ``MlflowClient.log_table`` appends rows to an existing table, so a re-summarised
    comparison would list every method twice: the second time, the file is overwritten in the
    same (pandas ``split``) layout and keeps the table tag from the first.
    """
    import pandas as pd

    client = client_for(uri)
    folder = posixpath.dirname(artifact_file) or None
    if artifact_file in {f.path for f in client.list_artifacts(run_id, folder)}:
        frame = pd.DataFrame(dict(columns))
        client.log_text(run_id, frame.to_json(orient="split", index=False), artifact_file)
    else:
        client.log_table(run_id, dict(columns), artifact_file)


# The flow's tracking steps as tasks, retried: they do I/O against the store. Nothing of them
# is cached or kept, so their inputs (figures, arrays) are not hashed for a cache key either.
RETRY_IO: dict[str, Any] = {
    "retries": 2,
    "retry_delay_seconds": 2,
    "persist_result": False,
    "cache_policy": NO_CACHE,
}


def has_artifact(uri: str, run_id: str, path: str) -> bool:
    """Whether a run holds the artifact file ``path``."""
    folder = posixpath.dirname(path) or None
    return any(f.path == path for f in client_for(uri).list_artifacts(run_id, folder))


def client_table_file(round_idx: int) -> str:
    """The artifact path of a round's per-client table."""
    return f"clients/round_{round_idx:04d}.json"


def log_client_table(
    uri: str, run_id: str, columns: Mapping[str, list[Any]], round_idx: int
) -> None:
    """Store a round's per-client values, one row per sampled client.

    The file is MLflow's table layout (pandas ``split``: ``columns`` and row-major ``data``),
    written in one call: ``MlflowClient.log_table`` lists the run's artifacts and goes through
    pandas first, several times the cost of the round's other records.
    """
    names = list(columns)
    rows = [list(row) for row in zip(*(columns[n] for n in names), strict=True)]
    payload = json.dumps({"columns": names, "data": rows})
    client_for(uri).log_text(run_id, payload, client_table_file(round_idx))


@task(**RETRY_IO)
def track_json(uri: str, run_id: str, payload: Any, artifact_file: str) -> None:
    """Store a JSON artifact."""
    log_json(uri, run_id, payload, artifact_file)


@task(**RETRY_IO)
def track_figure(uri: str, run_id: str, figure: Figure, artifact_file: str) -> None:
    """Store a figure as PNG."""
    log_figure(uri, run_id, figure, artifact_file)


@task(**RETRY_IO)
def track_file(uri: str, run_id: str, path: Path, artifact_path: str | None = None) -> None:
    """Store a local file."""
    log_file(uri, run_id, path, artifact_path)
