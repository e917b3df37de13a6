"""`autorank serve`: the local scheduled stack in one command, on 127.0.0.1.

Prefect's server, the process work pool, the deployments of `prefect.yaml`, a worker and the
MLflow UI, each waited for until it answers, then their addresses; Ctrl-C or SIGTERM stops them
all. Every child runs in a process group (a session) of its own: a Ctrl-C at the terminal then
reaches this command alone, which stops the children in order, and stopping a child's group
takes its own children along (the worker's flow-run processes). Each child is also asked to die
with this process (``PR_SET_PDEATHSIG``), so a SIGKILL of the command leaves no server behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.orchestrator import OrchestratorError, answers, die_with_parent

POOL = "autorank-pool"  # prefect.yaml's work pool
STOP_WAIT_S = 10.0  # per child, after SIGTERM, before SIGKILL
POLL_S = 0.5
SERVER_WAIT_S = 180.0  # Prefect's server: 6-20 s on 2 busy cores, more with a new database
STEP_S = 300.0  # the pool, the deployments (`prefect deploy` imports torch), the worker, the UI
# --limit 1: a flow run uses every core; --install-policy never: nothing fetched from the internet
WORKER = ["worker", "start", "--pool", POOL, "--limit", "1", "--install-policy", "never"]


class StackError(OrchestratorError):
    """A part of the stack did not start or stopped by itself; the message is one line."""


@dataclass(frozen=True)
class Ports:
    prefect: int = 4200
    mlflow: int = 5000


@dataclass
class Child:
    """One started part of the stack: its process (leading its own group) and its log."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def failure(self) -> str:
        """``name exited with code N: <last line of its log>``."""
        lines = (
            self.log.read_text(errors="replace").strip().splitlines() if self.log.exists() else []
        )
        last = lines[-1].strip()[:300] if lines else "no output"
        return f"{self.name} exited with code {self.proc.returncode}: {last} (log: {self.log})"


@dataclass
class Stack:
    """The children started so far, stopped together (the last started first)."""

    logs: Path
    env: dict[str, str]
    children: list[Child] = field(default_factory=list)

    def start(self, name: str, command: Sequence[str]) -> Child:
        log = self.logs / f"{name.replace(' ', '-')}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                list(command),
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        child = Child(name, proc, log)
        self.children.append(child)
        return child

    def check(self) -> None:
        """Raise if a long-running child has ended by itself."""
        for child in self.children:
            if child.proc.poll() is not None:
                raise StackError(child.failure())

    def stop(self) -> None:
        """SIGTERM to each child's group, the last started first; SIGKILL what outlives it.

        A second Ctrl-C meanwhile is ignored: it would cut the stop short and leave the rest.
        """
        kept = [(s, signal.signal(s, signal.SIG_IGN)) for s in (signal.SIGINT, signal.SIGTERM)]
        try:
            self._stop()
        finally:
            for signum, handler in kept:
                signal.signal(signum, handler)

    def _stop(self) -> None:
        # One after another: the worker deregisters while the server still answers (with the
        # server gone first, it retried past any wait).
        for child in reversed(self.children):
            stop_group(child.proc)
        self.children.clear()


