"""Running the flow in this process: task runner choice, logging, and the closing message."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from autorank.config import ExperimentConfig
from flows.places import check_places, check_prefect_api

if TYPE_CHECKING:
    from autorank.reporting.grid import GridConfig


class ProgressHandler(logging.StreamHandler):
    """Progress lines on stderr; on a terminal also a live status line under them.

    On a terminal the status line is redrawn in place (``\r``): DEBUG records (``starting
    Prefect's API server``) and, once rounds run, a bar with the rounds done and the time left,
    estimated from the rounds this process has run. Records that carry ``round`` and ``rounds``
    (``extra=``) move the bar. A line before the rounds (``pre-training ...``, ``warm-up: ...``)
    starts a new phase, so the status of the one before it goes. In logs and CI the status is
    dropped and only the lines remain.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.live = sys.stderr.isatty()
        self.setFormatter(logging.Formatter("[autorank] %(message)s"))
        self.status = ""
        self.started: tuple[float, int] | None = None  # (time, round) when rounds began here

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr  # whatever stderr is now (tests swap it between commands)
        if record.levelno > logging.DEBUG:
            prefix = "\r\033[K" if self.live else ""
            self.stream.write(prefix + self.format(record) + "\n")
            if self.started is None:
                self.status = ""
        elif self.live:
            self.status = self.format(record)
        if self.live:
            self._move_bar(record)
            self.stream.write("\r\033[K" + self.status)
        self.flush()

    def _move_bar(self, record: logging.LogRecord) -> None:
        done, total = getattr(record, "round", None), getattr(record, "rounds", None)
        if done is None or total is None:
            return
        now = time.monotonic()
        if self.started is None:
            self.started = (now, done)
        if done >= total:  # the last round: the bar goes, the round lines stay
            self.status, self.started = "", None
            return
        self.status = _round_bar(done, total, now - self.started[0], done - self.started[1])


def _round_bar(done: int, total: int, elapsed: float, ran: int) -> str:
    """``[autorank]  35%|███     | round 7/20, 00:05 elapsed, 00:09 left`` (tqdm's meter)."""
    from tqdm import tqdm

    width = shutil.get_terminal_size((100, 24)).columns - 1
    return tqdm.format_meter(
        done,
        total,
        elapsed,
        ncols=width,
        rate=ran / elapsed if ran and elapsed > 0 else None,
        bar_format="[autorank] {percentage:3.0f}%|{bar}| round {n_fmt}/{total_fmt}, "
        "{elapsed} elapsed, {remaining} left",
    )


def configure_logging(verbose: bool) -> None:
    """Round-by-round progress on stderr; Prefect's own lines only with ``verbose``."""
    from flows.run_views import forward_progress

    forward_progress(False)
    handler = ProgressHandler()
    progress = logging.getLogger("autorank.progress")
    for old in [h for h in progress.handlers if isinstance(h, ProgressHandler)]:
        progress.removeHandler(old)
    progress.addHandler(handler)
    progress.setLevel(logging.DEBUG)
    progress.propagate = False
    _quiet_mlflow(verbose)
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")
        # The in-process API server may log cancelled background flushes at exit: not news.
        os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")
        # A failed flow or task run is logged with its traceback; the command says it in one
        # line (--verbose shows both).
        os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_FLOW_RUNS_LEVEL", "CRITICAL")
        os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL", "CRITICAL")
        # Prefect's background services (events, logs) log what they could not send.
        os.environ.setdefault("PREFECT_LOGGING_INTERNAL_LEVEL", "CRITICAL")
    for name in ("prefect.flow_runs", "prefect.task_runs"):  # Prefect already imported
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.CRITICAL)


def _quiet_mlflow(verbose: bool) -> None:
    """MLflow's own INFO lines (``Creating initial MLflow database tables...`` on a new store)
    only with ``verbose``: they are not the command's news, and its stream handler writes them
    into the terminal's status line."""
    if verbose:
        return
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported
    if "mlflow" in sys.modules:
        logging.getLogger("mlflow").setLevel(logging.WARNING)


