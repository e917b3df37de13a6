"""A round's record is not cut by a signal: it lands after the block."""

import os
import signal

from flows.runners import signals_deferred


def test_a_signal_inside_the_block_reaches_the_previous_handler_after_it() -> None:
    seen: list[str] = []

    def previous(signum: int, frame: object) -> None:
        seen.append(f"handled {signum}")

    old = signal.signal(signal.SIGTERM, previous)
    try:
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            seen.append("block finished")
        assert seen == ["block finished", f"handled {int(signal.SIGTERM)}"]
        assert signal.getsignal(signal.SIGTERM) is previous  # restored
    finally:
        signal.signal(signal.SIGTERM, old)


def test_no_signal_no_call() -> None:
    calls: list[int] = []
    old = signal.signal(signal.SIGINT, lambda s, f: calls.append(s))
    try:
        with signals_deferred():
            pass
        assert calls == []
    finally:
        signal.signal(signal.SIGINT, old)
