"""Gates and pacing: what plan, apply, run, resume and revert may do, and how fast.

``Limits`` holds the gates (``--max-changes``, ``--max-errors``, ``--max-error-rate``, the
typed ``--confirm``) and the pacing (``--batch-size``, ``--rate``, the pause between batches,
health checks and the longest hold). ``Limits.for_target`` builds them from command-line
options and tries the health checks once, so a check that cannot work on the target stops the
command before anything is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from fillgate.backends import backend_for
from fillgate.config import Target
from fillgate.errors import ErrorBudgetExceededError, ProtectedTargetError
from fillgate.health import database_checks
from fillgate.stamp import Connected
from fillgate.throttle import HealthCheck, SQLCheck, Throttle


@dataclass(frozen=True)
class Limits:
    """Gates and pacing shared by plan, apply, run, resume and revert."""

    max_changes: int | None = None  # None: the target's max_changes (see change_gate)
    max_errors: int | None = None
    max_error_rate: float | None = None
    batch_size: int = 5000
    pause_ms: int = 0
    confirm: str | None = None
    rate: float | None = None  # rows per second
    checks: Sequence[HealthCheck] = field(default_factory=tuple)
    max_hold_s: float | None = None
    skip_rehearsal: bool = False  # --skip-rehearsal (with --confirm ENV): apply without the rehearsal
    # --chunk-time: None or 0 keeps every batch at batch_size; otherwise batch_size is the
    # maximum of an adaptive size (fillgate.pacing)
    chunk_time: float | None = None
    batch_timeout_s: float | None = None  # None: the default of fillgate.pacing.batch_timeout; 0: none

    @classmethod
    def for_target(
        cls,
        conn: Connected,
        *,
        hold_while: Sequence[str] = (),
        max_replication_lag: float | None = None,
        table: str | None = None,
        max_load: int | None = None,
        critical_load: int | None = None,
        hold_during_vacuum: bool = False,
        max_transaction_age: float | None = None,
        **values: object,
    ) -> Limits:
        """Limits from command-line options (None means "not given"), with the built-in health
        checks: ``hold_while`` SQL queries, replication lag, the database's load (``max_load``
        holds, ``critical_load`` stops), a vacuum on ``table`` and old transactions holding
        locks on it. Each check runs once now against the target: a check that cannot work
        there, or a load already past ``critical_load``, stops the command before it writes."""
        checks: list[HealthCheck] = [SQLCheck(sql) for sql in hold_while]
        if max_replication_lag is not None:
            lag_check = backend_for(conn.engine).replication_lag_check(max_replication_lag, conn.target.replicas)
            checks.append(lag_check)
        checks.extend(database_checks(table, max_load, critical_load, hold_during_vacuum, max_transaction_age))
        if checks:
            with conn.engine.connect() as probe:
                Throttle(checks=checks).reasons(probe)
        given = {k: v for k, v in values.items() if v is not None}
        return cls(checks=tuple(checks), **given)  # type: ignore[arg-type]

    def with_checks(self, extra: Sequence[HealthCheck]) -> Limits:
        return replace(self, checks=(*self.checks, *extra)) if extra else self

    def throttle(self) -> Throttle:
        """The pacing these limits ask for (``--rate``, the pause, health checks)."""
        return Throttle(rate=self.rate, pause_ms=self.pause_ms, checks=list(self.checks), max_hold_s=self.max_hold_s)

    def check_errors(self, errors: int, seen: int, what: str) -> None:
        if self.max_errors is not None and errors > self.max_errors:
            raise ErrorBudgetExceededError(
                f"{what} stopped: {errors} errors exceed --max-errors {self.max_errors}."
            )
        if self.max_error_rate is not None and seen >= 100 and errors / seen > self.max_error_rate:
            raise ErrorBudgetExceededError(
                f"{what} stopped: {errors} errors in {seen} rows ({errors / seen:.1%}) exceed "
                f"--max-error-rate {self.max_error_rate:g}."
            )

    def change_gate(self, target: Target) -> int | None:
        """The most changes an apply may write: ``max_changes``, else the target's
        ``max_changes`` from the config file. A protected target must have one."""
        if self.max_changes is not None:
            return self.max_changes
        if target.max_changes is None and target.protected:
            raise ProtectedTargetError(
                f"target '{target.name}' is the protected environment '{target.environment}' and has no change "
                "gate; refusing to write an unbounded plan. Nothing was written. Give --max-changes N, or set "
                f"max_changes = N under [targets.{target.name}] in the config file."
            )
        return target.max_changes
