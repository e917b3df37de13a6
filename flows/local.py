"""Running the flow in this process: task runner choice, logging, and the closing message."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from autorank.config import ExperimentConfig


class ProgressHandler(logging.StreamHandler):
    """Progress lines on stderr; DEBUG records are a live status line on a terminal only.

    On a terminal, ``round 3: 7/10 clients done`` is redrawn in place (``\r``) until the
    round's INFO line replaces it; in logs and CI the status records are dropped.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.live = sys.stderr.isatty()
        self.setFormatter(logging.Formatter("[autorank] %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr  # whatever stderr is now (tests swap it between commands)
        if record.levelno > logging.DEBUG:
            prefix = "\r\033[K" if self.live else ""
            self.stream.write(prefix + self.format(record) + "\n")
        elif self.live:
            self.stream.write("\r\033[K" + self.format(record))
        self.flush()


def configure_logging(verbose: bool) -> None:
    """Round-by-round progress on stderr; Prefect's own lines only with ``verbose``."""
    handler = ProgressHandler()
    progress = logging.getLogger("autorank.progress")
    for old in [h for h in progress.handlers if isinstance(h, ProgressHandler)]:
        progress.removeHandler(old)
    progress.addHandler(handler)
    progress.setLevel(logging.DEBUG)
    progress.propagate = False
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")
        # The in-process API server may log cancelled background flushes at exit: not news.
        os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")


def preflight(config: ExperimentConfig) -> None:
    """Fail on bad input before anything is started or written: data, partition, model, targets."""
    from autorank.backend import pick_device
    from autorank.models import build_model, load_base_weights
    from autorank.targets import expand_ranks
    from flows.ranking import federation_for, layer_ranges, rank_table

    federation = federation_for(config)
    rank_table(config, federation)
    model = build_model(
        config.model.name,
        input_shape=federation.data.input_shape,
        n_classes=federation.data.n_classes,
        hidden=config.model.hidden,
        hf_name_or_path=config.model.hf_name_or_path,
        seed=config.seed,
    )
    if config.model.init == "safetensors" and config.model.weights_path is not None:
        load_base_weights(model, config.model.weights_path)
    expand_ranks(model, {k: hi for k, (_, hi) in layer_ranges(config).items()})
    pick_device(config.runtime.device)


@contextlib.contextmanager
def local_orchestration(check: Callable[[], object]) -> Iterator[None]:
    """Start Prefect's API server, run ``check`` while it boots, wait until it answers.

    Must be entered before Prefect is imported (its settings are read at import), so that its
    client uses this server (``flows.orchestrator``). Bad input found by ``check`` stops the
    server and leaves nothing behind.
    """
    import tasks  # noqa: F401  (no-telemetry settings, before the server starts)
    from flows.orchestrator import prefect_api

    home = Path(os.environ.setdefault("PREFECT_HOME", str(Path(".prefect").resolve())))
    with prefect_api(home) as server:
        try:
            check()
        except BaseException:
            if server is not None:
                server.discard()
            raise
        if server is not None:
            server.wait_ready()
        yield


def run_locally(config: ExperimentConfig, *, resume_run_id: str | None, verbose: bool) -> str:
    """Run (or resume) the flow here and print where to find the results."""
    configure_logging(verbose)
    with local_orchestration(lambda: preflight(config)):
        from flows.experiment import federated_training

        run_id = federated_training(config=config, resume_run_id=resume_run_id)
    print(f"MLflow run id: {run_id}")
    print(f"Open the UI with `autorank ui --uri {config.tracking.uri}` -> http://127.0.0.1:5000")
    return str(run_id)
