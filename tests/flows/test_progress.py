"""The terminal's progress display: round lines, a live bar with the time left, plain in logs."""

import io
import logging
import sys

import pytest

from flows.local import ProgressHandler


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
