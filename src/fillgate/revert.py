"""Inverse plans: undo a run from its audit log, as a new audited run.

Each inverse change is a compare-and-set against the value the reverted run wrote, so a
row changed since then is reported as a conflict and never overwritten.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from fillgate.applier import ApplyResult, execute, new_writing_run, start_writing_run
from fillgate.errors import AlreadyDoneError, RunStateError
from fillgate.ledger import Ledger, Run
from fillgate.limits import Limits
from fillgate.monitor import Monitor
from fillgate.runs import WRITING_KINDS, RunKind, RunStatus
from fillgate.sql import Change, TableSQL, current_value, would_apply
from fillgate.stamp import Connected, check_write_allowed
from fillgate.values import decode_key, loads


def inverse_changes(ledger: Ledger, run_id: str) -> Iterator[Change]:
    """For every field the run changed: set it back, if it still holds what the run wrote."""
    inverse = {"update": "update", "insert": "delete", "delete": "insert"}
    for row in ledger.iter_changes(run_id):
        yield Change(decode_key(row.row_key), row.column_name, loads(row.new_value), loads(row.old_value),
                     inverse[row.op], row.row_key, row.new_value, row.old_value)


@dataclass
class RevertPreview:
    """What ``revert --dry-run`` found: how many fields would be restored, and conflicts."""

    run: Run
    total: int
    revertible: int
    conflicts: int
    samples: list[dict[str, Any]] = field(default_factory=list)
    conflict_samples: list[dict[str, Any]] = field(default_factory=list)


def _check_revertible(ledger: Ledger, run_id: str) -> Run:
    original = ledger.get_run(run_id)
    if original.kind not in WRITING_KINDS:
        raise RunStateError(
            f"run {run_id} is a {original.kind} run and changed no rows; only apply and "
            "revert runs can be reverted."
        )
    if original.status in (RunStatus.RUNNING, RunStatus.PAUSED):
        raise RunStateError(
            f"run {run_id} is {original.status}; cancel it first (fillgate cancel {run_id}), "
            "then revert what it applied."
        )
    for previous in ledger.reverts_of(run_id):
        if previous.status == RunStatus.SUCCEEDED:
            raise AlreadyDoneError(f"run {run_id} was already reverted by run {previous.run_id}.")
        if previous.status in (RunStatus.RUNNING, RunStatus.PAUSED, RunStatus.FAILED):
            raise AlreadyDoneError(
                f"run {run_id} is being reverted by run {previous.run_id} (status "
                f"{previous.status}); continue it with: fillgate resume {previous.run_id}"
            )
    return original


def preview_revert(conn: Connected, run_id: str, sample: int = 20) -> RevertPreview:
    """Dry run of a revert: read the current values, write nothing."""
    original = _check_revertible(conn.ledger, run_id)
    sql = TableSQL(conn.engine.dialect, original.table_name or "", original.args["key"])
    total = revertible = conflicts = 0
    samples: list[dict[str, Any]] = []
    conflict_samples: list[dict[str, Any]] = []
    with conn.engine.connect() as reader:
        for change in inverse_changes(conn.ledger, run_id):
            total += 1
            exists, current = current_value(reader, sql, change)
            item = {"key": list(change.key), "column": change.column, "old": change.old, "new": change.new}
            if would_apply(change, exists, current):
                revertible += 1
                if len(samples) < sample:
                    samples.append(item)
            else:
                conflicts += 1
                if len(conflict_samples) < sample:
                    item["found"] = current
                    item["row_exists"] = exists
                    conflict_samples.append(item)
    return RevertPreview(original, total, revertible, conflicts, samples, conflict_samples)


def revert_run(
    conn: Connected, run_id: str, limits: Limits | None = None, monitor: Monitor | None = None
) -> ApplyResult:
    """Apply the inverse of ``run_id`` as a new, audited, resumable run."""
    limits = limits or Limits()
    ledger = conn.ledger
    original = _check_revertible(ledger, run_id)
    check_write_allowed(conn.target, limits.confirm)
    run = new_writing_run(
        conn, RunKind.REVERT, job=original.job, table_name=original.table_name, parent_run_id=run_id,
        total=ledger.count_changes(run_id),
        args={"key": original.args["key"], "source": f"revert:{run_id}", "batch_size": limits.batch_size},
    )
    lock = start_writing_run(conn, run)
    try:
        return execute(conn, run, inverse_changes(ledger, run_id), limits, lock, monitor)
    finally:
        lock.release()
