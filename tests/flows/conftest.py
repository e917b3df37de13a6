"""Flow tests run the real flow under Prefect's test harness (one ephemeral API per session)."""

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from autorank.config import ExperimentConfig, parse_config
from tests.unit.conftest import tiny_bert_dir, tiny_llama_dir  # noqa: F401  (fixtures)

_LOGGERS = ("autorank.progress", "prefect.flow_runs", "prefect.task_runs", "mlflow")


@pytest.fixture(autouse=True)
def process_state_restored() -> Iterator[None]:
    """What a CLI command changes in its process (environment, loggers, progress forwarding)
    is put back after each test, so that tests of flows run as in a deployment after it."""
    import logging
    import os

    from flows import run_views

    env = dict(os.environ)
    loggers = {n: logging.getLogger(n) for n in _LOGGERS}
    saved = {n: (lg.level, lg.propagate, list(lg.handlers)) for n, lg in loggers.items()}
    forwarding = run_views._forwarding
    yield
    os.environ.clear()
    os.environ.update(env)
    for name, (level, propagate, handlers) in saved.items():
        loggers[name].setLevel(level)
        loggers[name].propagate = propagate
        loggers[name].handlers[:] = handlers
    run_views.forward_progress(forwarding)


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    import os

    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def tiny_config(tmp_path: Path, **sections: Any) -> ExperimentConfig:
    """A seconds-long experiment on digits with its tracking store and checkpoints in tmp."""
    raw: dict[str, Any] = {
        "partition": {"n_clients": 4},
        "model": {"pretrain_epochs": 1},
        "lora": {"r_min": 2, "r_max": 8},
        "training": {"rounds": 2, "local_epochs": 1, "warmup_epochs": 2},
        # The MLflow model (the slowest record of a small run) is tested where it is the point.
        "tracking": {
            "uri": f"sqlite:///{tmp_path}/mlflow.db",
            "experiment": "test",
            "log_model": False,
        },
        "runtime": {"device": "cpu", "checkpoint_dir": str(tmp_path / "ckpt"), "max_workers": 2},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(name, {}).update(values)
        else:
            raw[name] = values
    return parse_config(raw)


def cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI expecting bad input: exit code 2 and one stderr line, which is returned."""
    from flows.cli import main

    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("autorank: error: "), err
    assert "Traceback" not in err
    return err


def store_args(tmp_path: Path, prefix: str = "") -> list[str]:
    """``--set`` flags that put the tracking store and checkpoints under ``tmp_path``.

    ``prefix`` is ``"base."`` for a comparison grid, whose experiment sits under ``base``.
    """
    return [
        "--set",
        f"{prefix}tracking.uri=sqlite:///{tmp_path}/store/mlflow.db",
        "--set",
        f"{prefix}runtime.checkpoint_dir={tmp_path}/ckpt",
        "--set",
        f"{prefix}tracking.log_model=false",  # tested in test_model_export (slow)
    ]


def storage_files() -> set[Path]:
    """The files in Prefect's local result storage (where a failed flow run's pickle lands)."""
    from prefect.settings import get_current_settings

    folder = Path(get_current_settings().results.local_storage_path)
    return set(folder.iterdir()) if folder.is_dir() else set()


def spawn_cli(
    args: list[str], env: dict[str, str], cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """``autorank ARGS`` in a process group of its own (a group kill takes its API server
    along), its output on ``stdout``.

    A shell's background job (`pytest &`, nohup) ignores SIGINT, and a child inherits that,
    so a Ctrl-C test would never reach the command; at a terminal it does. A handler of the
    parent's own becomes the default action in the child.
    """
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "flows.cli", *args],
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def watch_output(
    proc: subprocess.Popen[bytes], ready: Callable[[str], bool]
) -> tuple[list[str], threading.Event]:
    """``proc``'s output lines as they come (read in a thread), and an event set once
    ``ready`` holds for the output so far."""
    lines: list[str] = []
    seen = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.decode(errors="replace"))
            if ready("".join(lines)):
                seen.set()

    threading.Thread(target=read, daemon=True).start()
    return lines, seen


def folder_state(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file and folder under ``folder`` (hidden ones too: ``.prefect``, ``.lock``): its
    mode, modification time and, for a file, its bytes."""
    state = {}
    for path in [folder, *sorted(folder.rglob("*"))]:  # the folder's own time: an entry came
        info = path.lstat()
        data = path.read_bytes() if path.is_file() and not path.is_symlink() else b""
        state[str(path.relative_to(folder))] = (info.st_mode, info.st_mtime_ns, data)
    return state


def refused_in(
    folder: Path, args: list[str], env: dict[str, str] | None = None, code: int = 2
) -> str:
    """``autorank ARGS`` in a fresh process working in ``folder``, with no Prefect or MLflow
    setting of the test session (``env`` adds some): it ends with ``code`` and one stderr line
    (returned), and leaves ``folder`` as it was (no ``.prefect``, no lock touched)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    root = str(Path(__file__).resolve().parents[2])
    before = folder_state(folder)
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=folder,
        env=clean | {"PYTHONPATH": root} | (env or {}),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == code, done.stderr[-3000:]
    assert not done.stdout, done.stdout[-3000:]
    assert done.stderr.count("\n") == 1, done.stderr[-3000:]
    assert folder_state(folder) == before
    return done.stderr
