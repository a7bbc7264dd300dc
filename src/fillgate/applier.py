"""Applying: write exactly the reviewed plan, in batches. Each batch is one transaction holding
its compare-and-set writes, their audit rows, its conflicts and errors, the run's counts and
its checkpoint, so a run stopped anywhere (a crash, ``kill -9``, Ctrl-C) resumes exactly once.

``apply_plan`` checks the plan first (its file against the SHA-256 its plan run recorded, every
line against the job's declared table, key and columns, the target, environment and database it
was made for, the change gate and the typed confirmation of a protected target) and writes
nothing if any check fails. ``run_job`` is plan + gate + apply in one go."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from fillgate.canary import canary_order, check_canary, check_verified, verify_canary
from fillgate.collector import fewer_collections
from fillgate.database import write_transaction
from fillgate.errors import (
    AlreadyDoneError,
    BatchTimeoutError,
    CriticalLoadError,
    FillgateError,
    GateExceededError,
    GuardRefused,
    Interrupted,
    JobError,
    PlanFileError,
    PlanMismatchError,
    RunNotFoundError,
)
from fillgate.fingerprints import conflict_fingerprint, error_fingerprint
from fillgate.interrupts import interruptible, stop_requested
from fillgate.job import Job
from fillgate.ledger import ApplyLock, Run, error_row, new_run_id, operator_name, utcnow
from fillgate.limits import Limits
from fillgate.loader import load_job
from fillgate.monitor import Monitor
from fillgate.pacing import Batches, BatchSizer, batch_timeout
from fillgate.plan import PlanHeader, iter_changes, verify_plan
from fillgate.planner import SAMPLE, PlanResult, make_plan
from fillgate.runs import MESSAGE_LIMIT, RunKind, RunStatus
from fillgate.sql import BatchOutcome, Change, TableSQL, apply_changes
from fillgate.stamp import Connected, check_write_allowed
from fillgate.values import dumps, encode_key, in_words
from fillgate.workflow import check_approvals, check_rehearsal, check_reviewed_only


@dataclass
class ApplyResult:
    run: Run
    counts: dict[str, int]
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    stopped: str | None = None  # "paused", "cancelled", "interrupted" or "canary" when stopped between batches
    canary: dict[str, Any] | None = None  # a canary's verification, when it paused after one

    @property
    def clean(self) -> bool:
        return not self.counts.get("conflicts") and not self.counts.get("errors")


# --- writing runs ----------------------------------------------------------------------------


def lock_name(job: str | None) -> str:
    """The lock every apply and revert of one job on one target takes: one at a time."""
    return f"apply:{job}"


def new_writing_run(conn: Connected, kind: RunKind, **fields: Any) -> Run:
    """An apply or revert run on ``conn``'s target, by this operator, starting now."""
    return Run(run_id=new_run_id(), kind=kind, target=conn.target.name, environment=conn.target.environment,
               operator=operator_name(), status=RunStatus.RUNNING, started_at=utcnow(), **fields)


def start_writing_run(conn: Connected, run: Run) -> ApplyLock:
    """Take the (job, target) lock for a new run, then record the run."""
    lock = ApplyLock(conn.engine, lock_name(run.job), run.run_id, run.operator).acquire()
    try:
        conn.ledger.create_run(run)
    except BaseException:
        lock.release()
        raise
    return lock


BatchHook = Callable[[Connection, int, dict[str, int]], "str | None"]
"""Called inside each batch's transaction with the run's checkpoint and counts after the batch
(a partition of a distributed run records its own checkpoint there); may return a pause or
cancel request."""


def execute(
    conn: Connected,
    run: Run,
    changes: Iterable[Change],
    limits: Limits,
    lock: ApplyLock,
    monitor: Monitor | None = None,
    on_batch: BatchHook | None = None,
) -> ApplyResult:
    """Write ``changes`` for ``run`` (which holds ``lock``): one transaction per batch holding
    the data changes, their audit rows, conflicts/errors, the run's counts and its checkpoint
    (and whatever ``on_batch`` writes in that same transaction). A canary run pauses once its
    canary is written, and verifies it (fillgate.canary)."""
    monitor = monitor or Monitor()
    with fewer_collections():
        result = _Applying(conn, run, limits, lock, monitor, on_batch).execute(changes)
    if result.stopped == "canary":
        canary = verify_canary(conn, result.run)
        monitor.events.emit("canary_paused", run_id=run.run_id, done=result.run.checkpoint, total=result.run.total,
                            verified=canary["verified"], problems=canary["problems"] or None)
        check_verified(run.run_id, canary)
        result.run = conn.ledger.get_run(run.run_id)
        result.canary = canary
    return result


