"""How long an apply will take: ``fillgate plan`` times a trial batch.

The trial writes the plan's first updates (at most ``TRIAL_SIZE``) and their audit rows in one
transaction, exactly as an apply's batch does, times it, and **rolls it back**: the user's
tables and the ledger keep nothing of it (a sequence behind the ledger's ids may advance, as
with any rolled-back transaction). Inserts are left out of the trial: a rolled-back insert
can advance a table's auto-increment counter. On MariaDB/MySQL a table a rollback does not
reach (a non-InnoDB engine) or that has triggers gets no trial.

The estimate is the plan's changes at the trial's rate (and no faster than ``--rate``);
holds, pauses and the database's load during the apply are not in it. The apply uses the
rate too: its first adaptive batch is sized by it, and its progress ETA starts from it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from fillgate.backends import backend_for
from fillgate.backends.base import database_reason
from fillgate.database import trial_transaction
from fillgate.ledger import utcnow
from fillgate.pacing import MIN_TIMEOUT_S
from fillgate.sql import Change, TableSQL, apply_changes
from fillgate.stamp import Connected
from fillgate.values import dumps, encode_key

TRIAL_SIZE = 200
"""The most changes a trial batch writes (and rolls back)."""


@dataclass(frozen=True)
class Estimate:
    """A plan's estimated apply duration, or why there is none (``skipped``)."""

    changes: int
    trial: int = 0
    trial_s: float = 0.0
    rate: float | None = None  # changes per second
    duration_s: float | None = None
    skipped: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def trial_estimate(
    conn: Connected, run_id: str, table: str, key: Sequence[str], sample: Sequence[Change], changes: int,
    max_rate: float | None = None,
) -> Estimate:
    """Time ``sample`` (the plan's first updates) written with their audit rows in a
    transaction that is rolled back; estimate ``changes`` at that rate."""
    if not changes:
        return Estimate(changes)
    if not sample:
        return Estimate(changes, skipped="the plan only inserts rows, and a trial insert could advance the "
                                         "table's auto-increment counter")
    engine = conn.engine
    try:
        with engine.connect() as probe:
            refusal = backend_for(engine).trial_refusal(probe, table)
        if refusal:
            return Estimate(changes, skipped=f"no trial batch: {refusal}")
        seconds = _timed_trial(conn, run_id, table, key, sample)
    except SQLAlchemyError as exc:
        if backend_for(engine).is_timeout(exc):
            return Estimate(changes, trial=len(sample), skipped=(
                f"the trial batch of {len(sample)} changes ran longer than {MIN_TIMEOUT_S:g}s (rolled back): "
                "the apply will be slow, or the rows are locked"))
        return Estimate(changes, skipped=f"the trial batch failed (rolled back): {database_reason(exc)}")
    except (ValueError, TypeError, OverflowError) as exc:  # a value the driver refused: never fails the plan
        return Estimate(changes, skipped=f"the trial batch failed (rolled back): {exc}")
    rate = len(sample) / max(seconds, 1e-6)
    duration = changes / rate
    if max_rate:
        duration = max(duration, changes / max_rate)
    return Estimate(changes, len(sample), round(seconds, 6), round(rate, 3), round(duration, 3))


def _timed_trial(conn: Connected, run_id: str, table: str, key: Sequence[str], sample: Sequence[Change]) -> float:
    """Write ``sample`` and its audit rows as a batch would, and roll it all back: the seconds it took."""
    sql = TableSQL(conn.engine.dialect, table, list(key))
    with trial_transaction(conn.engine, MIN_TIMEOUT_S) as tx:
        started = time.perf_counter()
        outcome = apply_changes(tx, sql, list(sample))
        conn.ledger.insert_changes(tx, run_id, table, "trial", utcnow(), [
            (encode_key(c.key), c.column, c.op, dumps(c.old), dumps(c.new)) for c in outcome.applied
        ])
        return time.perf_counter() - started


def format_duration(seconds: float) -> str:
    """``under 1s``, ``45s``, ``12m 5s``, ``3h 20m``."""
    whole = round(seconds)
    if seconds < 1:
        return "under 1s"
    if whole < 60:
        return f"{max(seconds, 0):.1f}s" if seconds < 10 else f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m {secs}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes}m"
