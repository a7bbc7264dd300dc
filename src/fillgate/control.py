"""Acting on a run that exists: pause, cancel and resume.

A pause or cancel of a live run is a request (``control``) its process reads between batches;
a run whose process is gone is paused or cancelled at once. ``resume`` continues an apply or
revert from its checkpoint, after a pause, a failure, Ctrl-C or a process that died: every
change is applied exactly once. Each reads the run again once it holds the run's lock, and
every status change is a compare-and-set (``Ledger.transition``), so none of them can act on a
run that another process finished or moved meanwhile.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from itertools import islice
from pathlib import Path

from fillgate.applier import ApplyResult, execute, lock_name, with_job_checks
from fillgate.canary import check_verified, run_changes, verify_canary
from fillgate.errors import FillgateError, PlanFileError, RunStateError, UsageError
from fillgate.ledger import ApplyLock, Run, operator_name, utcnow
from fillgate.limits import Limits
from fillgate.monitor import Monitor
from fillgate.plan import file_sha256, read_header
from fillgate.revert import inverse_changes
from fillgate.runs import WRITING_KINDS, RunKind, RunStatus
from fillgate.sql import Change
from fillgate.stamp import Connected, check_write_allowed


def check_resumable(run: Run) -> None:
    """An apply or revert run that can still be continued."""
    if run.kind not in WRITING_KINDS:
        raise RunStateError(
            f"run {run.run_id} is a {run.kind} run; only apply and revert runs can be resumed."
        )
    if run.status == RunStatus.SUCCEEDED:
        raise RunStateError(f"run {run.run_id} already succeeded; there is nothing to resume.")
    if run.status == RunStatus.CANCELLED:
        raise RunStateError(
            f"run {run.run_id} was cancelled; it cannot be resumed. Make a new plan instead."
        )
    if run.args.get("streamed") and not run.plan_sha256:
        raise RunStateError(
            f"run {run.run_id} applied its changes as they were planned (fillgate run --stream) and stopped "
            "before its plan was complete, so it cannot be resumed. Cancel it (fillgate cancel "
            f"{run.run_id}), then run the job again to plan and apply what is still to do, or revert what it "
            f"applied (fillgate revert {run.run_id})."
        )


def _remaining(conn: Connected, run: Run, limits: Limits) -> tuple[Iterable[Change], Limits]:
    """The changes a run has yet to write (after its checkpoint), and its limits with the
    health checks its job declares."""
    if run.kind == RunKind.REVERT:
        return islice(inverse_changes(conn.ledger, run.parent_run_id or ""), run.checkpoint, None), limits
    path = Path(run.plan_path or "")
    if not path.is_file():
        raise PlanFileError(
            f"run {run.run_id} applies plan file {path}, which no longer exists; it is needed to resume the run."
        )
    if file_sha256(path) != run.plan_sha256:
        raise PlanFileError(
            f"plan file {path} changed since run {run.run_id} started applying it; refusing to resume."
        )
    return run_changes(run, run.checkpoint), with_job_checks(limits, read_header(path))


def _verify_unverified_canary(conn: Connected, run: Run) -> None:
    """A canary run whose process stopped between its canary's pause and its verification:
    verify the canary now (CanaryVerificationError, exit 4, if it fails: the run stays paused)."""
    canary = run.args.get("canary")
    if canary and run.checkpoint == canary["changes"] and "verified" not in canary:
        check_verified(run.run_id, verify_canary(conn, run))


def resume_run(
    conn: Connected, run_id: str, limits: Limits | None = None, monitor: Monitor | None = None
) -> ApplyResult:
    """Continue an apply or revert from its checkpoint: after a pause, a failure, or a
    process that died. Every change is applied exactly once."""
    limits = limits or Limits()
    ledger = conn.ledger
    run = ledger.get_run(run_id)
    check_resumable(run)  # refuse early, without taking the lock
    check_write_allowed(conn.target, limits.confirm)
    lock = ApplyLock(conn.engine, lock_name(run.job), run.run_id, operator_name()).acquire()
    try:
        # Read the run again under the lock: its own process may have finished (or moved its
        # checkpoint) between the first read and the lock.
        run = ledger.get_run(run_id)
        check_resumable(run)
        changes, limits = _remaining(conn, run, limits)
        _verify_unverified_canary(conn, run)
        if run.status == RunStatus.RUNNING:  # recorded as running, but its process is gone (we hold its lock)
            ledger.transition(run_id, RunStatus.PAUSED, message="its process was gone")
        ledger.transition(run_id, RunStatus.RUNNING, control=None, message=None, finished_at=None,
                          pid=os.getpid(), host=socket.gethostname(), heartbeat_at=utcnow())
        return execute(conn, ledger.get_run(run_id), changes, limits, lock, monitor)
    finally:
        lock.release()


def control_run(conn: Connected, run_id: str, action: str, lock: str | None = None) -> Run:
    """Ask a run to pause or cancel between batches; a run whose process is gone is
    paused or cancelled at once. A failed run can be cancelled (given up on). ``lock``: the
    lock the run's process holds (default: its job's apply lock; a partition's is its own)."""
    if action not in ("pause", "cancel"):
        raise UsageError(f"unknown run action {action!r}; use pause or cancel.")
    done = RunStatus.PAUSED if action == "pause" else RunStatus.CANCELLED
    stoppable = ((RunStatus.RUNNING, RunStatus.PAUSED, RunStatus.FAILED) if action == "cancel"
                 else (RunStatus.RUNNING, RunStatus.PAUSED))
    ledger = conn.ledger

    def checked(run: Run) -> Run:
        if run.kind not in WRITING_KINDS:
            raise RunStateError(f"run {run_id} is a {run.kind} run; only apply and revert runs can be {done}.")
        if run.status not in stoppable:
            raise RunStateError(
                f"run {run_id} has status {run.status}; only {', '.join(stoppable[:-1])} or {stoppable[-1]} "
                f"runs can be {done}."
            )
        return run

    run = checked(ledger.get_run(run_id))
    probe = ApplyLock(conn.engine, lock or lock_name(run.job), run.run_id, operator_name())
    try:
        probe.acquire()
    except FillgateError:
        ledger.update_run(run_id, control=action)  # the live process stops after its batch
        return ledger.get_run(run_id)
    try:
        # Under the lock no process is writing this run: read it again (it may have finished
        # or been resumed and paused since the first read), then change it.
        run = checked(ledger.get_run(run_id))
        if run.status == RunStatus.RUNNING:  # its process is gone (killed, crashed)
            ledger.transition(run_id, done, control=None, finished_at=utcnow() if done == RunStatus.CANCELLED else None,
                              message=f"{done} while its process was not running")
        elif action == "cancel":  # paused or failed: give up on it (what it applied stays audited)
            ledger.transition(run_id, RunStatus.CANCELLED, control=None, finished_at=utcnow())
    finally:
        probe.release()
    return ledger.get_run(run_id)