class _Applying:
    """One apply or revert run, batch by batch."""

    def __init__(self, conn: Connected, run: Run, limits: Limits, lock: ApplyLock, monitor: Monitor,
                 on_batch: BatchHook | None = None) -> None:
        self.conn, self.run, self.limits, self.lock, self.monitor = conn, run, limits, lock, monitor
        self.on_batch = on_batch
        self.ledger = conn.ledger
        self.sql = TableSQL(conn.engine.dialect, run.table_name or "", run.args["key"])
        self.source = run.args.get("source") or run.job or run.kind
        self.counts = {k: run.counts.get(k, 0) for k in ("applied", "conflicts", "errors")}
        self.checkpoint = run.checkpoint
        self.audit = run.audit  # the run's audit hash chain, as far as the committed batches got
        self.result = ApplyResult(run=run, counts=self.counts)
        self.batch_started = time.perf_counter()
        canary = run.args.get("canary")
        # a canary run pauses once its canary is written (in that batch's transaction)
        self.pause_at: int | None = int(canary["changes"]) if canary and run.checkpoint < canary["changes"] else None
        rate = _planned_rate(conn, run)
        self.sizer = BatchSizer(limits.batch_size, limits.chunk_time, rate)
        self.timeout_s = batch_timeout(limits.chunk_time, limits.batch_timeout_s)
        self.planned_rate = rate

    def _size(self) -> int:
        """The next batch's size: the sizer's, and a canary's last batch ends where the canary does."""
        if self.pause_at is not None and self.checkpoint < self.pause_at:
            return min(self.sizer.size, self.pause_at - self.checkpoint)
        return self.sizer.size

    def execute(self, changes: Iterable[Change]) -> ApplyResult:
        try:
            self.started()
        except BaseException as exc:  # e.g. an events file that cannot be written: the run is failed
            self._failed(exc)
        return self.finished(self.feed(Batches(changes)))

    def started(self) -> None:
        run = self.run
        remaining = None if run.total is None else run.total - self.checkpoint
        self.monitor.run_started(run.run_id, run.kind, run.job or "", run.target, run.environment, remaining,
                                 throttle=self.limits.throttle(), heartbeat=self._heartbeat, rate=self.planned_rate)

    def feed(self, source: Batches[Change]) -> RunStatus | None:
        """Write the changes of ``source`` in batches (sized by the pacing), one transaction
        each; the status the run stopped in (a pause or cancel request, Ctrl-C between
        batches), or None when every change was written. A failure or a Ctrl-C inside a batch
        records the run (failed, paused) and raises."""
        try:
            while True:
                size = self._size()
                batch, written, timed_out = self._next_batch(source)
                if not batch:
                    return None
                self._report(batch, written[0], written[1], size if not timed_out else len(batch), timed_out)
                stopped = self._stop(written[2])
                if stopped is not None:
                    return stopped
        except KeyboardInterrupt:
            self._interrupted()
        except CriticalLoadError as exc:
            self._critical(exc)
        except BaseException as exc:
            self._failed(exc)
        return None

    def finished(self, stopped: RunStatus | None) -> ApplyResult:
        status = stopped or RunStatus.SUCCEEDED
        if stopped is None:
            self.ledger.transition(self.run.run_id, status, finished_at=utcnow(), control=None, message=None)
        self.monitor.run_finished(status, self.counts, audit=self.audit)
        self.result.run = self.ledger.get_run(self.run.run_id)
        return self.result

    def _next_batch(self, source: Batches[Change]) -> tuple[list[Change], _Written, int]:
        """Take the next batch and commit it. A batch that times out is rolled back and retried
        once at a quarter of its size (the rest goes back to the stream, in order); if that
        times out too, the run stops. Returns the batch committed (empty at the end), what
        its transaction returned, and the size of the attempt that timed out (or 0)."""
        batch = source.take(self._size())
        if not batch:
            return batch, (BatchOutcome([], [], []), [], None), 0
        try:
            return batch, self._transaction(batch), 0
        except SQLAlchemyError as exc:
            if not self.sql.backend.is_timeout(exc):
                raise
        retry = self.sizer.timed_out(len(batch))
        source.give_back(batch[retry:])
        first = batch[:retry]
        try:
            return first, self._transaction(first), len(batch)
        except SQLAlchemyError as exc:
            if not self.sql.backend.is_timeout(exc):
                raise
            raise BatchTimeoutError(
                f"a batch of {len(batch)} changes ran longer than the batch timeout of {self.timeout_s:g}s, and "
                f"so did its first {retry} changes on their own; both were rolled back. {self.checkpoint} "
                f"changes are committed. Find what slows the table down (locks, load), then continue with: "
                f"fillgate resume {self.run.run_id} (--batch-timeout S sets the timeout)."
            ) from None

    def _transaction(self, batch: list[Change]) -> _Written:
        """One batch's transaction, timed for the batch sizer; what a rolled-back attempt
        counted is forgotten, so a retry counts it again exactly once."""
        saved = dict(self.counts), self.checkpoint, len(self.result.conflicts)
        started = time.perf_counter()
        try:
            with interruptible(), write_transaction(self.conn.engine, self.timeout_s) as tx:
                written = self._write(tx, batch)
        except BaseException:
            self.counts.update(saved[0])
            self.checkpoint = saved[1]
            del self.result.conflicts[saved[2]:]
            raise
        self.sizer.done(len(batch), time.perf_counter() - started)
        return written

    def _heartbeat(self) -> None:
        """While a health check holds the run: its heartbeat, and why it is held as its message
        (the next batch clears it)."""
        reason = self.monitor.hold_reason
        held = {"message": f"held: {reason}"} if reason else {}
        with self.conn.engine.begin() as tx:
            self.ledger.update_run(self.run.run_id, tx, heartbeat_at=utcnow(), **held)
            self.lock.heartbeat(tx)

    def _write(self, tx: Any, batch: list[Change]) -> tuple[BatchOutcome, list[dict[str, Any]], str | None]:
        """One batch's transaction: the writes, their audit rows, conflicts and errors, the
        run's counts, checkpoint and timeline; returns a pause or cancel request, if any."""
        run, ledger, counts = self.run, self.ledger, self.counts
        outcome = apply_changes(tx, self.sql, batch)
        now = utcnow()
        self.chained = ledger.insert_changes(tx, run.run_id, run.table_name or "", self.source, now, [
            (c.key_text or encode_key(c.key), c.column, c.op, c.old_text or dumps(c.old), c.new_text or dumps(c.new))
            for c in outcome.applied
        ], self.audit)
        problems = self._problems(outcome, now)
        ledger.insert_errors(tx, problems)
        counts["applied"] += len(outcome.applied)
        counts["conflicts"] += len(outcome.conflicts)
        counts["errors"] += len(outcome.errors)
        self.checkpoint += len(batch)
        ledger.update_run(run.run_id, tx, checkpoint=self.checkpoint, counts=counts, heartbeat_at=now,
                          audit=self.chained, message=None)
        ledger.record_batch(tx, run.run_id, done=self.checkpoint, rows=len(batch), writes=len(outcome.applied),
                            conflicts=len(outcome.conflicts), errors=len(outcome.errors),
                            elapsed_ms=(time.perf_counter() - self.batch_started) * 1000, committed_at=now,
                            **self.monitor.take_wait())
        self.lock.heartbeat(tx)
        control = ledger.read_control(run.run_id, tx)
        if self.on_batch is not None:
            control = self.on_batch(tx, self.checkpoint, dict(counts)) or control
        if self.pause_at is not None and self.checkpoint == self.pause_at and control != "cancel":
            ledger.transition(run.run_id, RunStatus.PAUSED, tx, control=None,
                              message=f"canary of {self.checkpoint} of {run.total} changes applied; verifying it")
            return outcome, problems, "canary"
        return outcome, problems, control

    def _problems(self, outcome: BatchOutcome, now: Any) -> list[dict[str, Any]]:
        """The batch's conflicts and errors as fillgate_errors rows (and the conflicts' sample)."""
        run_id, source, sample = self.run.run_id, self.source, self.result.conflicts
        problems = []
        for change, current, exists in outcome.conflicts:
            problems.append(error_row(run_id, "apply", change.key, change.column, "Conflict",
                                      _conflict_message(change, current, exists),
                                      conflict_fingerprint(source, change.column), created_at=now))
            if len(sample) < SAMPLE:
                sample.append({"key": list(change.key), "column": change.column, "expected": change.old,
                               "found": current, "row_exists": exists})
        for change, exc in outcome.errors:
            problems.append(error_row(run_id, "apply", change.key, change.column, type(exc).__name__, str(exc),
                                      error_fingerprint(source, exc), created_at=now))
        return problems

    def _report(self, batch: list[Change], outcome: BatchOutcome, problems: list[dict[str, Any]], size: int,
                timed_out: int) -> None:
        self.audit = self.chained
        examples: dict[str, Any] = {}
        if problems:
            examples["conflicts"] = {k: problems[0][k] for k in ("row_key", "column_name", "error_type", "message")}
        self.monitor.batch_sizing(size, timed_out)
        self.monitor.batch_done(
            {"rows": len(batch), "writes": len(outcome.applied), "conflicts": len(outcome.conflicts),
             "errors": len(outcome.errors)},
            self.checkpoint - self.run.checkpoint, self.conn.engine, examples or None,
        )
        self.batch_started = time.perf_counter()

    def _stop(self, control: str | None) -> RunStatus | None:
        """After a batch: the status to stop in (a pause or cancel request, Ctrl-C), or None
        to go on. An error budget overrun raises."""
        run, ledger = self.run, self.ledger
        if control == "canary":  # the batch's transaction paused the run
            self.result.stopped = "canary"
            return RunStatus.PAUSED
        if control in ("pause", "cancel"):
            status = RunStatus.PAUSED if control == "pause" else RunStatus.CANCELLED
            ledger.transition(run.run_id, status, control=None,
                              finished_at=utcnow() if status is RunStatus.CANCELLED else None)
            self.result.stopped = status
            return status
        self.limits.check_errors(self.counts["errors"], self.checkpoint, f"{run.kind} run {run.run_id}")
        reason = stop_requested()
        if reason is None or (run.total is not None and self.checkpoint >= run.total):
            return None
        done = f"{self.checkpoint} of {run.total}" if run.total is not None else str(self.checkpoint)
        ledger.transition(run.run_id, RunStatus.PAUSED, control=None, message=f"{reason} after {done} changes")
        self.result.stopped = "interrupted"
        return RunStatus.PAUSED

    def _interrupted(self) -> NoReturn:
        """A second Ctrl-C inside a batch: the database rolled that batch back, and every batch
        before it is committed with its checkpoint, so the run is paused, resumable."""
        run, ledger = self.run, self.ledger
        committed = ledger.get_run(run.run_id)
        message = f"interrupted by Ctrl-C during a batch (rolled back) after {committed.checkpoint} changes"
        ledger.transition(run.run_id, RunStatus.PAUSED, control=None, message=message)
        self.monitor.run_finished(RunStatus.PAUSED, committed.counts, message, audit=committed.audit)
        raise Interrupted(f"{run.kind} run {run.run_id} was {message}.", run.run_id) from None

    def _critical(self, exc: CriticalLoadError) -> NoReturn:
        """``--critical-load``: after a committed batch the load was too high; the run pauses
        there (resumable) and writes nothing more."""
        run, ledger = self.run, self.ledger
        done = f"{self.checkpoint} of {run.total}" if run.total is not None else str(self.checkpoint)
        message = f"paused by --critical-load after {done} changes: {exc}"
        ledger.transition(run.run_id, RunStatus.PAUSED, control=None, message=message)
        self.result.stopped = RunStatus.PAUSED
        self.monitor.run_finished(RunStatus.PAUSED, self.counts, message, audit=self.audit)
        raise CriticalLoadError(
            f"{run.kind} run {run.run_id} was {message}. Nothing more was written. Continue once the load is "
            f"down: fillgate resume {run.run_id}"
        ) from None

    def _failed(self, exc: BaseException) -> NoReturn:
        run, ledger = self.run, self.ledger
        if isinstance(exc, GuardRefused):  # a refusal midway says what stays written
            exc = type(exc)(f"{exc} The {self.counts['applied']} changes of the batches committed before stay "
                            f"written and audited; the run is recorded as failed (fillgate show {run.run_id}; "
                            f"undo them with fillgate revert {run.run_id}).")
        message = str(exc) if isinstance(exc, FillgateError) else f"{type(exc).__name__}: {exc}"
        ledger.fail_run(run.run_id, message)
        # the chain of what the database committed (the batch in flight was rolled back)
        self.monitor.run_finished(RunStatus.FAILED, self.counts, message, audit=ledger.get_run(run.run_id).audit)
        raise exc


