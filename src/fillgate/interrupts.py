"""Stopping a run cleanly: Ctrl-C and SIGTERM end it at a batch boundary, never inside one.

The first SIGINT (Ctrl-C) or SIGTERM asks the running plan, apply or revert to stop: an apply
finishes the batch it is writing (data, audit and checkpoint commit together), then pauses the
run so that ``fillgate resume`` continues it; a plan stops after its current page. A second
Ctrl-C stops at once: the batch in flight is rolled back by the database, and the run is still
left paused (apply) or failed (plan), never 'running'. A second Ctrl-C while fillgate saves
the run's status or releases its lock does not cut that short; a third exits at once. Waits
between batches (``--rate``, pauses, health-check holds) end as soon as a stop is asked for.

Library users who want the same behaviour wrap their calls in :func:`stop_on_signals`, or call
:func:`request_stop` from their own handler (or another thread).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

_stop = threading.Event()
_reason: list[str] = []
_interruptible = [0]  # > 0 while the main thread is inside an interruptible() block
_signals = [0]  # SIGINTs received since the handler was installed


def request_stop(reason: str = "a stop was requested") -> None:
    """Ask the running plan/apply/revert of this process to stop at its next boundary."""
    if not _reason:
        _reason.append(reason)
    _stop.set()


def stop_requested() -> str | None:
    """Why a stop was requested, or None."""
    return _reason[0] if _stop.is_set() and _reason else None


def clear() -> None:
    _reason.clear()
    _stop.clear()
    _signals[0] = 0


@contextmanager
def interruptible() -> Iterator[None]:
    """Work that a second Ctrl-C may cut short (a batch's transaction, a plan page's compute):
    the database rolls it back. Outside such blocks (saving a run's status, releasing its
    lock) a second Ctrl-C only repeats the stop request, so bookkeeping is never cut in half;
    a third one exits at once."""
    _interruptible[0] += 1
    try:
        yield
    finally:
        _interruptible[0] -= 1


def sleep(seconds: float) -> None:
    """``time.sleep`` that ends early when a stop is requested."""
    if seconds > 0:
        _stop.wait(seconds)


_NAMES = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}


@contextmanager
def stop_on_signals(on_first: Callable[[str], None] | None = None, *, linger: bool = False) -> Iterator[None]:
    """While inside, the first SIGINT/SIGTERM requests a stop (``on_first(reason)`` is called,
    e.g. to print "stopping after the current batch"), a second SIGINT raises
    KeyboardInterrupt. Outside the main thread this does nothing (Python delivers signals to
    the main thread only).

    With ``linger`` (the ``fillgate`` command, which ends once its run has stopped), a signal
    that stopped the run keeps its effect after the block: a further Ctrl-C while the command
    prints its summary and exits is ignored (a third exits at once), instead of killing the
    process halfway through its last lines."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGINT:
            _signals[0] += 1
        if _stop.is_set() and signum == signal.SIGINT:
            if _interruptible[0]:
                raise KeyboardInterrupt
            if _signals[0] >= 3:
                os.write(2, b"interrupted: third Ctrl-C, exiting at once (what was committed stays committed).\n")
                os._exit(130)
            return
        reason = f"interrupted by {_NAMES.get(signal.Signals(signum), str(signum))}"
        request_stop(reason)
        if on_first is not None:
            on_first(reason)

    def finishing(signum: int, _frame: FrameType | None) -> None:
        _signals[0] += 1
        if _signals[0] >= 3:
            os.write(2, b"interrupted: third Ctrl-C, exiting at once (what was committed stays committed).\n")
            os._exit(130)

    previous = {sig: signal.signal(sig, handler) for sig in _NAMES}
    try:
        yield
    finally:
        stopped_by_signal = _stop.is_set() and bool(_reason) and _reason[0].startswith("interrupted by ")
        for sig, old in previous.items():
            signal.signal(sig, finishing if linger and stopped_by_signal else old)
        count = _signals[0]
        clear()
        if linger and stopped_by_signal:
            _signals[0] = count
