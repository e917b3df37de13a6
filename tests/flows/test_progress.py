"""The terminal's progress display: round lines, a live bar with the time left, plain in logs."""

import io
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from flows.local import ProgressHandler, configure_logging


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _record(level: int, message: str, **extra: int) -> logging.LogRecord:
    record = logging.LogRecord("autorank.progress", level, __file__, 1, message, None, None)
    record.__dict__.update(extra)
    return record


def _rounds(handler: ProgressHandler) -> None:
    handler.emit(_record(logging.DEBUG, "starting Prefect's API server"))
    handler.emit(_record(logging.DEBUG, "round 1/3", round=0, rounds=3))
    for t in (1, 2, 3):
        handler.emit(_record(logging.INFO, f"round {t}/3: global accuracy 0.5", round=t, rounds=3))


def test_a_terminal_gets_a_bar_with_the_time_left_under_the_round_lines(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)

    _rounds(ProgressHandler())

    out = terminal.getvalue()
    assert "round 1/3, " in out and "round 2/3, " in out and " left" in out
    assert "\r\033[K[autorank] starting Prefect's API server" in out
    lines = [part.rsplit("\r\033[K", 1)[-1] for part in out.split("\n")]
    assert lines[:3] == [f"[autorank] round {t}/3: global accuracy 0.5" for t in (1, 2, 3)]
    assert out.endswith("\n\r\033[K")  # after the last round the status line is cleared


def test_logs_get_the_lines_only(monkeypatch: pytest.MonkeyPatch) -> None:
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)

    _rounds(ProgressHandler())

    assert log.getvalue().splitlines() == [
        f"[autorank] round {t}/3: global accuracy 0.5" for t in (1, 2, 3)
    ]


def _screens(out: str) -> list[str]:
    """What the terminal shows after each write: the line being drawn (after its last erase)."""
    return [part.rsplit("\r\033[K", 1)[-1] for part in out.split("\n")]


def test_a_finished_phase_s_status_goes_when_the_next_phase_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    handler = ProgressHandler()

    handler.emit(_record(logging.DEBUG, "waiting for Prefect's API server"))
    handler.emit(_record(logging.INFO, "pre-training the base model"))
    handler.emit(_record(logging.INFO, "warm-up: 4 clients"))

    after = terminal.getvalue().split("pre-training the base model\n", 1)[1]
    assert "waiting" not in after  # neither under pre-training nor under the warm-up
    assert _screens(terminal.getvalue())[-1] == ""


def test_a_line_during_the_rounds_keeps_the_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    handler = ProgressHandler()
    handler.emit(_record(logging.DEBUG, "round 1/3", round=0, rounds=3))
    handler.emit(_record(logging.INFO, "round 1/3: global accuracy 0.5", round=1, rounds=3))

    handler.emit(_record(logging.INFO, "rbla_tiered merged rounds 1-1"))

    assert "round 1/3, " in _screens(terminal.getvalue())[-1]


def test_mlflow_s_own_lines_are_left_out_unless_verbose(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from mlflow.tracking import MlflowClient

    configure_logging(verbose=False)
    MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/new.db").search_experiments()  # a new store

    err = capfd.readouterr().err
    assert "database tables" not in err and "INFO" not in err, err


def _on_a_terminal(args: list[str], folder: Path) -> tuple[int, str, str]:
    """``autorank ARGS`` with its stderr on a pseudo-terminal, from a shell without the venv on
    PATH and without the test session's Prefect and MLflow settings: (code, stdout, stderr)."""
    import os
    import pty

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env |= {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "COLUMNS": "100"}
    terminal, side = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=folder,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=side,
    )
    os.close(side)
    said = bytearray()
    while True:
        try:
            chunk = os.read(terminal, 65536)
        except OSError:  # EIO: the command closed its end
            break
        if not chunk:
            break
        said += chunk
    os.close(terminal)
    out = proc.communicate(timeout=300)[0].decode()
    return proc.returncode, out, said.decode(errors="replace").replace("\r\n", "\n")


def test_a_run_on_a_terminal_shows_only_its_current_phase_and_a_hint_that_runs(
    tmp_path: Path,
) -> None:
    store = f"sqlite:///{tmp_path}/store/mlflow.db"  # a new store: MLflow creates its tables
    tiny = ["partition.n_clients=4", "training.rounds=2", "training.warmup_epochs=2"]
    tiny += ["model.pretrain_epochs=1", f"tracking.uri={store}", "tracking.log_model=false"]
    tiny += [f"runtime.checkpoint_dir={tmp_path}/ckpt", "runtime.max_workers=1"]

    code, out, err = _on_a_terminal(["run", *(a for s in tiny for a in ("--set", s))], tmp_path)

    assert code == 0, err[-3000:]
    assert "database tables" not in err and " INFO " not in err, err[-3000:]
    started = err.index("pre-training the base model")
    statuses = [s.rsplit("\r\033[K", 1)[-1] for s in err[started:].split("\n")]
    assert not [s for s in statuses if "Prefect" in s or "loading the data" in s], statuses
    hint = out.strip().splitlines()[-1]
    program = hint.split("`", 2)[1].split(" ui --uri ")[0]
    assert Path(program).name == "autorank" and Path(program).is_absolute(), hint
    version = subprocess.run([program, "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("autorank ")


@pytest.mark.parametrize(("configured", "during"), [(logging.NOTSET, logging.WARNING), (10, 10)])
def test_task_runs_are_quiet_during_a_flow_unless_their_level_is_configured(
    configured: int, during: int
) -> None:
    from flows.run_views import TASK_RUNS, quiet_task_runs

    logger = logging.getLogger(TASK_RUNS)
    before = logger.level
    logger.setLevel(configured)  # 10: PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL=DEBUG
    try:
        with quiet_task_runs():
            assert logger.level == during
        assert logger.level == configured
    finally:
        logger.setLevel(before)
