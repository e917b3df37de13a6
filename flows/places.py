"""Where a run writes, what it talks to and the files it reads, checked in seconds without
writing anything.

A command checks these before it starts Prefect's API server or creates a file: a refusal then
leaves the working folder as it was. Stores are only read here (a sqlite file is opened
read-only, a missing one is not created): creating one happens when the run really starts.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import sqlite3
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autorank.config import ExperimentConfig

_TIMEOUT_S = 5.0
_STORES = (
    "sqlite:///PATH.db (a new or existing MLflow store) or http(s)://HOST[:PORT] of `mlflow server`"
)


def tracking_setting(uri: str) -> str:
    """The setting a tracking URI came from, as messages name it."""
    if os.environ.get("MLFLOW_TRACKING_URI") == uri:
        return "tracking.uri (from MLFLOW_TRACKING_URI)"
    return "tracking.uri"


def check_writable(path: Path, setting: str) -> None:
    """``path`` is a writable folder, or can be created as one (nothing is created here)."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ValueError(f"{setting}: {str(probe)!r} is a file; expected a folder")
    try:  # an unnamed file (O_TMPFILE), gone when closed: access() says yes to root everywhere
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError:
        raise ValueError(f"{setting}: {str(probe)!r} is not writable") from None


def check_reachable(host: str, port: int, what: str, timeout: float = _TIMEOUT_S) -> None:
    """Something accepts TCP connections at ``host:port`` within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ValueError(f"{what}: nothing answers at {host}:{port} ({reason})") from None


def _mlflow_request(uri: str, endpoint: str) -> urllib.request.Request:
    """A GET of MLflow's REST API with the credentials MLflow's client would send
    (``MLFLOW_TRACKING_TOKEN``, or ``_USERNAME`` and ``_PASSWORD``)."""
    request = urllib.request.Request(
        uri.rstrip("/") + endpoint, headers={"Accept": "application/json"}
    )
    if token := os.environ.get("MLFLOW_TRACKING_TOKEN"):
        request.add_header("Authorization", f"Bearer {token}")
    elif user := os.environ.get("MLFLOW_TRACKING_USERNAME"):
        pair = f"{user}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}".encode()
        request.add_header("Authorization", "Basic " + base64.b64encode(pair).decode())
    return request


def _mlflow_get(uri: str, endpoint: str, what: str) -> dict[str, Any] | None:
    """MLflow's JSON answer to ``endpoint``, or None for 404 (no such resource)."""
    try:
        with urllib.request.urlopen(_mlflow_request(uri, endpoint), timeout=_TIMEOUT_S) as answer:
            body = json.loads(answer.read(1 << 20) or b"{}")
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            raise ValueError(
                f"{what}: the server refused access (HTTP {err.code}); set "
                "MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
            ) from None
        if err.code == 404 and "/runs/get" in endpoint:
            return None
        raise ValueError(
            f"{what}: answers, but not as an MLflow tracking server (HTTP {err.code} for "
            f"{endpoint.partition('?')[0]}); expected the address of `mlflow server`"
        ) from None
    except (OSError, ValueError) as err:  # timeouts, resets, a body that is not JSON
        reason = getattr(err, "reason", None) or type(err).__name__
        raise ValueError(
            f"{what}: no MLflow answer from {endpoint.partition('?')[0]} ({reason}); "
            "expected the address of `mlflow server`"
        ) from None
    if not isinstance(body, dict):
        raise ValueError(f"{what}: answers, but not as an MLflow tracking server")
    return body


def _check_server(uri: str, what: str) -> None:
    """The server at ``uri`` answers MLflow's REST API (an experiments search)."""
    parts = urllib.parse.urlsplit(uri)
    if not parts.hostname:
        raise ValueError(f"{what}: {uri!r} names no host; expected {_STORES}")
    check_reachable(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), what)
    _mlflow_get(uri, "/api/2.0/mlflow/experiments/search?max_results=1", what)


