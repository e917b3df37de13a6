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


def test_the_server_answers_then_stops_and_bad_input_leaves_no_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
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
        server.wait_ready()
        with urllib.request.urlopen(f"{server.url}/health", timeout=5) as reply:
            assert reply.status == 200
        pid = server.process.pid
        server.discard()  # what a failed preflight does

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
    # Prepare: a process that owns a server, then is killed without a chance to clean up
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from flows.orchestrator import LocalServer
        server = LocalServer(Path({str(tmp_path / "home")!r}))
        server.wait_ready()
        print(server.process.pid, flush=True)
        time.sleep(120)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    owner = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, env=env, cwd=Path.cwd()
    )
    try:
        assert owner.stdout is not None
        server_pid = int(owner.stdout.readline())
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
