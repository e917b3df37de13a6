"""Prefect's API for a local command: started first, booting beside the command's own start-up.

Without ``PREFECT_API_URL`` a flow call makes Prefect start a temporary API server only when the
flow starts, after importing the server's code into this process (about 7 s of CPU on these
machines), and then waits for it (4-10 s). Starting the same server ourselves, as the first thing
a command does, lets it boot on another core while this process imports torch and checks its
input, and keeps the server's code out of this process. It is Prefect's own ASGI app served by
uvicorn on 127.0.0.1, with the settings Prefect gives its temporary server (no UI), and it is
asked to die with this process (Linux ``PR_SET_PDEATHSIG``), so even a SIGKILL leaves no server
behind. It runs in a session of its own: a signal to the command's process group (Ctrl-C on a
terminal, a scheduler's SIGTERM to the job) reaches the command alone, which marks its run and
then stops the server, instead of the server dying first and the command taking that for a lost
server. With ``PREFECT_API_URL`` already set, that server is used and nothing is started.
"""

from __future__ import annotations

import _thread
import contextlib
import fcntl
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def answers(url: str) -> bool:
    """Whether ``url`` answers 200 within 2 s."""
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return int(reply.status) == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def die_with_parent() -> None:
    """In the child before exec: ask Linux to send SIGTERM when the parent dies."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class OrchestratorError(RuntimeError):
    """Prefect's API server could not be started or died; the message is one line."""


