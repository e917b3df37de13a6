"""How the user starts `autorank` from their shell, for the commands a hint prints.

A hint saying `autorank ui` is `command not found` where the virtual environment is not active,
so hints name the program as this process was started: `autorank` when that name on PATH is
this very program, else its path (relative to the working folder when it lies under it).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

NAME = "autorank"


def command(*args: str) -> str:
    """``autorank ARGS`` as the user can paste it, e.g. ``.venv/bin/autorank ui --uri ...``."""
    return shlex.join([*program(), *args])


def program() -> list[str]:
    """The words that start `autorank` here: ``["autorank"]``, a path to the console script, or
    ``[python, "-m", "flows.cli"]`` where there is no script."""
    script = _script()
    if script is None:
        return [_shown(Path(sys.executable)), "-m", "flows.cli"]
    found = shutil.which(NAME)
    if found is not None and _same_file(Path(found), script):
        return [NAME]
    return [_shown(script)]


def _script() -> Path | None:
    """The console script this process runs, else the one beside its interpreter (a venv's)."""
    started = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if started is not None and started.name == NAME and started.is_file():
        return started
    beside = Path(sys.executable).parent / NAME
    return beside if beside.is_file() else None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _shown(path: Path) -> str:
    """``path`` relative to the working folder when under it (``.venv/bin/autorank``), else
    absolute; symbolic links are kept as the user sees them."""
    full = path.absolute()
    try:
        relative = full.relative_to(Path.cwd())
    except ValueError:
        return str(full)
    return str(relative) if len(relative.parts) > 1 else f"./{relative}"


def tool(name: str) -> str:
    """Another console script of this environment (``prefect``) as the user can run it: its
    name where PATH finds this one, else its path."""
    script = Path(sys.executable).parent / name
    found = shutil.which(name)
    if found is not None and (not script.is_file() or _same_file(Path(found), script)):
        return name
    return shlex.quote(_shown(script))
