"""The run context handed to job code, and the guard that keeps a run on its target.

Job code reaches the database only through ``ctx``. While a run is active, opening any
other database through SQLAlchemy, or asking ``ctx`` for another target, raises
:class:`~fillgate.errors.TargetEscapeError` before anything is written: the in-process
equivalent of the hard-coded ``live`` header from the first incident.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import Connection, Engine

from fillgate.config import Target
from fillgate.database import TARGET_ATTR
from fillgate.errors import TargetEscapeError
from fillgate.redact import redact_url


@dataclass
class RunContext:
    """What a job's ``compute`` gets as ``ctx``."""

    run_id: str
    target: Target
    job: str
    params: Mapping[str, Any]
    engine: Engine = field(repr=False)
    _connection: Connection | None = field(default=None, repr=False)
    # In a pipeline, ``run_id`` is the pipeline's run (inherited by every stage) and this is
    # the stage's own plan run; outside one, both are the same run.
    stage_run_id: str | None = None
    # The lookup result aligned with the row being computed (compute), or with the rows
    # (compute_batch); None without a lookup.
    result: Any = field(default=None, repr=False)
    results: list[Any] | None = field(default=None, repr=False)
    # The first escape attempt, kept so that job code catching the error cannot hide it.
    escape: TargetEscapeError | None = field(default=None, repr=False)

    @property
    def environment(self) -> str:
        return self.target.environment

    @property
    def who(self) -> str:
        """How refusals name the running code: the job, or the stage of a pipeline run."""
        if self.stage_run_id and self.stage_run_id != self.run_id:
            return f"stage {self.job} of pipeline run {self.run_id}"
        return f"job {self.job} (run {self.run_id})"

    @property
    def connection(self) -> Connection:
        """A connection to the run's target, for lookups (reads)."""
        if self._connection is None:
            self._connection = self.engine.connect()
        return self._connection

    def execute(self, sql: str, **params: Any) -> list[Mapping[str, Any]]:
        """Run a read query on the run's target and return its rows as mappings.

        The read transaction ends with the query: one left open would hold SQLite's shared
        lock and block the run's own ledger writes ("database is locked")."""
        connection = self.connection
        try:
            return [dict(row) for row in connection.execute(text(sql), params).mappings()]
        finally:
            if connection.in_transaction():
                connection.rollback()

    def open_target(self, name: str) -> Engine:
        """The engine of target ``name``; only the run's own target is allowed."""
        if name != self.target.name:
            exc = TargetEscapeError(
                f"{self.who} tried to open target '{name}' while running "
                f"against '{self.target.name}'; a run reaches only its own target. Remove the "
                "hard-coded target from the job and use ctx."
            )
            self.escape = self.escape or exc
            raise exc
        return self.engine

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


_active: contextvars.ContextVar[RunContext | None] = contextvars.ContextVar(
    "fillgate_active_run", default=None
)


_guard_installed = False


def _install_guard() -> None:
    """Listen for new connections on every SQLAlchemy Engine of the process, once, when the
    first run becomes active (not when fillgate is imported).

    The guard must see engines fillgate did not create: job code that calls
    ``create_engine("postgresql://.../live")`` itself is exactly what it exists to refuse, so
    the listeners are on the Engine class, not on the run's own engine. Outside an active run
    (another thread's, or after the run) they return at once."""
    global _guard_installed
    if not _guard_installed:
        event.listen(Engine, "do_connect", _guard_do_connect)
        event.listen(Engine, "engine_connect", _guard_engine_connect)
        _guard_installed = True


@contextmanager
def activate(ctx: RunContext) -> Iterator[RunContext]:
    """Mark ``ctx`` as the active run for the code called inside the block: a connection to
    any database other than the run's target is refused (TargetEscapeError)."""
    _install_guard()
    token = _active.set(ctx)
    try:
        yield ctx
    finally:
        _active.reset(token)
        ctx.close()


def _escape(ctx: RunContext, where: str) -> TargetEscapeError:
    exc = TargetEscapeError(
        f"{ctx.who} tried to open a database other than its target '{ctx.target.name}': {where}. "
        "A run reaches only its own target; use ctx instead of a hard-coded URL."
    )
    ctx.escape = ctx.escape or exc
    return exc


def _guard_do_connect(dialect: Any, _record: Any, cargs: Any, cparams: Any) -> None:
    """Refuse BEFORE a new database connection is opened (no login, no SQLite file created)
    when its connect arguments are not the run's target's."""
    ctx = _active.get()
    if ctx is None:
        return
    expected_args, expected_params = ctx.engine.dialect.create_connect_args(ctx.engine.url)
    if type(dialect) is type(ctx.engine.dialect) and list(cargs) == list(expected_args) and (
        dict(cparams) == dict(expected_params)
    ):
        return
    database = cparams.get("dbname") or cparams.get("database") or cparams.get("db") or (
        cargs[0] if cargs else "?"
    )
    raise _escape(ctx, f"a {dialect.name} database ({database})")


def _guard_engine_connect(conn: Connection) -> None:
    ctx = _active.get()
    if ctx is None:
        return
    engine = conn.engine
    if getattr(engine, TARGET_ATTR, None) == ctx.target.name:
        return
    if engine.url == ctx.target.url:
        return
    raise _escape(ctx, redact_url(engine.url))