def stop_group(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM to a child's process group (it was started in a session of its own), then,
    after ``STOP_WAIT_S`` at most, SIGKILL to what is left of the group: its stragglers too."""
    _signal_group(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=STOP_WAIT_S)
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def wait_answers(child: Child, url: str, deadline_s: float) -> None:
    """Poll ``url`` until it answers 200, ``child`` ends, or ``deadline_s`` passes."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise StackError(child.failure())
        if answers(url):
            return
        time.sleep(POLL_S)
    raise StackError(
        f"{child.name} did not answer {url} within {deadline_s:.0f} s (log: {child.log})"
    )


def finish(stack: Stack, child: Child, deadline_s: float) -> None:
    """Wait for a one-off step (the pool, the deployments) to end; a non-zero exit is an error."""
    try:
        child.proc.wait(timeout=deadline_s)
    except subprocess.TimeoutExpired:
        raise StackError(
            f"{child.name} did not finish within {deadline_s:.0f} s (log: {child.log})"
        ) from None
    stack.children.remove(child)
    if child.proc.returncode != 0:
        raise StackError(child.failure())


def mlflow_ui_command(uri: str, port: int) -> list[str]:
    """``mlflow ui`` for ``uri`` on 127.0.0.1:``port``, one worker (2 processes, not 13)."""
    from tasks.tracking import artifact_root

    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    root = artifact_root(uri)
    return command if root is None else [*command, "--default-artifact-root", root]


def stack_env(home: Path, api: str, worker_port: int) -> dict[str, str]:
    """The children's environment: this stack's API, no telemetry (``flows`` set it in
    ``os.environ``), the worker's health port."""
    return os.environ | {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_WEBSERVER_HOST": "127.0.0.1",
        "PREFECT_WORKER_WEBSERVER_PORT": str(worker_port),
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }


def bring_up(stack: Stack, ports: Ports, uri: str, worker_port: int) -> None:
    """Start every part, each once what it needs answers; parts that need nothing of each
    other boot side by side (the MLflow UI beside Prefect's server, the worker beside the
    deployments, which import torch)."""
    prefect = [sys.executable, "-m", "prefect"]
    api = f"http://127.0.0.1:{ports.prefect}/api"
    say("starting Prefect's server and the MLflow UI")
    server = stack.start(
        "prefect server",
        [*prefect, "server", "start", "--host", "127.0.0.1", "--port", str(ports.prefect)],
    )
    ui = stack.start("mlflow ui", mlflow_ui_command(uri, ports.mlflow))
    wait_answers(server, f"{api}/health", SERVER_WAIT_S)
    say(f"creating the process work pool {POOL}")
    finish(stack, stack.start("work pool", [sys.executable, "-m", "flows.pool", POOL]), STEP_S)
    say("deploying prefect.yaml and starting a worker")
    deploy = stack.start("prefect deploy", [*prefect, "--no-prompt", "deploy", "--all"])
    worker = stack.start("prefect worker", [*prefect, *WORKER, "--with-healthcheck"])
    finish(stack, deploy, STEP_S)
    wait_answers(worker, f"http://127.0.0.1:{worker_port}/health", STEP_S)
    wait_answers(ui, f"http://127.0.0.1:{ports.mlflow}/health", STEP_S)


def serve(ports: Ports, uri: str) -> None:
    """Bring the stack up, print where it answers, and keep it until a signal or a part ends
    (raised: KeyboardInterrupt, or StackError); everything is stopped on the way out."""
    from flows.orchestrator import free_port

    worker_port = free_port()
    home = Path(os.environ.get("PREFECT_HOME") or ".prefect").resolve()  # as `autorank run`'s
    (home / "serve").mkdir(parents=True, exist_ok=True)
    api = f"http://127.0.0.1:{ports.prefect}/api"
    stack = Stack(home / "serve", stack_env(home, api, worker_port))
    try:
        bring_up(stack, ports, uri, worker_port)
        print(ready_lines(ports, uri), flush=True)
        while True:
            stack.check()
            time.sleep(1)
    finally:
        stack.stop()


def ready_lines(ports: Ports, uri: str) -> str:
    """Where each part answers, and what to do next."""
    from flows.invocation import tool
    from tasks.tracking import experiments_page

    api = f"http://127.0.0.1:{ports.prefect}/api"
    runs = experiments_page(uri, f"http://127.0.0.1:{ports.mlflow}")
    trigger = f"{tool('prefect')} deployment run 'autorank/quickstart'"
    return "\n".join(
        [
            f"Prefect UI   http://127.0.0.1:{ports.prefect}",
            f"Prefect API  {api}   (export PREFECT_API_URL={api} to use it from a shell)",
            f"MLflow UI    {runs}",
            f"ready: deployments of prefect.yaml on {POOL} with a worker; run one now with "
            f"`PREFECT_API_URL={api} {trigger}` (Ctrl-C stops everything)",
        ]
    )


def say(line: str) -> None:
    """A progress line on stderr."""
    print(f"[autorank serve] {line}", file=sys.stderr, flush=True)
