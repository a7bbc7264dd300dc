"""One partition of a distributed run, as a worker runs it: plan its key range, or apply its
plan file. Both are plain functions of picklable arguments, so any executor (Dask, or the
calling process itself) can run them, and both are safe to run again.

A Dask cluster re-runs the task of a worker that died, and may re-run a finished task whose
result it lost. Applying a partition is therefore *continuing* it: under the partition's lock
the worker reads the partition's checkpoint (written by every batch in the batch's own
transaction, with its data and audit rows) and applies only what comes after it; a partition
that already finished writes nothing. Every worker connects to the target itself, so the
environment stamp, the protected-target confirmation and the target guard hold in each one.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError

from fillgate.applier import execute, lock_name, new_writing_run, with_job_checks
from fillgate.config import Target
from fillgate.errors import LockHeldError, PlanFileError
from fillgate.job import Job
from fillgate.ledger import ApplyLock, Run, operator_name, utcnow
from fillgate.limits import Limits
from fillgate.loader import load_job
from fillgate.monitor import Monitor
from fillgate.plan import file_sha256, iter_changes, read_header
from fillgate.planner import make_plan
from fillgate.runs import RunKind, RunStatus
from fillgate.sql import KeyRange
from fillgate.stamp import Connected, check_stamp, check_write_allowed, connect

LOCK_WAIT_S = 120.0
"""How long a partition waits for its lock: a re-run of a partition whose first worker is
still finishing (it lost the scheduler, not its database connection) waits for it."""

NOT_STARTED = "pending"


_connected: dict[tuple[str, str, str, bool], Connected] = {}


def _connect(target: Target) -> Connected:
    """The target, connected once per worker process; its stamp is checked again for every
    partition (a re-stamped database stops the next partition)."""
    key = (target.name, target.url.render_as_string(hide_password=False), target.environment, target.protected)
    conn = _connected.get(key)
    if conn is None:
        conn = _connected[key] = connect(target)
        return conn
    conn.meta = conn.ledger.read_meta()
    check_stamp(target, conn.meta)
    return conn


def partition_lock(job: str | None, run_id: str, part: int) -> str:
    """The lock one partition of one distributed run takes while it applies."""
    return f"{lock_name(job)}:{run_id}:{part}"


# --- planning a partition ----------------------------------------------------------------


def plan_partition(
    target: Target, job: str | type[Job], params: dict[str, Any], bounds: dict[str, Any], folder: str,
    plan_run_id: str, part: int, limits: Limits,
) -> dict[str, Any]:
    """Plan the rows of one key range into ``folder`` as a plan run of its own (a child of
    ``plan_run_id``); returns what the manifest records of it. Planning writes nothing to the
    user's tables, so a re-run plans the partition again under a new plan id."""
    conn = _connect(target)
    job_cls = load_job(job) if isinstance(job, str) else job
    key_range = KeyRange.from_json(bounds)
    # the file is named after its own plan run: a re-run of this partition never overwrites it
    result = make_plan(conn, job_cls, params, limits=limits, bounds=key_range, parent_run_id=plan_run_id,
                       out=str(Path(folder)) + os.sep)
    path = result.path
    assert path is not None
    sha = result.run.plan_sha256 or file_sha256(path)
    conn.ledger.update_partition(plan_run_id, part, child_run_id=result.run.run_id, plan_file=str(path),
                                 plan_sha256=sha, status=RunStatus.PLANNED, total=result.header.changes,
                                 counts=result.counts)
    return {"part": part, "plan_id": result.run.run_id, "file": path.name, "sha256": sha,
            "changes": result.header.changes, "counts": result.counts, "samples": result.samples,
            "lo": bounds.get("lo"), "hi": bounds.get("hi")}


# --- applying a partition ----------------------------------------------------------------


