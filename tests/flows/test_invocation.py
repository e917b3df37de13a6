"""Hints name `autorank` as the user can run it: on PATH, by its path, or through python -m."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows.invocation import command
from flows.local import how_to_look


def _script(folder: Path) -> Path:
    script = folder / ".venv" / "bin" / "autorank"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\necho autorank-here\n")
    script.chmod(0o755)
    return script


def test_the_venv_s_script_off_path_is_named_by_its_path_under_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = _script(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(script), "run"])
    monkeypatch.setenv("PATH", "/usr/bin:/bin")

    hint = command("ui", "--uri", "sqlite:///mlruns/mlflow.db")

    assert hint == ".venv/bin/autorank ui --uri sqlite:///mlruns/mlflow.db"
    done = subprocess.run(hint.split()[0], shell=True, cwd=tmp_path, capture_output=True)
    assert done.stdout == b"autorank-here\n"  # the hint runs in a shell without the venv


def test_a_script_elsewhere_is_named_by_its_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = _script(tmp_path / "project")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    monkeypatch.setattr(sys, "argv", [str(script)])
    monkeypatch.setenv("PATH", "/usr/bin:/bin")

    assert command("resume", "abc") == f"{script} resume abc"


def test_the_script_on_path_is_named_autorank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = _script(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(script)])
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}/usr/bin")

    assert command("resume", "abc") == "autorank resume abc"


def test_another_autorank_on_path_is_not_taken_for_this_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mine, other = _script(tmp_path / "mine"), _script(tmp_path / "other")
    monkeypatch.setattr(sys, "argv", [str(mine)])
    monkeypatch.setenv("PATH", str(other.parent))

    assert command("resume", "abc") == f"{mine} resume abc"


def test_python_m_without_a_script_is_named_with_its_interpreter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["/somewhere/flows/cli.py", "run"])
    monkeypatch.setattr(sys, "executable", "/opt/py/bin/python3")  # no autorank beside it

    assert command("resume", "a b") == "/opt/py/bin/python3 -m flows.cli resume 'a b'"


def test_the_closing_hint_names_the_ui_command_as_the_user_can_run_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = _script(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(script)])
    monkeypatch.setenv("PATH", "/usr/bin:/bin")

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("hints"))

    line = how_to_look(uri, run.info.run_id)

    assert line.startswith(f"Open the UI with `.venv/bin/autorank ui --uri {uri}`, then the run at")
