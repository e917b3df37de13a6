"""The quickstart and setup scripts say what they are doing: one line per step of the install.

They run here with a stand-in interpreter that records its calls instead of installing.
"""

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A python that makes a venv of itself, installs nothing, and reports torch's version.
FAKE_PYTHON = """#!/bin/sh
echo "$0 $*" >> "$CALLS"
case "$1" in
  --version) echo "Python 3.11.9" ;;
  -c) echo "torch 2.13.0" ;;
  -m) if [ "$2" = venv ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; fi ;;
esac
"""
FAKE_AUTORANK = """#!/bin/sh
echo "autorank $*"
"""


def _project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    (project / "scripts").mkdir(parents=True)
    for name in ("setup.sh", "quickstart.sh"):
        shutil.copy(ROOT / "scripts" / name, project / "scripts" / name)
    python = tmp_path / "python3"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return project


def _run(project: Path, script: str, *args: str) -> list[str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(project.parent / "python3")}
    env["CALLS"] = str(project.parent / "calls.txt")
    done = subprocess.run(
        ["bash", f"scripts/{script}", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_setup_says_each_step_before_it_starts(tmp_path: Path) -> None:
    project = _project(tmp_path)

    said = _run(project, "setup.sh")

    steps = [line.split(" (at ")[0] for line in said]
    assert steps[:2] == ["setup: creating .venv with Python 3.11.9", "setup: upgrading pip"]
    assert steps[2].startswith("setup: installing packages") and "minutes" in steps[2]
    assert any(s.startswith("setup: compiling") for s in steps)
    assert said[-1].startswith("setup: .venv ready (torch 2.13.0; ")
    calls = (tmp_path / "calls.txt").read_text()
    assert " -m venv .venv" in calls and "install --quiet --disable-pip-version-check" in calls

    again = _run(project, "setup.sh")  # idempotent: the venv is kept
    assert again[0].startswith("setup: using the existing .venv")


def test_the_quickstart_says_what_it_runs_after_the_setup(tmp_path: Path) -> None:
    project = _project(tmp_path)
    _run(project, "setup.sh")
    autorank = project / ".venv" / "bin" / "autorank"
    autorank.write_text(FAKE_AUTORANK)
    autorank.chmod(0o755)

    said = _run(project, "quickstart.sh", "--set", "training.rounds=5")

    assert said[0].startswith("quickstart: setting up .venv")
    assert said[1].startswith("setup: ")
    ran = said.index("autorank run --set training.rounds=5")
    assert said[ran - 1].startswith("quickstart: running .venv/bin/autorank run --set training.")
