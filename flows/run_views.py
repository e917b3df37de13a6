"""What a Prefect flow run shows in Prefect's UI: the progress lines, and artifacts.

The project's progress lines (``autorank.progress``: rounds, warm-up, resumes) go to the flow
run's log through Prefect's run logger, so a scheduled run's page reads like the terminal. The
flow run also gets artifacts: a link to its MLflow run (made when the run opens, so a running
flow links to it), and at the end a table of the round metrics, or a comparison's summary.

The CLI prints progress to the terminal itself and turns the forwarding off (``forward_progress``,
called before Prefect may be imported, so this module imports Prefect only where it is used):
its Prefect server is temporary, and the lines would be printed twice with ``--verbose``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from flows.invocation import command

progress = logging.getLogger("autorank.progress")
_forwarding = True


def forward_progress(on: bool) -> None:
    """Whether flows in this process copy progress lines to the flow run's log (the CLI,
    which shows them on its terminal, turns it off)."""
    global _forwarding
    _forwarding = on


class _ToRunLogger(logging.Handler):
    """Re-emit a record on the current flow run's logger, also from inside a task run (whose
    own logger ``quiet_task_runs`` turns down); the plain logging path outside a run."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)  # the live status lines (DEBUG) stay on the terminal

    def emit(self, record: logging.LogRecord) -> None:
        from prefect.context import FlowRunContext
        from prefect.exceptions import MissingContextError
        from prefect.logging import get_run_logger
        from prefect.logging.loggers import flow_run_logger

        context = FlowRunContext.get()
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger]
        try:
            if context is not None and context.flow_run is not None:
                logger = flow_run_logger(flow_run=context.flow_run, flow=context.flow)
            else:
                logger = get_run_logger()
        except MissingContextError:  # a thread outside the run: the plain logging path
            if progress.parent is not None:
                progress.parent.handle(record)
            return
        logger.log(record.levelno, record.getMessage())


TASK_RUNS = "prefect.task_runs"


@contextlib.contextmanager
def quiet_task_runs() -> Iterator[None]:
    """Task runs log warnings and errors only while a flow runs: a round's cohort and server
    tasks each logged "Finished in state Completed()", burying the round lines on the flow
    run's page (their states are on its Task Runs tab). Only where Prefect's default level is
    in force: ``PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL=INFO`` keeps the lines."""
    logger = logging.getLogger(TASK_RUNS)
    if logger.level != logging.NOTSET:
        yield
        return
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(logging.NOTSET)


@contextlib.contextmanager
def progress_in_run_log() -> Iterator[None]:
    """While a flow runs, its progress lines also go to the flow run's log in Prefect."""
    if not _forwarding or any(isinstance(h, _ToRunLogger) for h in progress.handlers):
        yield  # turned off, or an enclosing flow (a comparison) forwards already
        return
    handler = _ToRunLogger()
    level, propagate = progress.level, progress.propagate
    progress.addHandler(handler)
    progress.propagate = False  # printed once, by Prefect's console handler of the run logger
    if progress.getEffectiveLevel() > logging.INFO:  # a worker's root logger says WARNING
        progress.setLevel(logging.INFO)
    try:
        with quiet_task_runs():
            yield
    finally:
        progress.removeHandler(handler)
        progress.setLevel(level)
        progress.propagate = propagate


@contextlib.contextmanager
def _quietly(what: str) -> Iterator[None]:
    """Artifacts are a view: a Prefect API error is a warning, not a failed run."""
    try:
        yield
    except Exception as err:  # the MLflow run holds the results either way
        progress.warning("could not add the %s artifact to the Prefect flow run: %s", what, err)


def link_mlflow_run(uri: str, run_id: str, name: str) -> None:
    """A link artifact on the flow run to its MLflow run's page."""
    from prefect.artifacts import create_link_artifact

    from tasks import tracking

    url = tracking.run_page(uri, run_id)
    local = not uri.startswith(("http://", "https://"))
    where = f" (start the UI first: {command('ui', '--uri', uri)})" if local else ""
    with _quietly("MLflow link"):
        create_link_artifact(
            link=url,
            link_text=f"MLflow run {name}",
            key="mlflow-run",
            description=f"MLflow run `{run_id}` in `{uri}`{where}",
        )


ROUND_KEYS = ("global/accuracy", "global/loss", "per_client/accuracy_mean", "time/round_s")


def table_of_rounds(uri: str, run_id: str) -> None:
    """A table artifact of the run's round metrics, one row per round (from MLflow)."""
    from prefect.artifacts import create_table_artifact

    from tasks import tracking

    series = {key: tracking.metric_series(uri, run_id, key) for key in ROUND_KEYS}
    rounds = len(series["global/accuracy"])
    rows = [
        {"round": t + 1}
        | {k.replace("/", " "): round(v[t], 4) for k, v in series.items() if t < len(v)}
        for t in range(rounds)
    ]
    with _quietly("round metrics"):
        create_table_artifact(
            table=rows,
            key="round-metrics",
            description=f"Round metrics of MLflow run `{run_id}`",
        )


def summary_of_comparison(uri: str, markdown: str, parent_run_id: str) -> None:
    """A markdown artifact on the comparison's flow run: its summary table, its links into the
    MLflow UI made absolute (``#/...`` is relative to MLflow's page, not Prefect's)."""
    from prefect.artifacts import create_markdown_artifact

    from tasks import tracking

    absolute = markdown.replace("](#/", f"]({tracking.ui_server(uri)}/#/")
    with _quietly("comparison summary"):
        create_markdown_artifact(
            markdown=absolute,
            key="comparison-summary",
            description=f"Summary of comparison `{parent_run_id}` (mean ± std over seeds)",
        )
