"""One apply per (job, target) at a time.

PostgreSQL holds a session advisory lock, MariaDB/MySQL a ``GET_LOCK``; both vanish with the
holder's connection, so a killed process never leaves a stuck lock. SQLite has neither, so
the lock is a row in ``fillgate_locks`` with a heartbeat: it is stale when its process is
gone (same host) or its heartbeat is older than ``runs.STALE_AFTER`` (another host). On every backend the lock
row names the holder, so a refusal can say who has it.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from fillgate.backends import backend_for
from fillgate.database import write_transaction
from fillgate.errors import LockHeldError
from fillgate.ledger import schema
from fillgate.ledger.store import utcnow
from fillgate.runs import process_gone


def _is_stale(row: Any) -> bool:
    return process_gone(row.host, row.pid, row.heartbeat_at, utcnow()) is not None


class ApplyLock:
    """The lock named ``name`` held for run ``run_id``; use as a context manager."""

    def __init__(self, engine: Engine, name: str, run_id: str, operator: str) -> None:
        self.engine = engine
        self.name = name
        self.run_id = run_id
        self.operator = operator
        self.backend = backend_for(engine)
        self._conn: Connection | None = None  # the session holding a session lock

    # --- public --------------------------------------------------------------------------

    def acquire(self) -> ApplyLock:
        conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        got = self.backend.try_session_lock(conn, self.name)
        if got is None:  # no session locks here (SQLite): the lock is the row
            conn.close()
            self._acquire_row()
            return self
        if not got:
            conn.close()
            raise self._held_error()
        self._conn = conn
        try:
            # The row only names the holder. READ COMMITTED: InnoDB then takes no gap lock for the
            # DELETE of an absent row, so processes taking different locks at once (the
            # partitions of a distributed run) do not deadlock on the index gap between them.
            with self.engine.connect().execution_options(isolation_level="READ COMMITTED") as row, row.begin():
                row.execute(delete(schema.locks).where(schema.locks.c.name == self.name))
                row.execute(insert(schema.locks).values(**self._row()))
        except BaseException:
            self.backend.release_session_lock(conn, self.name)  # never hold a lock nothing will release
            conn.close()
            self._conn = None
            raise
        return self

    def heartbeat(self, conn: Connection) -> None:
        """Refresh the lock row (inside the caller's batch transaction)."""
        conn.execute(
            update(schema.locks)
            .where(schema.locks.c.name == self.name, schema.locks.c.run_id == self.run_id)
            .values(heartbeat_at=utcnow())
        )

    def release(self) -> None:
        try:
            with self.engine.begin() as tx:
                tx.execute(
                    delete(schema.locks).where(
                        schema.locks.c.name == self.name, schema.locks.c.run_id == self.run_id
                    )
                )
        finally:
            if self._conn is not None:
                self.backend.release_session_lock(self._conn, self.name)
                self._conn.close()
                self._conn = None

    def __enter__(self) -> ApplyLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # --- internals -----------------------------------------------------------------------

    def _row(self) -> dict[str, Any]:
        now = utcnow()
        return {
            "name": self.name, "run_id": self.run_id, "operator": self.operator,
            "host": socket.gethostname(), "pid": os.getpid(), "acquired_at": now, "heartbeat_at": now,
        }

    def _acquire_row(self) -> None:
        locks = schema.locks
        try:
            with self.engine.begin() as tx:
                tx.execute(insert(locks).values(**self._row()))
            return
        except IntegrityError:
            pass
        # reads, then writes: on SQLite the write lock is taken first, so that two processes
        # taking over the same stale lock wait for each other instead of failing "database is locked"
        with write_transaction(self.engine) as tx:
            row = tx.execute(select(locks).where(locks.c.name == self.name)).first()
            if row is not None and not _is_stale(row):
                raise self._held_error(row)
            if row is None:
                tx.execute(insert(locks).values(**self._row()))
                return
            taken = tx.execute(
                update(locks)
                .where(locks.c.name == self.name, locks.c.run_id == row.run_id)
                .values(**self._row())
            ).rowcount
            if taken != 1:
                raise self._held_error()

    def _held_error(self, row: Any = None) -> LockHeldError:
        if row is None:
            with self.engine.connect() as conn:
                row = conn.execute(
                    select(schema.locks).where(schema.locks.c.name == self.name)
                ).first()
        holder = (
            f"run {row.run_id} by {row.operator} (pid {row.pid} on {row.host}, "
            f"since {row.acquired_at:%Y-%m-%d %H:%M:%S} UTC)"
            if row is not None
            else "another process"
        )
        return LockHeldError(
            f"{self.name} is already running on this target: held by {holder}. "
            "Wait for it to finish, or pause/cancel it with: fillgate pause RUN / fillgate cancel RUN"
        )