class LocalServer:
    """A Prefect API server process for this command (see the module docstring).

    Commands started at once in one folder share its Prefect home: the first to find no
    database there holds a lock on the home until its server has created and migrated it
    (servers migrating one new database at once failed), the others wait for that.
    """

    def __init__(self, home: Path) -> None:
        self.home = home
        self.created_home = not home.exists()
        home.mkdir(parents=True, exist_ok=True)
        self._stopping = False
        self._boot_lock: int | None = os.open(home, os.O_RDONLY)
        fcntl.flock(self._boot_lock, fcntl.LOCK_EX)
        if (home / "prefect.db").exists():
            self._release_boot_lock()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.log = tempfile.TemporaryFile()  # noqa: SIM115  (closed by stop())
        # Where prefect is installed, found without importing it (the server runs elsewhere).
        spec = importlib.util.find_spec("prefect")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("prefect is not installed (pip install -e .)")
        package = Path(next(iter(spec.submodule_search_locations))).parent
        env = dict(
            os.environ,
            PREFECT_HOME=str(home),
            PREFECT_UI_ENABLED="0",
            PREFECT__SERVER_EPHEMERAL="1",
            PREFECT__SERVER_FINAL="1",
        )
        env.pop("PREFECT_API_URL", None)
        command = [sys.executable, "-m", "uvicorn", "--app-dir", str(package), "--factory",
                   "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port",
                   str(self.port), "--log-level", "error", "--lifespan", "on"]  # fmt: skip
        self.process = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
            start_new_session=True,  # out of the command's process group (module docstring)
            preexec_fn=die_with_parent,
        )

    def _release_boot_lock(self) -> None:
        if self._boot_lock is not None:
            os.close(self._boot_lock)  # releases the lock
            self._boot_lock = None

    def wait_ready(self) -> None:
        """Block until the server answers its health check.

        Raises:
            OrchestratorError: the server exited or did not answer in time (one line, with its
                last error line).
        """
        try:
            self._wait_ready()
        finally:
            self._release_boot_lock()

    def ready(self) -> bool:
        """Whether the server answers its health check now (no waiting)."""
        if self.process.poll() is not None or not self._answers():
            return False
        self._release_boot_lock()
        return True

    def _answers(self) -> bool:
        """One health check (2 s at most)."""
        return answers(f"{self.url}/health")

    def _wait_ready(self) -> None:
        timeout = float(os.environ.get(_TIMEOUT_ENV, "90"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise OrchestratorError(
                    f"Prefect's API server exited with code {self.process.returncode}: "
                    f"{self._last_error()}"
                )
            if self._answers():
                return
            time.sleep(0.1)
        raise OrchestratorError(
            f"Prefect's API server did not start within {timeout:.0f} s ({_TIMEOUT_ENV}); "
            f"{self._last_error()}"
        )

    def _last_error(self) -> str:
        self.log.seek(0)
        lines = [ln.strip() for ln in self.log.read().decode(errors="replace").splitlines()]
        lines = [ln for ln in lines if ln]
        return lines[-1] if lines else "no error output"

    def watch(self, last_words: Callable[[str], None] | None = None) -> None:
        """From now on, a server that exits by itself stops this process's command.

        A thread waits on the server; if it exits before ``stop``, ``lost_server`` says how, and
        the main thread is interrupted with ``LOST_SIGNAL`` (SIGUSR1), whose handler (the
        CLI's; Prefect's flow engine takes SIGTERM) raises ``OrchestratorError``. Without it the
        flow would train on while Prefect's clients queue events for a server that is gone, and
        at exit retry them for minutes. Without a handler the interrupt does nothing. If the
        command is still running ``AUTORANK_SERVER_LOST_GRACE_S`` (15) seconds later,
        ``last_words(how)`` is called from the watching thread (the CLI's ends the process).
        """

        def wait() -> None:
            code = self.process.wait()
            if self._stopping:
                return
            pid = self.process.pid
            how = f"Prefect's API server (pid {pid}) exited mid-run with code {code}"
            _LOST.append(how)
            # Prefect's clients now log every event they cannot send, each with its payload;
            # the command says what happened in one line.
            for name in ("prefect", "prefect.events", "prefect.events.clients"):
                logging.getLogger(name).setLevel(logging.CRITICAL)
            _thread.interrupt_main(LOST_SIGNAL)
            # The run's own handler marks its MLflow run within seconds; Prefect's engine may
            # then retry the gone server for minutes before the exception reaches the command.
            time.sleep(float(os.environ.get(_GRACE_ENV, "15")))
            if last_words is not None:
                last_words(how)

        threading.Thread(target=wait, name="prefect-server-watch", daemon=True).start()

    def stop(self) -> None:
        """Shut the server down (SIGTERM, then SIGKILL after 10 s)."""
        self._stopping = True
        self._release_boot_lock()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()

    def discard(self) -> None:
        """Stop, and remove the Prefect home if this server created it (bad input: no traces)."""
        self.stop()
        if self.created_home:
            shutil.rmtree(self.home, ignore_errors=True)


_STARTED: set[str] = set()  # API URLs of the servers this process started (and stopped)
LOST_SIGNAL = signal.SIGUSR1
_GRACE_ENV = "AUTORANK_SERVER_LOST_GRACE_S"
_LOST: list[str] = []  # servers of this process that exited by themselves, and how


def lost_server() -> str | None:
    """How this process's Prefect API server ended, if it exited by itself mid-command."""
    return _LOST[-1] if _LOST else None


def _configured_url() -> str | None:
    """The API URL Prefect uses now, unless it is one of ours (stopped by now)."""
    url = os.environ.get("PREFECT_API_URL")
    if not url and "prefect.context" in sys.modules:
        from prefect.settings import get_current_settings

        url = get_current_settings().api.url
    return url if url and url not in _STARTED else None


@contextlib.contextmanager
def prefect_api(home: Path) -> Iterator[LocalServer | None]:
    """Start a local Prefect API server unless Prefect is pointed at one; stop it after.

    Yields the server, or None when ``PREFECT_API_URL`` (or an active Prefect settings context,
    such as Prefect's test harness) names a server already. Prefect reads its settings when it is
    imported: before that ``PREFECT_API_URL`` is set for the duration; after it, the setting is
    overridden in a Prefect settings context.
    """
    if _configured_url() is not None:
        yield None
        return
    server = LocalServer(home)
    _STARTED.add(server.url)
    os.environ["PREFECT_API_URL"] = server.url
    try:
        if "prefect.context" in sys.modules:
            from prefect.settings import PREFECT_API_URL, temporary_settings

            with temporary_settings(updates={PREFECT_API_URL: server.url}):
                yield server
        else:
            yield server
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()