_Written = tuple[BatchOutcome, list[dict[str, Any]], str | None]
"""What a batch's transaction returns: its outcome, its conflicts and errors, a control request."""


def _planned_rate(conn: Connected, run: Run) -> float | None:
    """Changes per second measured by the trial batch of the run's plan, if it made one."""
    if run.kind != RunKind.APPLY or not run.plan_id:
        return None
    try:
        estimate = conn.ledger.get_run(run.plan_id).details.get("estimate") or {}
    except RunNotFoundError:
        return None
    rate = estimate.get("rate")
    return float(rate) if isinstance(rate, int | float) and rate > 0 else None


def _conflict_message(change: Change, current: Any, exists: bool) -> str:
    if change.op == "insert":
        return f"row {encode_key(change.key)} already exists ({in_words(current)}); not inserted."
    if change.op == "delete":
        if not exists:
            return f"row {encode_key(change.key)} no longer exists; nothing to delete."
        return f"row {encode_key(change.key)} changed since it was inserted (now {in_words(current)}); not deleted."
    found = f"found {in_words(current)}" if exists else "the row no longer exists"
    return f"{change.column} changed since the plan: expected {in_words(change.old)}, {found}; left alone."


# --- checking a plan before anything is written --------------------------------------------
def check_plan_matches(conn: Connected, header: PlanHeader, path: Path) -> None:
    """The plan was made for this target, this environment and this very database."""
    target = conn.target
    if header.target != target.name:
        raise PlanMismatchError(
            f"plan {path} was made for target '{header.target}', not '{target.name}'. "
            f"Apply it to '{header.target}', or make a new plan for '{target.name}'."
        )
    if header.environment != target.environment:
        raise PlanMismatchError(
            f"plan {path} was made for environment '{header.environment}', but target "
            f"'{target.name}' is now '{target.environment}'. Make a new plan."
        )
    if header.database_id != conn.database_id:
        raise PlanMismatchError(
            f"plan {path} was made against another database (fingerprint {header.database_id}); "
            f"target '{target.name}' now reaches database {conn.database_id}. Make a new plan."
        )