def preflight(config: ExperimentConfig) -> None:
    """Fail on bad input before anything is started or written: places, data, partition, model,
    targets, sizes."""
    check_places(config)
    check_inputs(config)


def preflight_grid(grid: GridConfig) -> None:
    """Fail on bad input before anything is written: the grid, each seed's data, each assigner
    (the places and a resumed parent run are checked before, ``autorank compare``)."""
    from autorank.recipe import federation_for, rank_table
    from autorank.reporting.cells import runnable_cells

    cells, _ = runnable_cells(grid)
    check_inputs(cells[0].config)
    for seed in grid.seeds:
        mine = [c for c in cells if c.seed == seed]
        if not mine:
            continue
        federation = federation_for(mine[0].config)
        for spec in dict.fromkeys(c.spec for c in mine):
            rank_table(next(c for c in mine if c.spec == spec).config, federation)


def check_inputs(config: ExperimentConfig) -> None:
    """The data, partition, model, targets and sizes a run would use (seconds: loads the data
    and imports torch)."""
    from autorank.engine.jobs import pick_device
    from autorank.lora.targets import expand_ranks, layer_dims, target_sizes
    from autorank.models.zoo import load_base_weights
    from autorank.recipe import (
        federation_for,
        layer_ranges,
        rank_table,
        top_ranks,
        untrained_base,
    )

    federation = federation_for(config)
    model = untrained_base(config, federation)
    if config.model.init == "safetensors" and config.model.weights_path is not None:
        load_base_weights(model, config.model.weights_path)
    ranges = layer_ranges(config)
    unknown = sorted(set(config.lora.layer_ranges) - set(ranges))
    if unknown:
        raise ValueError(
            f"lora.layer_ranges names {unknown}, which are not adapted layers "
            f"(expected some of {sorted(ranges)})"
        )
    paths = expand_ranks(model, top_ranks(config))
    for path, r_max in paths.items():
        d_out, d_in = layer_dims(model.get_submodule(path), path)
        if r_max > min(d_out, d_in):
            raise ValueError(
                f"lora.r_max {r_max} exceeds layer '{path}' ({d_out} x {d_in}): a rank of at "
                f"most {min(d_out, d_in)} is expected"
            )
    if config.difficulty_mode() != "first_participation":  # else ranks come round by round
        rank_table(config, federation, layer_sizes=target_sizes(model, list(ranges)))
    pick_device(config.runtime.device)


def lost_server_line(how: str) -> str:
    """The one line for a command whose Prefect server died: what happened, and the resume
    command of the run it stopped."""
    import flows

    then = f"; {flows.stopped[-1].strip('`')} continues it" if flows.stopped else ""
    return f"autorank: {how}{then}"


def say(line: str) -> None:
    """One line on stderr, over the live status line if there is one (a terminal)."""
    sys.stderr.write(("\r\033[K" if sys.stderr.isatty() else "") + line + "\n")


def _end_without_server(how: str) -> None:
    """Still running long after its Prefect server died (Prefect retrying it): end now."""
    say(lost_server_line(how))
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(1)


