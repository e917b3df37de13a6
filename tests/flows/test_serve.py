"""`autorank serve`: the local stack comes up, answers, and Ctrl-C leaves no process of it."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from flows.cli import Terminated, main
from flows.serve import Stack, StackError, answers, wait_answers
from tests.flows.conftest import refused_in, spawn_cli, watch_output

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _processes() -> dict[int, tuple[int, int, str]]:
    """Every live process: pid -> (parent pid, process group, state)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        if fields[0] != "Z":
            found[int(entry.name)] = (int(fields[1]), int(fields[2]), fields[0])
    return found


def _descendants(root: int) -> set[int]:
    table, found, frontier = _processes(), set(), {root}
    while frontier:
        frontier = {pid for pid, (ppid, _, _) in table.items() if ppid in frontier} - found
        found |= frontier
    return found


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.status == 200, url
        return bytes(reply.read())


def _deployments(api: str) -> set[str]:
    request = urllib.request.Request(
        f"{api}/deployments/filter", data=b"{}", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        return {d["name"] for d in json.loads(reply.read())}


def test_serve_brings_the_stack_up_and_ctrl_c_stops_every_part(tmp_path: Path) -> None:
    prefect, mlflow = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env |= {"PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp_path / "home")}
    args = ["serve", "--uri", f"sqlite:///{tmp_path}/mlflow.db", "--port", str(mlflow)]
    proc = spawn_cli([*args, "--prefect-port", str(prefect)], env, cwd=ROOT)
    lines, ready = watch_output(proc, lambda said: "\nready: " in said)
    try:
        assert ready.wait(timeout=400), "".join(lines)[-3000:]
        api = f"http://127.0.0.1:{prefect}/api"
        assert _get(f"{api}/health") == b"true"
        assert b"<html" in _get(f"http://127.0.0.1:{prefect}/").lower()  # Prefect's UI
        assert _get(f"http://127.0.0.1:{mlflow}/health") == b"OK"
        said = "".join(lines)
        assert f"http://127.0.0.1:{mlflow}/#/experiments?workflowType=machine_learning" in said
        declared = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
        assert _deployments(api) == {d["name"] for d in declared}
        parts = _descendants(proc.pid)
        groups = {_processes()[pid][1] for pid in parts}
        assert len(parts) >= 4 and proc.pid not in groups  # server, UI, worker: groups of their own

        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C at a terminal: the command's group
        code = proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    members = {pid for pid, info in _processes().items() if info[1] in groups}

    assert code == 128 + signal.SIGINT, "".join(lines)[-3000:]
    assert "autorank: serve stopped" in "".join(lines)
    assert _gone(parts | members), {p: _processes().get(p) for p in parts | members}
    with pytest.raises(OSError):
        _get(f"http://127.0.0.1:{prefect}/api/health")


def _gone(pids: set[int], within_s: float = 5.0) -> bool:
    """Whether none of ``pids`` runs any more (killed ones take a moment to exit)."""
    deadline = time.monotonic() + within_s
    while set(_processes()) & pids and time.monotonic() < deadline:
        time.sleep(0.1)
    return not set(_processes()) & pids


def test_stopping_the_stack_ends_each_child_s_whole_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flows.serve

    monkeypatch.setattr(flows.serve, "STOP_WAIT_S", 1.0)
    stack = Stack(tmp_path, dict(os.environ))
    # a child that ignores SIGTERM and has a child of its own: both must go
    stubborn = stack.start("stubborn", ["sh", "-c", "trap '' TERM; sleep 300 & sleep 300"])
    plain = stack.start("plain", ["sleep", "300"])
    time.sleep(0.5)
    parts = _descendants(os.getpid()) & (_descendants(stubborn.proc.pid) | {plain.proc.pid})
    assert len(parts) >= 3

    stack.stop()

    assert _gone(parts)
    assert not stack.children


def test_a_part_that_exits_before_it_answers_is_one_line_with_its_last_words(
    tmp_path: Path,
) -> None:
    stack = Stack(tmp_path, dict(os.environ))
    child = stack.start("prefect server", ["sh", "-c", "echo starting; echo 'port in use'; exit 3"])

    with pytest.raises(StackError) as err:
        wait_answers(child, f"http://127.0.0.1:{_free_port()}/api/health", 30)

    assert str(err.value).startswith("prefect server exited with code 3: port in use (log: ")
    stack.stop()


def test_serve_outside_the_project_folder_is_refused_before_anything(tmp_path: Path) -> None:
    err = refused_in(tmp_path, ["serve"])

    assert "no prefect.yaml in " in err and "run autorank serve in the project folder" in err


def test_sigterm_stops_serve_with_143(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import flows.serve

    def terminated(*args: object) -> None:
        raise Terminated

    monkeypatch.setattr(flows.serve, "serve", terminated)
    monkeypatch.chdir(ROOT)

    code = main(["serve", "--port", str(_free_port()), "--prefect-port", str(_free_port())])

    assert code == 128 + signal.SIGTERM
    assert capsys.readouterr().err.startswith("autorank: serve stopped")


@pytest.mark.parametrize("api", [None, "http://127.0.0.1:9/api"], ids=["unset", "dead"])
def test_the_pool_without_a_server_is_one_line(api: str | None, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PYTHONPATH": str(ROOT)} | ({"PREFECT_API_URL": api} if api else {})

    done = subprocess.run(
        [sys.executable, "-m", "flows.pool", "autorank-pool"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 1 and not done.stdout
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("flows.pool: error: ")
    assert "prefect server start --host 127.0.0.1" in done.stderr


def test_ctrl_c_stops_the_ui_quietly_with_130_and_leaves_no_process(tmp_path: Path) -> None:
    # Prepare: the UI, up and answering
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = spawn_cli(["ui", "--uri", f"sqlite:///{tmp_path}/m.db", "--port", str(port)], env)
    try:
        deadline = time.monotonic() + 120
        while not answers(f"http://127.0.0.1:{port}/health"):
            assert proc.poll() is None and time.monotonic() < deadline, "the UI never answered"
            time.sleep(0.2)
        parts = _descendants(proc.pid)

        # Execute: the terminal's Ctrl-C reaches the command (the server has a session of its own)
        os.kill(proc.pid, signal.SIGINT)
        said = proc.communicate(timeout=60)[0].decode()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

    # Assert: 130, one line of its own and no traceback, nothing left running
    assert proc.returncode == 130, said[-2000:]
    assert "Traceback" not in said and said.rstrip().endswith("autorank: MLflow UI stopped")
    assert parts and not parts & set(_processes())