def _sqlite_path(uri: str, what: str) -> Path:
    path = uri.removeprefix("sqlite:///")
    if not path or path.startswith(":memory:") or "?" in path:
        raise ValueError(f"{what}: {uri!r} names no database file; expected {_STORES}")
    return Path(path)


@contextlib.contextmanager
def _read_only(path: Path, what: str) -> Iterator[sqlite3.Connection]:
    """An existing sqlite file, opened read-only (never created, written or migrated)."""
    quoted = urllib.parse.quote(str(path.resolve()))
    try:
        db = sqlite3.connect(f"file:{quoted}?mode=ro", uri=True, timeout=_TIMEOUT_S)
    except sqlite3.Error as err:
        raise ValueError(f"{what}: {str(path)!r} cannot be opened ({err})") from None
    try:
        yield db
    except sqlite3.DatabaseError as err:
        raise ValueError(
            f"{what}: {str(path)!r} is not an MLflow sqlite store ({err}); expected {_STORES}"
        ) from None
    finally:
        db.close()


def _check_sqlite(uri: str, what: str) -> None:
    """A new store's folder can be written; an existing store is MLflow's and writable."""
    path = _sqlite_path(uri, what)
    if path.is_dir():
        raise ValueError(f"{what}: {str(path)!r} is a folder; expected {_STORES}")
    if not path.exists():
        check_writable(path.parent, what)
        return
    if not path.is_file():
        raise ValueError(f"{what}: {str(path)!r} is not a regular file; expected {_STORES}")
    with _read_only(path, what) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    if tables and "runs" not in tables:  # an empty file becomes a new store
        raise ValueError(
            f"{what}: {str(path)!r} is a sqlite database without MLflow's tables; "
            f"expected {_STORES}"
        )
    check_writable(path.parent, what)  # sqlite writes its journal beside the file
    try:
        os.close(os.open(path, os.O_WRONLY))
    except OSError as err:
        raise ValueError(f"{what}: {str(path)!r} is not writable ({err.strerror})") from None


def check_store(uri: str, setting: str | None = None) -> None:
    """A tracking URI this project can use, checked without writing: a sqlite store (new or
    MLflow's), or an MLflow server that answers within 5 s. Messages name ``setting`` (default:
    ``tracking_setting``)."""
    setting = setting or tracking_setting(uri)
    scheme = uri.partition("://")[0] if "://" in uri else ""
    if uri.startswith("sqlite:///"):
        _check_sqlite(uri, setting)
    elif scheme in ("http", "https"):
        _check_server(uri, f"{setting} {uri}")
    elif scheme == "file" or not scheme:
        what = (
            "is MLflow's file store"
            if scheme
            else "is a path, which MLflow takes as its file store"
        )
        raise ValueError(
            f"{setting} {uri!r} {what} (deprecated, not used here); expected {_STORES}"
        )
    else:
        raise ValueError(f"{setting} {uri!r}: unknown scheme {scheme!r}; expected {_STORES}")


@dataclass(frozen=True)
class StoredRun:
    """A run as its tracking store holds it: status (``FINISHED``, ``KILLED``...) and tags."""

    status: str
    tags: Mapping[str, str]


def stored_run(uri: str, run_id: str) -> StoredRun:
    """The run ``run_id`` in the store at ``uri``, read without writing anything.

    Raises:
        ValueError: the store is unusable, or does not hold the run (one line that says where
            it was expected).
    """
    what = tracking_setting(uri)
    check_store(uri)
    if uri.startswith("sqlite:///"):
        path = _sqlite_path(uri, what)
        if not path.is_file():
            raise ValueError(f"run {run_id!r} not found: no tracking store at {uri} ({what})")
        found = _sqlite_run(path, run_id, what)
    else:
        found = _server_run(uri, run_id, what)
    if found is None:
        raise ValueError(f"run {run_id!r} not found in the tracking store {uri} ({what})")
    return found


