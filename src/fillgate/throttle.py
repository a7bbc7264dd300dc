"""Pacing between batches: a rows-per-second rate, a fixed pause, and health checks that hold
the run while the database is under strain.

The engine calls :meth:`Throttle.after_batch` once per committed batch::

    throttle = Throttle(rate=500, pause_ms=100, checks=[ReplicationLagCheck(5)], max_hold_s=600)
    throttle.start()
    for batch in batches:
        ...write and commit the batch...
        held_s = throttle.after_batch(len(batch), engine, on_hold=lambda reason: ...)

``after_batch`` sleeps in three steps, in order:

1. rate: long enough that the batch took at least ``rows / rate`` seconds, measured from the
   end of the previous ``after_batch`` (or :meth:`Throttle.start`). A slow batch is not made
   up for by a burst afterwards.
2. pause: ``pause_ms`` milliseconds.
3. health: while any check names a reason to hold, call ``on_hold(reason)`` (e.g. to write a
   ``run_held`` event or a progress line "held: replication lag 12.3s > 5s"), sleep ``poll_s``
   and check again. After ``max_hold_s`` seconds of one hold the run stops with
   :class:`~fillgate.errors.HoldTimeoutError`; batches already committed stay committed.

A health check is any object with ``check(conn) -> str | None``: None when healthy, otherwise
the reason to hold. It gets a SQLAlchemy connection to the run's target; the connection's
transaction is ended after every round of checks, so no snapshot is kept while holding. An
exception from a check stops the run (a check that cannot tell must not wave the run on).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from fillgate import interrupts
from fillgate.errors import HealthCheckError, HoldTimeoutError, UsageError

ConnectionSource = Engine | Callable[[], Connection]
"""An engine, or a callable returning a new connection (closed by the throttle after use).
Never a connection in use: the throttle ends its transaction after every round of checks."""


@runtime_checkable
class HealthCheck(Protocol):
    """Decides, between batches, whether the run may go on."""

    def check(self, conn: Connection) -> str | None:
        """None when healthy; otherwise the reason to hold, e.g. ``"replication lag 12.3s > 5s"``."""
        ...


def seconds(value: float) -> str:
    return f"{value:.1f}s" if value < 100 else f"{value:.0f}s"


class SQLCheck:
    """Holds while ``sql`` returns a truthy first column in its first row.

    ``SQLCheck("SELECT count(*) > 1000 FROM job_queue", "job queue over 1000")``. No row, NULL,
    0, false or an empty string mean healthy. The reason is ``description`` (default: the
    query), followed by the value when it is not simply true.
    """

    def __init__(self, sql: str, description: str | None = None, params: dict[str, Any] | None = None) -> None:
        if not sql or not sql.strip():
            raise UsageError("SQLCheck needs a query.")
        self.sql = sql
        self.description = description or " ".join(sql.split())
        self.params = params or {}

    def check(self, conn: Connection) -> str | None:
        try:
            row = conn.execute(text(self.sql), self.params).first()
        except SQLAlchemyError as exc:
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            raise HealthCheckError(
                f"the health check query {self.description!r} failed: {reason}. Fix the query "
                "(--hold-while), or drop it."
            ) from exc
        if row is None or not row[0]:
            return None
        value = row[0]
        return self.description if value is True or value == 1 else f"{self.description}: {value}"

    def __repr__(self) -> str:
        return f"SQLCheck({self.description!r})"


class Throttle:
    """Pacing between batches; see the module docstring.

    ``rate``        rows per second at most; None = no pacing.
    ``pause_ms``    fixed pause after every batch.
    ``checks``      health checks run after every batch (after the rate and pause sleeps).
    ``poll_s``      seconds between checks while held.
    ``max_hold_s``  longest single hold before the run stops; None = hold as long as needed.
    ``on_hold``     default callback ``(reason) -> None``, called on every poll while held.
    ``clock``, ``sleep``  injectable for tests (monotonic seconds).

    After each call: ``last_paced_s``, ``last_paused_s``, ``last_held_s``; ``hold_s`` is the
    length of the current hold (readable from ``on_hold``); totals in ``paced_s``, ``paused_s``,
    ``held_s``, and ``holds`` counts the holds.
    """

    def __init__(
        self,
        rate: float | None = None,
        pause_ms: int = 0,
        checks: Sequence[HealthCheck] = (),
        poll_s: float = 1.0,
        max_hold_s: float | None = None,
        *,
        on_hold: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = interrupts.sleep,
    ) -> None:
        if rate is not None and not rate > 0:
            raise UsageError(f"--rate must be a positive number of rows per second, got {rate!r}.")
        if pause_ms < 0:
            raise UsageError(f"--pause-between-batches must be >= 0 ms, got {pause_ms!r}.")
        if not poll_s > 0:
            raise UsageError(f"the health-check poll interval must be > 0 s, got {poll_s!r}.")
        if max_hold_s is not None and max_hold_s < 0:
            raise UsageError(f"the maximum hold must be >= 0 s (or none), got {max_hold_s!r}.")
        for check in checks:
            if not callable(getattr(check, "check", None)):
                raise UsageError(f"health check {check!r} has no check(conn) method.")
        self.rate = rate
        self.pause_ms = pause_ms
        self.checks = list(checks)
        self.poll_s = poll_s
        self.max_hold_s = max_hold_s
        self.on_hold = on_hold
        self._clock = clock
        self._sleep = sleep
        self._mark = clock()
        self.hold_s = 0.0
        self.last_paced_s = self.last_paused_s = self.last_held_s = 0.0
        self.paced_s = self.paused_s = self.held_s = 0.0
        self.holds = 0

    @property
    def active(self) -> bool:
        """Whether ``after_batch`` can ever sleep."""
        return bool(self.rate or self.pause_ms or self.checks)

    def start(self) -> None:
        """Mark the start of the first batch (the rate is measured from here)."""
        self._mark = self._clock()

    def after_batch(
        self,
        rows_in_batch: int,
        connection: ConnectionSource | None = None,
        *,
        on_hold: Callable[[str], None] | None = None,
    ) -> float:
        """Sleep as the rate, the pause and the health checks require; return the seconds
        spent here. ``connection`` (an Engine, or a callable returning a new Connection) is
        needed when there are health checks; it is opened only for them."""
        began = self._clock()
        self.last_paced_s = self.last_paused_s = self.last_held_s = 0.0
        if self.rate:
            due = self._mark + rows_in_batch / self.rate
            wait = due - self._clock()
            if wait > 0:
                self._sleep(wait)
                self.last_paced_s = wait
        if self.pause_ms:
            self._sleep(self.pause_ms / 1000)
            self.last_paused_s = self.pause_ms / 1000
        if self.checks:
            if connection is None:
                raise UsageError("health checks need a connection to the target: pass the engine to after_batch.")
            self.last_held_s = self._hold_while_unhealthy(connection, on_hold or self.on_hold)
        self.paced_s += self.last_paced_s
        self.paused_s += self.last_paused_s
        self.held_s += self.last_held_s
        self._mark = self._clock()
        return self._mark - began

    def reasons(self, conn: Connection) -> list[str]:
        """The reasons every check gives to hold now (empty: healthy)."""
        try:
            return [reason for check in self.checks if (reason := check.check(conn))]
        finally:
            conn.rollback()  # keep no transaction (or snapshot) open between polls

    def _hold_while_unhealthy(self, connection: ConnectionSource, on_hold: Callable[[str], None] | None) -> float:
        started = self._clock()
        self.hold_s = 0.0
        counted = False
        with _connected(connection) as conn:
            while True:
                reasons = self.reasons(conn)
                self.hold_s = self._clock() - started
                if not reasons or interrupts.stop_requested():  # a stop ends the hold; the run stops
                    return self.hold_s
                reason = "; ".join(reasons)
                if not counted:
                    self.holds += 1
                    counted = True
                if self.max_hold_s is not None and self.hold_s >= self.max_hold_s:
                    raise HoldTimeoutError(
                        f"the run was held for {seconds(self.hold_s)} by its health checks ({reason}), "
                        f"longer than the maximum of {self.max_hold_s:g}s, and stopped; the batches "
                        "written so far are committed."
                    )
                if on_hold is not None:
                    on_hold(reason)
                self._sleep(self.poll_s)


@contextmanager
def _connected(source: ConnectionSource) -> Iterator[Connection]:
    conn = source.connect() if isinstance(source, Engine) else source()
    try:
        yield conn
    finally:
        conn.close()