@contextlib.contextmanager
def local_orchestration(
    check: Callable[[], object], flow_module: str, tracking_uri: str
) -> Iterator[None]:
    """Start Prefect's API server; while it boots run ``check``, import ``flow_module``
    (Prefect, MLflow: seconds) and open the tracking store (a new sqlite store's schema takes
    seconds more); then wait until the server answers.

    Must be entered before Prefect is imported (its settings are read at import), so that its
    client uses this server (``flows.orchestrator``). Bad input found by ``check`` stops the
    server and leaves nothing behind.
    """
    import tasks  # noqa: F401  (no-telemetry settings, before the server starts)
    from flows.orchestrator import prefect_api

    progress = logging.getLogger("autorank.progress")  # debug: the live status on a terminal
    home = Path(os.environ.setdefault("PREFECT_HOME", str(Path(".prefect").resolve())))
    with prefect_api(home) as server:
        if server is not None:
            progress.debug("starting Prefect's API server on 127.0.0.1 (in the background)")
        try:
            progress.debug("loading the data and checking the config")
            check()
        except BaseException:
            if server is not None:
                server.discard()
            raise
        progress.debug("importing the flow (Prefect, MLflow) and opening the tracking store")
        importlib.import_module(flow_module)
        from tasks.tracking import client_for

        client_for(tracking_uri)
        if server is not None and not server.ready():
            progress.debug("waiting for Prefect's API server")
            server.wait_ready()
        if server is not None:
            server.watch(last_words=_end_without_server)
        progress.debug("starting the run (Prefect flow run, MLflow run, data)")
        yield


@contextlib.contextmanager
def no_failure_records() -> Iterator[None]:
    """Remove what Prefect writes when a flow run fails: the exception, pickled.

    Prefect persists a failed flow run's exception as a cloudpickle file in its local result
    storage (``$PREFECT_HOME/storage``) whatever ``persist_result`` says. Nothing reads it back
    here (the one-line error and the MLflow run say what happened), and a pickle is not a file
    the project leaves behind, so the files a failed run added are removed.
    """

    def storage() -> Path | None:
        if "prefect.settings" not in sys.modules:
            return None
        from prefect.settings import get_current_settings

        return Path(get_current_settings().results.local_storage_path)

    folder = storage()
    before = set(folder.iterdir()) if folder is not None and folder.is_dir() else set()
    try:
        yield
    except BaseException:
        folder = folder or storage()
        if folder is not None and folder.is_dir():
            for left in set(folder.iterdir()) - before:
                if left.is_file():
                    left.unlink(missing_ok=True)
        raise


def run_locally(config: ExperimentConfig, *, resume_run_id: str | None, verbose: bool) -> str:
    """Run (or resume) the flow here and print where to find the results.

    What a refusal should leave untouched is checked before Prefect's server starts.
    """
    check_prefect_api()
    check_places(config)
    configure_logging(verbose)
    with (
        local_orchestration(lambda: check_inputs(config), "flows.experiment", config.tracking.uri),
        no_failure_records(),
    ):
        from flows.experiment import federated_training

        run_id = federated_training(config=config, resume_run_id=resume_run_id)
    print(f"MLflow run id: {run_id}")
    print(how_to_look(config.tracking.uri, str(run_id)))
    return str(run_id)


def how_to_look(uri: str, run_id: str) -> str:
    """The closing line: the link to the run's own page (and, for a local store, the command
    that starts the UI)."""
    from tasks.tracking import run_page

    start = _ui_command(uri)
    head = "Open" if start is None else f"Open the UI with `{start}`, then"
    return f"{head} the run at {run_page(uri, run_id)}"


def how_to_compare(uri: str, parent_run_id: str) -> str:
    """A comparison's closing lines: the methods' accuracy per round (the parent's plot), and
    every run's global accuracy per round in one chart."""
    from flows.compare import chart_pages
    from tasks.tracking import ui_server

    server = ui_server(uri)
    curves, every = chart_pages(uri, parent_run_id)
    start = _ui_command(uri)
    head = "In the MLflow UI" if start is None else f"Open the UI with `{start}`, then"
    return (
        f"{head}:\n"
        f"  the comparison at a glance (each method's accuracy per round, mean ± std over seeds):"
        f"\n  {server}/{curves}\n"
        f"  every run's global accuracy per round, in one chart:\n  {server}/{every}"
    )


def _ui_command(uri: str) -> str | None:
    """The command that starts a local store's UI (None: the store is a server's, its UI)."""
    from flows.invocation import command

    if uri.startswith(("http://", "https://")):
        return None
    return command("ui", "--uri", uri)
