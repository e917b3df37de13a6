"""The local Prefect API server: ready before the flow, gone with its process, even on SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from flows.orchestrator import LocalServer, prefect_api


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()


def test_the_server_is_used_then_bad_input_stops_it_and_leaves_no_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (That the server answers: test_a_sigkilled_owner_takes_its_server_along; one boot.)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    # Prefect pointed nowhere (in this test process a harness may be active)
    monkeypatch.setattr("flows.orchestrator._configured_url", lambda: None)
    home = tmp_path / "prefect-home"

    with prefect_api(home) as server:
        assert server is not None
        assert os.environ["PREFECT_API_URL"] == server.url
        if "prefect.context" in sys.modules:  # an imported Prefect is pointed at it too
            from prefect.settings import get_current_settings

            assert get_current_settings().api.url == server.url
        assert server.url.startswith("http://127.0.0.1:")
        pid = server.process.pid
        # A signal to the command's process group (Ctrl-C) is the command's to handle.
        assert os.getpgid(pid) != os.getpgid(0)
        server.discard()  # what a failed preflight does, while the server boots

    assert "PREFECT_API_URL" not in os.environ
    assert not _alive(pid)
    assert not home.exists()


def test_a_second_command_in_one_process_gets_a_server_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import prefect.context  # noqa: F401  (Prefect imported, as after a first command)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows import orchestrator

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    stale = "http://127.0.0.1:1/api"
    monkeypatch.setattr(orchestrator, "_STARTED", {stale})  # a first command's, now stopped
    with temporary_settings(updates={PREFECT_API_URL: stale}), prefect_api(tmp_path / "h") as s:
        assert s is not None and s.url != stale


def test_an_existing_api_url_is_used_and_nothing_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")

    with prefect_api(tmp_path / "home") as server:
        assert server is None

    assert os.environ["PREFECT_API_URL"] == "http://127.0.0.1:9/api"
    assert not (tmp_path / "home").exists()


def test_a_sigkilled_owner_takes_its_server_along(tmp_path: Path) -> None:
    # Prepare: a process that owns a server that answers, then is killed without a chance to
    # clean up
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from flows.orchestrator import LocalServer
        server = LocalServer(Path({str(tmp_path / "home")!r}))
        server.wait_ready()
        print(server.process.pid, server.url, flush=True)
        time.sleep(120)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    owner = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, env=env, cwd=Path.cwd()
    )
    try:
        assert owner.stdout is not None
        pid, url = owner.stdout.readline().decode().split()
        server_pid = int(pid)
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(f"{url}/health", timeout=5) as reply:
            assert reply.status == 200
        assert _alive(server_pid)

        # Execute
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=10)

        # Assert
        deadline = time.monotonic() + 20
        while _alive(server_pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(server_pid)
    finally:
        if owner.poll() is None:
            owner.kill()


def test_a_server_that_cannot_start_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "60")
    monkeypatch.setenv("PREFECT_SERVER_DATABASE_CONNECTION_URL", "notadb://x")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    server = LocalServer(tmp_path / "home")
    try:
        with pytest.raises(RuntimeError, match="Prefect's API server exited with code") as err:
            server.wait_ready()
        assert "\n" not in str(err.value)
    finally:
        server.stop()


def test_a_server_that_dies_mid_run_ends_the_command_in_one_line(tmp_path: Path) -> None:
    """Prefect's clients would queue events for the gone server and retry them for minutes."""
    from mlflow.tracking import MlflowClient

    from autorank.config import to_yaml
    from tests.flows.conftest import tiny_config

    # Prepare: a run long enough to be killed mid-way, with its own server
    config = tiny_config(tmp_path, training={"rounds": 200, "local_epochs": 1})
    (tmp_path / "config.yaml").write_text(to_yaml(config))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"PREFECT_HOME": str(tmp_path / "home"), "AUTORANK_SERVER_LOST_GRACE_S": "5"}
    command = [sys.executable, "-m", "flows.cli", "run", "--config", str(tmp_path / "config.yaml")]
    proc = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        lines = []
        while not (lines and lines[-1].startswith("[autorank] round 2/")):
            lines.append(proc.stderr.readline())
            assert lines[-1], "".join(lines[-20:])
        children = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True
        ).stdout.split()

        # Execute
        for pid in children:  # the server is the command's only child process
            os.kill(int(pid), signal.SIGKILL)
        code = proc.wait(timeout=90)

        # Assert
        rest = proc.stderr.read().splitlines()
        said = [line for line in rest if line.startswith("autorank:")]
        assert code == 1
        assert len(said) == 1 and "Prefect's API server" in said[0], rest[-5:]
        assert "exited mid-run" in said[0] and "autorank resume " in said[0]
        assert not [line for line in rest if "Traceback" in line or "ERROR" in line]
        client = MlflowClient(tracking_uri=config.tracking.uri)
        (run,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
        assert run.info.status == "FAILED" and run.info.run_id in said[0]
    finally:
        if proc.poll() is None:
            proc.kill()