def check_plan_unmodified(conn: Connected, header: PlanHeader, path: Path, sha256: str) -> None:
    """The file is byte for byte the one its plan run recorded, and says what that run planned.

    Every plan run records the SHA-256 of its plan (saved or not), so the body checksum in the
    header (which a forger can recompute) is not what protects the header or the lines: an
    edited file pointed at any plan id fails here. The header must also name the job, table,
    key and columns that plan run recorded (``verify_plan`` checked every line against the
    header), so a file can only ever write what a job declared."""
    try:
        planned = conn.ledger.get_run(header.plan_id)
    except RunNotFoundError:
        raise PlanFileError(
            f"plan {path} names plan run {header.plan_id}, which target '{conn.target.name}' has no "
            "record of: the file was modified. Re-create it with fillgate plan."
        ) from None
    if planned.kind != RunKind.PLAN:
        raise PlanFileError(
            f"plan {path} names run {header.plan_id}, which is a {planned.kind} run, not a plan: the file "
            "was modified. Re-create it with fillgate plan."
        )
    if not planned.plan_sha256:
        raise PlanFileError(
            f"plan {path} names plan run {header.plan_id}, which recorded no plan checksum (it was made "
            "by an older fillgate without -o), so this file cannot be checked against it. Re-create "
            "it with fillgate plan -o FILE."
        )
    if planned.plan_sha256 != sha256:
        raise PlanFileError(
            f"plan {path} was modified after planning (its SHA-256 differs from the one recorded "
            f"by plan run {header.plan_id}). Re-create it with fillgate plan."
        )
    recorded_columns = planned.args.get("columns")
    mismatch = [
        what for what, same in (
            ("job", header.job == planned.job),
            ("table", header.table == planned.table_name),
            ("key", list(header.key) == list(planned.args.get("key") or [])),
            ("columns", recorded_columns is None or sorted(header.columns) == sorted(recorded_columns)),
        ) if not same
    ]
    if mismatch:
        raise PlanFileError(
            f"plan {path}: its {', '.join(mismatch)} differ from what plan run {header.plan_id} "
            "recorded: the file was modified. Re-create it with fillgate plan."
        )


