"""The built-in health checks that read the database's own state (what each database says is
in its backend class, ``fillgate.backends``):

- :class:`LoadCheck`: ``--max-load N`` holds while the load is above N, ``--critical-load N``
  stops the run (paused at a batch boundary, :class:`~fillgate.errors.CriticalLoadError`).
  The load is MariaDB/MySQL's ``Threads_running``, PostgreSQL's count of other active
  sessions (``pg_stat_activity``), as pt-online-schema-change reads ``Threads_running``.
- :class:`VacuumCheck`: ``--hold-during-vacuum`` holds while (auto)vacuum runs on the
  table (PostgreSQL, ``pg_stat_progress_vacuum``).
- :class:`LongTransactionCheck`: ``--max-transaction-age S`` holds while another session's
  transaction open for more than S seconds holds a lock on the table (PostgreSQL:
  ``pg_locks`` and ``pg_stat_activity``; MariaDB/MySQL: InnoDB transactions holding locks,
  on any table, as InnoDB does not tell which).

SQLite has none of these (one writer, no server): asking for them is a usage error.
"""

from __future__ import annotations

from sqlalchemy.engine import Connection

from fillgate.backends import backend_for
from fillgate.errors import CriticalLoadError, HealthCheckError, UsageError
from fillgate.throttle import HealthCheck, seconds


def _unsupported(conn: Connection, what: str) -> HealthCheckError:
    return HealthCheckError(f"{what} is not available on {conn.dialect.name}; drop the option for this target.")


class LoadCheck:
    """Holds while the load is above ``max_load``; raises :class:`CriticalLoadError` above
    ``critical_load`` (either may be None)."""

    def __init__(self, max_load: int | None = None, critical_load: int | None = None) -> None:
        for name, value in (("--max-load", max_load), ("--critical-load", critical_load)):
            if value is not None and value < 0:
                raise UsageError(f"{name} must be >= 0, got {value}.")
        if max_load is None and critical_load is None:
            raise UsageError("LoadCheck needs max_load, critical_load or both.")
        self.max_load, self.critical_load = max_load, critical_load

    def check(self, conn: Connection) -> str | None:
        try:
            value, what = backend_for(conn).running_sessions(conn)
        except NotImplementedError:
            raise _unsupported(conn, "--max-load/--critical-load (the database's running sessions)") from None
        if self.critical_load is not None and value > self.critical_load:
            raise CriticalLoadError(f"{what} {value} > --critical-load {self.critical_load}")
        if self.max_load is not None and value > self.max_load:
            return f"{what} {value} > --max-load {self.max_load}"
        return None

    def __repr__(self) -> str:
        return f"LoadCheck(max_load={self.max_load}, critical_load={self.critical_load})"


class VacuumCheck:
    """Holds while a vacuum (autovacuum or VACUUM) runs on ``table``."""

    def __init__(self, table: str) -> None:
        self.table = table

    def check(self, conn: Connection) -> str | None:
        try:
            return backend_for(conn).vacuum_on(conn, self.table)
        except NotImplementedError:
            raise _unsupported(conn, "--hold-during-vacuum (PostgreSQL's pg_stat_progress_vacuum)") from None

    def __repr__(self) -> str:
        return f"VacuumCheck({self.table!r})"


class LongTransactionCheck:
    """Holds while another session's transaction older than ``age_s`` holds a lock on ``table``."""

    def __init__(self, table: str, age_s: float) -> None:
        if not age_s > 0:
            raise UsageError(f"--max-transaction-age must be > 0 seconds, got {age_s!r}.")
        self.table, self.age_s = table, float(age_s)

    def check(self, conn: Connection) -> str | None:
        try:
            found = backend_for(conn).long_transactions(conn, self.table, self.age_s)
        except NotImplementedError:
            raise _unsupported(conn, "--max-transaction-age (other sessions' transactions)") from None
        if not found:
            return None
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        return f"{found[0]}{more}, older than --max-transaction-age {seconds(self.age_s)}, locks {self.table}"

    def __repr__(self) -> str:
        return f"LongTransactionCheck({self.table!r}, {self.age_s:g})"


def database_checks(
    table: str | None, max_load: int | None = None, critical_load: int | None = None,
    hold_during_vacuum: bool = False, max_transaction_age: float | None = None,
) -> list[HealthCheck]:
    """The checks these options ask for (``table``: the table the run writes)."""
    checks: list[HealthCheck] = []
    if max_load is not None or critical_load is not None:
        checks.append(LoadCheck(max_load, critical_load))
    if (hold_during_vacuum or max_transaction_age is not None) and not table:
        raise UsageError("--hold-during-vacuum and --max-transaction-age watch the table a job writes; "
                         "they are not available for a pipeline.")
    if hold_during_vacuum and table:
        checks.append(VacuumCheck(table))
    if max_transaction_age is not None and table:
        checks.append(LongTransactionCheck(table, max_transaction_age))
    return checks