def _sqlite_run(path: Path, run_id: str, what: str) -> StoredRun | None:
    with _read_only(path, what) as db:
        row = db.execute("SELECT status FROM runs WHERE run_uuid = ?", (run_id,)).fetchone()
        tags = db.execute("SELECT key, value FROM tags WHERE run_uuid = ?", (run_id,)).fetchall()
    return None if row is None else StoredRun(str(row[0]), {str(k): str(v) for k, v in tags})


def _server_run(uri: str, run_id: str, what: str) -> StoredRun | None:
    quoted = urllib.parse.quote(run_id)
    body = _mlflow_get(uri, f"/api/2.0/mlflow/runs/get?run_id={quoted}", what)
    if body is None or not isinstance(body.get("run"), dict):
        return None
    run = body["run"]
    tags = run.get("data", {}).get("tags", [])
    return StoredRun(str(run.get("info", {}).get("status")), {t["key"]: t["value"] for t in tags})


def check_prefect_api() -> None:
    """A set ``PREFECT_API_URL`` answers Prefect's health endpoint within 5 s (unset: the
    command starts a server of its own, later)."""
    url = os.environ.get("PREFECT_API_URL", "")
    if not url:
        return
    expected = (
        "expected the API of a running Prefect server, e.g. http://127.0.0.1:4200/api "
        "(or unset PREFECT_API_URL, and a temporary one is started)"
    )
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(f"PREFECT_API_URL {url!r} is not an http(s) URL; {expected}")
    health = url.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=_TIMEOUT_S) as answer:
            healthy = json.loads(answer.read(1 << 10)) is True
    except (OSError, ValueError) as err:  # refused, timed out, HTTP errors, not JSON
        reason = getattr(err, "reason", None) or type(err).__name__
        raise ValueError(
            f"PREFECT_API_URL {url!r}: no answer from {health} ({reason}); {expected}"
        ) from None
    if not healthy:
        raise ValueError(
            f"PREFECT_API_URL {url!r}: {health} does not answer as Prefect's; {expected}"
        )


def _check_cores(config: ExperimentConfig) -> None:
    """Threads and workers within this machine's cores."""
    cores, runtime = os.cpu_count() or 1, config.runtime
    if runtime.threads_per_client > cores:
        raise ValueError(
            f"runtime.threads_per_client is {runtime.threads_per_client} but this machine "
            f"has {cores} cores: expected at most {cores}"
        )
    workers = runtime.max_workers or 1
    if runtime.task_runner == "threads" and workers > cores:  # a Dask cluster has its own
        raise ValueError(
            f"runtime.max_workers is {workers} but this machine has {cores} cores: expected at "
            f"most {cores} with runtime.task_runner 'threads'"
        )


def check_places(config: ExperimentConfig) -> None:
    """Where the run writes and runs and what it talks to: the tracking store
    (``check_store``), the checkpoint folder, this machine's cores, the Dask scheduler, and
    the data files it reads (IDX, parquet)."""
    check_store(config.tracking.uri)
    check_writable(config.runtime.checkpoint_dir, "runtime.checkpoint_dir")
    address = config.runtime.dask_address
    if config.runtime.task_runner == "dask" and address:
        parts = urllib.parse.urlsplit(address if "://" in address else f"tcp://{address}")
        if not parts.hostname or not parts.port:
            raise ValueError(
                f"runtime.dask_address: {address!r}; expected tcp://host:port of a scheduler"
            )
        check_reachable(parts.hostname, parts.port, "runtime.dask_address")
    check_machine_and_data(config)


def check_machine_and_data(config: ExperimentConfig) -> None:
    """What a run needs that writes nothing to check: this machine's cores, the data files."""
    from autorank.data.sources import check_files

    _check_cores(config)
    check_files(config.data.name, config.data.path)