def with_job_checks(limits: Limits, header: PlanHeader) -> Limits:
    """Add the health checks the plan's job declares: they hold its apply too."""
    if not header.health_checks:
        return limits
    try:
        job_cls = load_job(header.job_spec)
    except JobError as exc:
        raise JobError(
            f"job {header.job} declares health checks, but its code cannot be loaded again from "
            f"{header.job_spec} to run them during apply: {exc}"
        ) from None
    return limits.with_checks(job_cls.health_checks)


def check_plan_not_applied(conn: Connected, header: PlanHeader) -> None:
    """A plan is applied at most once."""
    for previous in conn.ledger.runs_of_plan(header.plan_id):
        if previous.status == RunStatus.SUCCEEDED:
            raise AlreadyDoneError(
                f"plan {header.plan_id} was already applied by run {previous.run_id}. "
                "Make a new plan to apply further changes."
            )
        if previous.status in (RunStatus.RUNNING, RunStatus.PAUSED, RunStatus.FAILED):
            raise AlreadyDoneError(
                f"plan {header.plan_id} is being applied by run {previous.run_id} "
                f"(status {previous.status}); continue it with: fillgate resume {previous.run_id}"
            )


def apply_plan(
    conn: Connected, path: str | Path, limits: Limits | None = None, monitor: Monitor | None = None,
    written_sha256: str | None = None, *, canary: int | None = None, verify_sql: str | None = None,
) -> ApplyResult:
    """Write exactly the reviewed plan, audited, after every check passes. ``written_sha256``:
    see ``verify_plan`` (``run_job`` passes the hash its own plan writer computed). With
    ``canary``, write that many changes spread over the plan first, then pause and verify them
    (``verify_sql``: a query that must return no rows; see fillgate.canary)."""
    limits = limits or Limits()
    path = Path(path).resolve()
    header, sha256 = verify_plan(path, written_sha256)
    check_plan_matches(conn, header, path)
    check_plan_unmodified(conn, header, path, sha256)
    check_write_allowed(conn.target, limits.confirm)
    gate = limits.change_gate(conn.target)
    limits = with_job_checks(limits, header)
    if gate is not None and header.changes > gate:
        raise GateExceededError(
            f"plan {path.name} has {header.changes} changes, more than --max-changes "
            f"{gate}. Nothing was written. Review the plan; if it is right, "
            f"re-run with --max-changes {header.changes}."
        )
    if canary is not None:
        check_canary(canary, header.changes)
    check_plan_not_applied(conn, header)
    args = _workflow_args(conn, header, sha256, path, limits)
    if canary is not None:
        args["canary"] = {"changes": canary, "verify_sql": verify_sql}
    run = new_writing_run(
        conn, RunKind.APPLY, job=header.job, table_name=header.table, plan_id=header.plan_id, plan_path=str(path),
        plan_sha256=sha256, parent_run_id=header.plan_id, total=header.changes,
        args={"key": header.key, "source": header.job, "batch_size": limits.batch_size, "max_changes": gate,
              **({"chunk_time": limits.chunk_time} if limits.chunk_time else {}), **args},
    )
    lock = start_writing_run(conn, run)
    monitor = monitor or Monitor()
    monitor.events.emit("apply_checked", run_id=run.run_id, approvals=args.get("approvals", []),
                        rehearsal=args.get("rehearsal"), canary=args.get("canary"))
    try:
        changes = canary_order(path, canary, header.changes) if canary is not None else iter_changes(path)
        return execute(conn, run, changes, limits, lock, monitor)
    finally:
        lock.release()