def apply_partition(target: Target, run_id: str, part: int, limits: Limits) -> dict[str, Any]:
    """Apply (or continue) partition ``part`` of distributed apply run ``run_id``: exactly
    once, whatever ran it before. Returns the partition's status, counts and checkpoint."""
    conn = _connect(target)
    check_write_allowed(conn.target, limits.confirm)
    ledger = conn.ledger
    parent = ledger.get_run(run_id)
    if ledger.read_control(run_id) in ("pause", "cancel"):  # asked to stop: leave the partition as it is
        return {"part": part, "status": _row(conn, run_id, part)["status"]}
    lock = _wait_for_lock(conn, ApplyLock(conn.engine, partition_lock(parent.job, run_id, part), run_id,
                                          operator_name()))
    try:
        row = _row(conn, run_id, part)  # read again under the lock: a previous try may have moved it
        child = _child_run(conn, parent, row, lock, limits)
        if child.status in (RunStatus.SUCCEEDED, RunStatus.CANCELLED):
            return _finished(conn, run_id, part, child)
        path = _checked_file(row)
        limits = with_job_checks(limits, read_header(path))

        def on_batch(tx: Connection, checkpoint: int, counts: dict[str, int]) -> str | None:
            ledger.update_partition(run_id, part, tx, checkpoint=checkpoint, counts=counts,
                                    status=RunStatus.RUNNING)
            return ledger.read_control(run_id, tx)

        try:
            result = execute(conn, child, iter_changes(path, skip=child.checkpoint), limits, lock, Monitor(),
                             on_batch=on_batch)
        except Exception:
            _finished(conn, run_id, part, ledger.get_run(child.run_id))  # failed: the partition says so
            raise
        out = _finished(conn, run_id, part, result.run)
        out["conflicts"] = result.conflicts
        return out
    finally:
        lock.release()


def _row(conn: Connected, run_id: str, part: int) -> dict[str, Any]:
    found = [p for p in conn.ledger.partitions(run_id) if p["part"] == part]
    if not found:
        raise PlanFileError(f"distributed run {run_id} has no partition {part}.")
    return found[0]


def _wait_for_lock(conn: Connected, lock: ApplyLock) -> ApplyLock:
    """Take the partition's lock, waiting while another worker (an earlier try of this very
    partition) still holds it."""
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            return lock.acquire()
        except (LockHeldError, OperationalError):  # held, or the database said "try again" (a deadlock)
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _checked_file(row: dict[str, Any]) -> Path:
    """The partition's plan file, byte for byte the one its apply run was started with."""
    path = Path(row["plan_file"] or "")
    if not path.is_file():
        raise PlanFileError(f"partition {row['part']} applies plan file {path}, which no longer exists.")
    if file_sha256(path) != row["plan_sha256"]:
        raise PlanFileError(f"plan file {path} changed since its distributed run started applying it; "
                            "refusing to apply it.")
    return path


def _child_run(conn: Connected, parent: Run, row: dict[str, Any], lock: ApplyLock, limits: Limits) -> Run:
    """The partition's own apply run: recorded now (in one transaction with the partition's
    row), or the one an earlier try started, moved back to running under this process."""
    ledger = conn.ledger
    if row["child_run_id"] is None:
        header = read_header(_checked_file(row))
        run = new_writing_run(
            conn, RunKind.APPLY, job=parent.job, table_name=parent.table_name, plan_id=header.plan_id,
            plan_path=row["plan_file"], plan_sha256=row["plan_sha256"], parent_run_id=parent.run_id,
            total=row["total"], args={**parent.args, "partition": row["part"], "batch_size": limits.batch_size},
        )
        run.args.pop("distributed", None)
        with conn.engine.begin() as tx:
            ledger.create_run(run, tx)
            ledger.update_partition(parent.run_id, row["part"], tx, child_run_id=run.run_id,
                                    status=RunStatus.RUNNING)
        return ledger.get_run(run.run_id)
    run = ledger.get_run(row["child_run_id"])
    if run.status in (RunStatus.SUCCEEDED, RunStatus.CANCELLED):
        return run
    if run.status == RunStatus.RUNNING:  # an earlier try's process is gone: we hold the lock now
        ledger.transition(run.run_id, RunStatus.PAUSED, message="its worker was gone")
    ledger.transition(run.run_id, RunStatus.RUNNING, control=None, message=None, finished_at=None,
                      pid=os.getpid(), host=socket.gethostname(), heartbeat_at=utcnow())
    return ledger.get_run(run.run_id)


def _finished(conn: Connected, run_id: str, part: int, child: Run) -> dict[str, Any]:
    """Record the partition's outcome (its run's status, counts, checkpoint) and return it."""
    conn.ledger.update_partition(run_id, part, status=child.status, checkpoint=child.checkpoint,
                                 counts=child.counts)
    return {"part": part, "status": child.status, "run_id": child.run_id, "counts": child.counts,
            "checkpoint": child.checkpoint, "message": child.message}