def _workflow_args(conn: Connected, header: PlanHeader, sha256: str, path: Path, limits: Limits) -> dict[str, Any]:
    """The production workflow's guards (approvals, rehearsal; fillgate.workflow), and what
    passed them, for the apply run's arguments."""
    args: dict[str, Any] = {"job_fingerprint": header.job_fingerprint, "params": header.params}
    approvals = check_approvals(conn, header.plan_id, sha256, str(path))
    if conn.target.approvals:
        args["approvals"] = approvals
    rehearsal = check_rehearsal(conn, header.job, header.job_fingerprint, header.params, header.counts,
                                skip=limits.skip_rehearsal, confirm=limits.confirm, spec=header.job_spec or None)
    if rehearsal is not None:
        args["rehearsal"] = rehearsal.to_json()
    return args


def check_run_allowed(conn: Connected, job_cls: type[Job], params: Mapping[str, Any] | None, limits: Limits) -> None:
    """Before ``fillgate run`` plans anything: a target that needs approvals takes reviewed
    plan files only, and one rehearsed elsewhere needs the job's rehearsal."""
    check_reviewed_only(conn, "fillgate run")
    check_rehearsal(conn, job_cls.job_name(), job_cls.code_fingerprint(), job_cls(params).args, None,
                    skip=limits.skip_rehearsal, confirm=limits.confirm, spec=job_cls.spec())


def run_job(
    conn: Connected,
    job_cls: type[Job],
    params: Mapping[str, Any] | None = None,
    *,
    out: str | Path = ".fillgate/plans/",
    limits: Limits | None = None,
    monitor: Monitor | None = None,
    on_planned: Callable[[PlanResult], None] | None = None,
    stream: bool = False,
) -> tuple[PlanResult, ApplyResult]:
    """Plan, gate and apply in one go (``fillgate run``). The plan is saved under ``out`` so
    the apply can be resumed; ``on_planned`` sees it before anything is written.

    A guard that refuses after planning (``--max-changes``, a held lock, ...) writes nothing
    to the user's tables, and its message says what the plan left behind: the plan run and
    the plan file, which can be reviewed and applied later.

    ``stream`` (``fillgate run --stream``): when no change gate applies, apply each page's
    changes as they are planned, batch by batch, while the plan file is written beside them
    (see :func:`stream_job`); with a gate the plan is made first, as without ``stream``."""
    limits = limits or Limits()
    check_write_allowed(conn.target, limits.confirm)
    gate = limits.change_gate(conn.target)  # a protected target without a gate: refused before planning
    check_run_allowed(conn, job_cls, params, limits)
    if stream and gate is None:
        return stream_job(conn, job_cls, params, out=out, limits=limits, monitor=monitor, on_planned=on_planned)
    planned = make_plan(conn, job_cls, params, out=out, limits=limits, monitor=monitor)
    if on_planned is not None:
        on_planned(planned)
    assert planned.path is not None  # out is never None here
    try:
        return planned, apply_plan(conn, planned.path, limits, monitor, planned.file_sha256)
    except GateExceededError:
        changes = planned.header.changes
        confirm = f" --confirm {conn.target.environment}" if conn.target.protected else ""
        raise GateExceededError(
            f"the plan has {changes} changes, more than --max-changes {gate}. Nothing "
            f"was written to your tables. The plan was recorded as plan run {planned.run.run_id} and "
            f"saved to {planned.path}: review it (fillgate show {planned.run.run_id}), and if it is right "
            f"apply it with: fillgate apply {planned.path} --max-changes {changes}{confirm}"
        ) from None
    except GuardRefused as exc:
        raise type(exc)(
            f"{exc} The plan was recorded as plan run {planned.run.run_id} and saved to {planned.path}; "
            "nothing was written to your tables."
        ) from None


# --- fillgate run --stream: apply while planning ----------------------------------------------


class StreamStopped(Exception):
    """The streamed apply stopped between batches (a pause or cancel request, Ctrl-C)."""


class _Stream:
    """The apply side of a streamed run: its run, lock and the changes not yet in a batch."""

    def __init__(self, conn: Connected, limits: Limits, monitor: Monitor) -> None:
        self.conn, self.limits, self.monitor = conn, limits, monitor
        self.applying: _Applying | None = None
        self.lock: ApplyLock | None = None
        self.pending: list[Change] = []

    def start(self, plan_run: Run) -> _Applying:
        if self.applying is None:
            run = new_writing_run(
                self.conn, RunKind.APPLY, job=plan_run.job, table_name=plan_run.table_name, plan_id=plan_run.run_id,
                parent_run_id=plan_run.run_id, total=None,
                args={"key": plan_run.args["key"], "source": plan_run.job, "batch_size": self.limits.batch_size,
                      "max_changes": None, "streamed": True},
            )
            self.lock = start_writing_run(self.conn, run)
            self.applying = _Applying(self.conn, run, self.limits, self.lock, self.monitor)
            self.applying.started()
        return self.applying

    def page(self, plan_run: Run, changes: list[Change]) -> None:
        """One planned page: write every full batch now."""
        applying = self.start(plan_run)
        self.pending.extend(changes)
        size = self.limits.batch_size
        full = len(self.pending) // size * size
        if not full:
            return
        ready = self.pending[:full]
        del self.pending[:full]
        stopped = applying.feed(Batches(ready))
        if stopped is not None:
            applied = applying.counts["applied"]
            raise StreamStopped(
                f"apply run {applying.run.run_id}, which applied this plan's changes as they were planned, "
                f"stopped ({stopped}) after {applied} changes; the plan is incomplete"
            )

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def stream_job(
    conn: Connected, job_cls: type[Job], params: Mapping[str, Any] | None = None, *,
    out: str | Path = ".fillgate/plans/", limits: Limits | None = None, monitor: Monitor | None = None,
    on_planned: Callable[[PlanResult], None] | None = None,
) -> tuple[PlanResult, ApplyResult]:
    """``fillgate run --stream`` without a change gate: each planned page's changes go
    straight into the apply, batch by batch, and the plan file is written beside them, so
    nothing is read back. The apply run records the plan's id, file and SHA-256 once the plan
    is complete. The trade-offs (docs/performance.md): a run stopped before its plan was
    complete (Ctrl-C, a pause, a crash) cannot be resumed, only run again or reverted; the
    plan run's own events and progress are not reported (the apply's are)."""
    limits = limits or Limits()
    stream = _Stream(conn, limits, monitor or Monitor())
    try:
        try:
            planned = make_plan(conn, job_cls, params, out=out, limits=limits, on_page=stream.page)
        except StreamStopped as exc:
            _stream_stopped(conn, stream, str(exc))
        except (KeyboardInterrupt, Interrupted) as exc:
            _stream_stopped(conn, stream, f"stopped while planning: {exc}")
        except BaseException as exc:
            _plan_failed(conn, stream, exc)
            raise
        applying = stream.start(planned.run)
        stopped = applying.feed(Batches(stream.pending))
        if stopped is not None:
            _stream_stopped(conn, stream, f"stopped ({stopped}) after the last page was planned")
        conn.ledger.update_run(applying.run.run_id, total=planned.header.changes, plan_sha256=planned.file_sha256,
                               plan_path=str(planned.path) if planned.path else None)
        result = applying.finished(None)
    finally:
        stream.release()
    if on_planned is not None:
        on_planned(planned)
    return planned, result


def _stream_stopped(conn: Connected, stream: _Stream, why: str) -> NoReturn:
    """A streamed run stopped (Ctrl-C, a pause or cancel request) before its plan was
    complete, so it cannot be resumed: recorded as cancelled (every batch it wrote is audited
    and can be reverted); the plan run was recorded as failed by the planner."""
    applying = stream.applying
    if applying is None:
        raise Interrupted(f"{why}. Nothing was written.")
    run_id = applying.run.run_id
    message = (f"{why}. Its plan is incomplete, so it cannot be resumed: run the job again to plan and apply "
               f"what is still to do, or revert what it applied with: fillgate revert {run_id}")
    _cancel_streamed(conn, applying, message)
    raise Interrupted(f"apply run {run_id}: {message}", run_id)


def _plan_failed(conn: Connected, stream: _Stream, exc: BaseException) -> None:
    """The plan of a streamed run failed (its own error, or the apply's): the apply run, if
    still running, is cancelled; a failed apply stays failed (and cannot be resumed)."""
    if stream.applying is not None:
        reason = str(exc) if isinstance(exc, FillgateError) else f"{type(exc).__name__}: {exc}"
        _cancel_streamed(conn, stream.applying, f"its plan failed ({reason}), so it cannot be resumed; every "
                                                "batch it wrote is audited and can be reverted")


def _cancel_streamed(conn: Connected, applying: _Applying, message: str) -> None:
    run_id = applying.run.run_id
    if conn.ledger.get_run(run_id).status in (RunStatus.RUNNING, RunStatus.PAUSED):
        conn.ledger.transition(run_id, RunStatus.CANCELLED, finished_at=utcnow(), control=None,
                               message=message[:MESSAGE_LIMIT])
        applying.finished(RunStatus.CANCELLED)
