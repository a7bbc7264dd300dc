"""The batch loop: read by key, compute, diff against policies, gate, then
write + audit + checkpoint in one transaction per batch."""

from __future__ import annotations

import hashlib
import os
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from fillgate.context import RunContext, activate
from fillgate.errors import (
    AlreadyDoneError,
    ErrorBudgetExceededError,
    FillgateError,
    GateExceededError,
    JobError,
    PlanFileError,
    PlanMismatchError,
    RunNotFoundError,
    RunStateError,
)
from fillgate.job import Job
from fillgate.ledger import ApplyLock, Run, new_run_id, operator_name, utcnow
from fillgate.plan import PlanHeader, PlanWriter, file_sha256, iter_changes, verify_plan
from fillgate.policy import Decision, Failed
from fillgate.sql import Change, TableSQL, apply_changes, keyset_pages, verify_table_and_key
from fillgate.stamp import Connected, check_write_allowed
from fillgate.values import dumps, encode_key

PLAN_COUNTS = ("rows", "writes", "unchanged", "skipped", "disagreements", "preserved", "errors")
APPLY_COUNTS = ("applied", "conflicts", "errors")
SAMPLE = 20

_DECISION_COUNT = {
    Decision.WRITE: "writes",
    Decision.UNCHANGED: "unchanged",
    Decision.SKIPPED: "skipped",
    Decision.DISAGREEMENT: "disagreements",
    Decision.PRESERVED: "preserved",
}


@dataclass
class Limits:
    """Gates and pacing shared by plan, apply, run, resume and revert."""

    max_changes: int | None = None
    max_errors: int | None = None
    max_error_rate: float | None = None
    batch_size: int = 1000
    pause_ms: int = 0
    confirm: str | None = None

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


def error_fingerprint(job: str, exc: BaseException) -> str:
    """Stable across runs and deploys: the job, the error type and where it was raised."""
    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ else []
    where = f"{os.path.basename(frames[-1].filename)}:{frames[-1].name}" if frames else ""
    raw = f"{job}|{type(exc).__module__}.{type(exc).__qualname__}|{where}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _format_tb(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-8000:]


# --- planning ---------------------------------------------------------------------------


@dataclass
class PlanResult:
    header: PlanHeader
    run: Run
    path: Path | None
    counts: dict[str, int]
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def _compute_page(
    job: Job, rows: list[dict[str, Any]], ctx: RunContext
) -> Sequence[Any]:
    """One proposal (a mapping, None, or the exception it raised) per row, in order."""
    if type(job).has_batch_compute():
        try:
            proposals = list(job.compute_batch(rows, ctx))
        except Exception as exc:
            return [exc] * len(rows)
        if len(proposals) != len(rows):
            exc = JobError(
                f"compute_batch returned {len(proposals)} results for {len(rows)} rows; "
                "it must return one result per row, in order."
            )
            return [exc] * len(rows)
        return proposals
    out: list[Any] = []
    for row in rows:
        try:
            out.append(job.compute(row, ctx))
        except Exception as exc:
            out.append(exc)
    return out


def make_plan(
    conn: Connected,
    job_cls: type[Job],
    params: Mapping[str, Any] | None = None,
    *,
    out: str | Path | None = None,
    limits: Limits | None = None,
    on_page: Callable[[dict[str, int]], None] | None = None,
) -> PlanResult:
    """Dry run: read the source, compute, diff. Writes nothing to the user's tables; records
    the plan as a run and, with ``out``, saves the plan file."""
    limits = limits or Limits()
    job = job_cls(params)
    name = job_cls.job_name()
    policies = job_cls.policies()
    key_cols = job_cls.key_columns()
    verify_table_and_key(conn.engine, job_cls.table, key_cols, list(policies))
    ledger = conn.ledger
    run = ledger.create_run(
        Run(
            run_id=new_run_id(),
            kind="plan",
            job=name,
            table_name=job_cls.table,
            target=conn.target.name,
            environment=conn.target.environment,
            operator=operator_name(),
            status="running",
            args={"params": job.args, "key": list(key_cols), "out": str(out) if out else None},
            started_at=utcnow(),
        )
    )
    run.plan_id = run.run_id
    counts = dict.fromkeys(PLAN_COUNTS, 0)
    samples: dict[str, list[dict[str, Any]]] = {
        "change": [], "disagreement": [], "preserved": [], "error": []
    }
    plan_dir, plan_file = _plan_location(out)
    writer = PlanWriter(plan_dir)
    ctx = RunContext(run_id=run.run_id, target=conn.target, job=name, params=job.args, engine=conn.engine)

    def sample(kind: str, item: dict[str, Any]) -> None:
        if len(samples[kind]) < SAMPLE:
            samples[kind].append(item)

    try:
        with conn.engine.connect() as reader, activate(ctx):
            for rows in keyset_pages(reader, job_cls.select_sql(), key_cols, job_cls.page_size, job.args):
                reader.rollback()  # keep no read transaction open between pages
                proposals = _compute_page(job, rows, ctx)
                if ctx.escape is not None:  # a refusal, not a row error, even if the job caught it
                    raise ctx.escape
                errors: list[dict[str, Any]] = []
                for row, proposal in zip(rows, proposals, strict=True):
                    counts["rows"] += 1
                    key = tuple(row[k] for k in key_cols)
                    if proposal is not None and not isinstance(proposal, BaseException):
                        proposal = _check_proposal(proposal, policies, row)
                    if isinstance(proposal, BaseException):
                        counts["errors"] += 1
                        fp = error_fingerprint(name, proposal)
                        message = str(proposal) or type(proposal).__name__
                        writer.error(key, type(proposal).__name__, message, fp)
                        sample("error", {"key": list(key), "error_type": type(proposal).__name__,
                                         "message": message})
                        errors.append({
                            "run_id": run.run_id, "phase": "plan", "row_key": encode_key(key),
                            "column_name": None, "error_type": type(proposal).__name__,
                            "message": message[:4000], "fingerprint": fp,
                            "traceback": _format_tb(proposal), "created_at": utcnow(),
                        })
                        continue
                    if not proposal:
                        continue
                    for column, new in proposal.items():
                        old = row[column]
                        decision = policies[column].decide(old, new)
                        counts[_DECISION_COUNT[decision]] += 1
                        if decision is Decision.WRITE:
                            writer.change(key, column, old, new)
                            sample("change", {"key": list(key), "column": column, "old": old, "new": new})
                        elif decision is Decision.DISAGREEMENT:
                            writer.disagreement(key, column, old, new)
                            sample("disagreement",
                                   {"key": list(key), "column": column, "old": old, "new": new})
                        elif decision is Decision.PRESERVED:
                            reason = new.reason if isinstance(new, Failed) else f"new value {new!r}"
                            writer.preserved(key, column, old, reason)
                            sample("preserved",
                                   {"key": list(key), "column": column, "old": old, "reason": reason})
                with conn.engine.begin() as tx:
                    ledger.insert_errors(tx, errors)
                    ledger.update_run(run.run_id, tx, counts=counts, heartbeat_at=utcnow())
                if on_page:
                    on_page(counts)
                limits.check_errors(counts["errors"], counts["rows"], f"plan of {name}")
        header = PlanHeader(
            plan_id=run.run_id,
            job=name,
            job_fingerprint=job_cls.code_fingerprint(),
            table=job_cls.table,
            key=list(key_cols),
            columns={c: p.describe() for c, p in policies.items()},
            target=conn.target.name,
            environment=conn.target.environment,
            database_id=conn.database_id,
            dialect=conn.engine.dialect.name,
            created_at=utcnow().isoformat() + "Z",
            operator=run.operator,
            params=job.args,
            counts=counts,
        )
        path = None
        if plan_dir is not None:
            path = writer.finish(header, plan_file or plan_dir / f"{run.run_id}.plan")
        else:
            header.lines, header.changes = writer.lines, writer.changes
            writer.discard()
    except BaseException as exc:
        writer.discard()
        ledger.update_run(run.run_id, status="failed", counts=counts, finished_at=utcnow(),
                          message=str(exc)[:4000])
        raise
    ledger.update_run(
        run.run_id,
        status="planned",
        counts=counts,
        total=header.changes,
        plan_id=run.run_id,
        plan_path=str(path) if path else None,
        plan_sha256=file_sha256(path) if path else None,
        finished_at=utcnow(),
    )
    run = ledger.get_run(run.run_id)
    return PlanResult(header=header, run=run, path=path, counts=counts, samples=samples)


def _plan_location(out: str | Path | None) -> tuple[Path | None, Path | None]:
    """(folder, file) for ``-o``: a folder (existing, or ending in /) gets ``<plan id>.plan``."""
    if out is None:
        return None, None
    if Path(out).is_dir() or str(out).endswith(("/", os.sep)):
        folder = Path(out).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        return folder, None
    file = Path(out).resolve()
    file.parent.mkdir(parents=True, exist_ok=True)
    return file.parent, file


def _check_proposal(proposal: Any, policies: Mapping[str, Any], row: Mapping[str, Any]) -> Any:
    """A proposal must be a mapping of declared columns the source selected."""
    if not isinstance(proposal, Mapping):
        return JobError(f"compute returned {type(proposal).__name__}; expected a dict of column: value.")
    undeclared = [c for c in proposal if c not in policies]
    if undeclared:
        return JobError(
            f"compute proposed column(s) {', '.join(map(str, undeclared))} that the job does not "
            f"declare in columns ({', '.join(policies)})."
        )
    unselected = [c for c in proposal if c not in row]
    if unselected:
        raise JobError(
            f"the job's source does not select column(s) {', '.join(unselected)}, so their stored "
            "values cannot be compared; add them to the source's SELECT."
        )
    return proposal


# --- applying ---------------------------------------------------------------------------


@dataclass
class ApplyResult:
    run: Run
    counts: dict[str, int]
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    stopped: str | None = None  # "paused" or "cancelled" when stopped between batches

    @property
    def clean(self) -> bool:
        return not self.counts.get("conflicts") and not self.counts.get("errors")


def _batches(items: Iterable[Change], size: int) -> Iterator[list[Change]]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


def execute(
    conn: Connected,
    run: Run,
    changes: Iterable[Change],
    limits: Limits,
    lock: ApplyLock,
) -> ApplyResult:
    """Write ``changes`` for ``run``: one transaction per batch holding the data changes,
    their audit rows, conflicts/errors, the run's counts and its checkpoint."""
    ledger = conn.ledger
    engine = conn.engine
    sql = TableSQL(engine.dialect, run.table_name or "", run.args["key"])
    source = run.args.get("source") or run.job or run.kind
    counts = {k: run.counts.get(k, 0) for k in APPLY_COUNTS}
    checkpoint = run.checkpoint
    table = run.table_name
    conflicts_sample: list[dict[str, Any]] = []
    result = ApplyResult(run=run, counts=counts, conflicts=conflicts_sample)
    try:
        for batch in _batches(changes, limits.batch_size):
            with engine.begin() as tx:
                outcome = apply_changes(tx, sql, batch)
                now = utcnow()
                ledger.insert_changes(tx, [
                    (run.run_id, table, encode_key(c.key), c.column, "update",
                     dumps(c.old), dumps(c.new), source, now)
                    for c in outcome.applied
                ])
                problems = []
                for change, current, exists in outcome.conflicts:
                    found = f"found {current!r}" if exists else "the row no longer exists"
                    message = (
                        f"{change.column} changed since the plan: expected {change.old!r}, "
                        f"{found}; left alone."
                    )
                    problems.append({
                        "run_id": run.run_id, "phase": "apply", "row_key": encode_key(change.key),
                        "column_name": change.column, "error_type": "Conflict", "message": message,
                        "fingerprint": hashlib.sha256(f"{source}|conflict|{change.column}".encode())
                        .hexdigest()[:16],
                        "traceback": None, "created_at": now,
                    })
                    if len(conflicts_sample) < SAMPLE:
                        conflicts_sample.append({"key": list(change.key), "column": change.column,
                                                 "expected": change.old, "found": current,
                                                 "row_exists": exists})
                for change, exc in outcome.errors:
                    problems.append({
                        "run_id": run.run_id, "phase": "apply", "row_key": encode_key(change.key),
                        "column_name": change.column, "error_type": type(exc).__name__,
                        "message": str(exc)[:4000], "fingerprint": error_fingerprint(source, exc),
                        "traceback": None, "created_at": now,
                    })
                ledger.insert_errors(tx, problems)
                counts["applied"] += len(outcome.applied)
                counts["conflicts"] += len(outcome.conflicts)
                counts["errors"] += len(outcome.errors)
                checkpoint += len(batch)
                ledger.update_run(run.run_id, tx, checkpoint=checkpoint, counts=counts, heartbeat_at=now)
                lock.heartbeat(tx)
            control = ledger.read_control(run.run_id)
            if control in ("pause", "cancel"):
                status = "paused" if control == "pause" else "cancelled"
                ledger.update_run(run.run_id, status=status, control=None,
                                  finished_at=utcnow() if status == "cancelled" else None)
                result.stopped = status
                result.run = ledger.get_run(run.run_id)
                return result
            limits.check_errors(counts["errors"], checkpoint, f"{run.kind} run {run.run_id}")
            if limits.pause_ms:
                time.sleep(limits.pause_ms / 1000)
    except BaseException as exc:
        message = str(exc) if isinstance(exc, FillgateError) else f"{type(exc).__name__}: {exc}"
        ledger.update_run(run.run_id, status="failed", finished_at=utcnow(), message=message[:4000])
        raise
    ledger.update_run(run.run_id, status="succeeded", finished_at=utcnow(), control=None)
    result.run = ledger.get_run(run.run_id)
    return result


def lock_name(job: str | None) -> str:
    return f"apply:{job}"


def _start_run(conn: Connected, run: Run) -> ApplyLock:
    """Take the (job, target) lock for a new run, then record the run."""
    lock = ApplyLock(conn.engine, lock_name(run.job), run.run_id, run.operator).acquire()
    try:
        conn.ledger.create_run(run)
    except BaseException:
        lock.release()
        raise
    return lock


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


def check_plan_unmodified(conn: Connected, header: PlanHeader, path: Path) -> None:
    """The file is byte for byte the one the plan run recorded: the body checksum in the
    header cannot protect the header itself (its counts feed --max-changes)."""
    try:
        planned = conn.ledger.get_run(header.plan_id)
    except RunNotFoundError:
        raise PlanFileError(
            f"plan {path} names plan run {header.plan_id}, which target '{conn.target.name}' has no "
            "record of: the file was modified. Re-create it with fillgate plan."
        ) from None
    if planned.kind != "plan" or (planned.plan_sha256 and planned.plan_sha256 != file_sha256(path)):
        raise PlanFileError(
            f"plan {path} was modified after planning (its SHA-256 differs from the one recorded "
            f"by plan run {header.plan_id}). Re-create it with fillgate plan."
        )


def apply_plan(conn: Connected, path: str | Path, limits: Limits | None = None) -> ApplyResult:
    """Write exactly the reviewed plan, audited, after every check passes."""
    limits = limits or Limits()
    path = Path(path).resolve()
    header = verify_plan(path)
    check_plan_matches(conn, header, path)
    check_plan_unmodified(conn, header, path)
    check_write_allowed(conn.target, limits.confirm)
    if limits.max_changes is not None and header.changes > limits.max_changes:
        raise GateExceededError(
            f"plan {path.name} has {header.changes} changes, more than --max-changes "
            f"{limits.max_changes}. Nothing was written. Review the plan; if it is right, "
            f"re-run with --max-changes {header.changes}."
        )
    for previous in conn.ledger.runs_of_plan(header.plan_id):
        if previous.status == "succeeded":
            raise AlreadyDoneError(
                f"plan {header.plan_id} was already applied by run {previous.run_id}. "
                "Make a new plan to apply further changes."
            )
        if previous.status in ("running", "paused", "failed"):
            raise AlreadyDoneError(
                f"plan {header.plan_id} is being applied by run {previous.run_id} "
                f"(status {previous.status}); continue it with: fillgate resume {previous.run_id}"
            )
    run = Run(
        run_id=new_run_id(),
        kind="apply",
        job=header.job,
        table_name=header.table,
        target=conn.target.name,
        environment=conn.target.environment,
        operator=operator_name(),
        status="running",
        args={"key": header.key, "source": header.job, "batch_size": limits.batch_size,
              "max_changes": limits.max_changes},
        plan_id=header.plan_id,
        plan_path=str(path),
        plan_sha256=file_sha256(path),
        parent_run_id=header.plan_id,
        total=header.changes,
        started_at=utcnow(),
    )
    lock = _start_run(conn, run)
    try:
        return execute(conn, run, iter_changes(path), limits, lock)
    finally:
        lock.release()


def resume_run(conn: Connected, run_id: str, limits: Limits | None = None) -> ApplyResult:
    """Continue an apply or revert from its checkpoint: after a pause, a failure, or a
    process that died. Every change is applied exactly once."""
    from fillgate.revert import inverse_changes

    limits = limits or Limits()
    ledger = conn.ledger
    run = ledger.get_run(run_id)
    if run.kind not in ("apply", "revert"):
        raise RunStateError(
            f"run {run_id} is a {run.kind} run; only apply and revert runs can be resumed."
        )
    if run.status == "succeeded":
        raise RunStateError(f"run {run_id} already succeeded; there is nothing to resume.")
    if run.status == "cancelled":
        raise RunStateError(
            f"run {run_id} was cancelled; it cannot be resumed. Make a new plan instead."
        )
    check_write_allowed(conn.target, limits.confirm)
    if run.kind == "apply":
        path = Path(run.plan_path or "")
        if not path.is_file():
            raise PlanFileError(
                f"run {run_id} applies plan file {path}, which no longer exists; "
                "it is needed to resume the run."
            )
        if file_sha256(path) != run.plan_sha256:
            raise PlanFileError(
                f"plan file {path} changed since run {run_id} started applying it; refusing to resume."
            )
        changes: Iterable[Change] = iter_changes(path, skip=run.checkpoint)
    else:
        changes = islice(inverse_changes(ledger, run.parent_run_id or ""), run.checkpoint, None)
    lock = ApplyLock(conn.engine, lock_name(run.job), run.run_id, operator_name()).acquire()
    try:
        ledger.update_run(run_id, status="running", control=None, message=None, finished_at=None,
                          pid=os.getpid(), heartbeat_at=utcnow())
        run = ledger.get_run(run_id)
        return execute(conn, run, changes, limits, lock)
    finally:
        lock.release()


def control_run(conn: Connected, run_id: str, action: str) -> Run:
    """Ask a run to pause or cancel between batches; a run whose process is gone is
    paused or cancelled at once."""
    assert action in ("pause", "cancel")
    ledger = conn.ledger
    run = ledger.get_run(run_id)
    if run.kind not in ("apply", "revert"):
        raise RunStateError(f"run {run_id} is a {run.kind} run; only apply and revert runs can be {action}d.")
    if run.status not in ("running", "paused"):
        raise RunStateError(
            f"run {run_id} is {run.status}; only running or paused runs can be {action}d."
        )
    new_status = "paused" if action == "pause" else "cancelled"
    if run.status == "paused":
        if action == "cancel":
            ledger.update_run(run_id, status="cancelled", finished_at=utcnow())
        return ledger.get_run(run_id)
    probe = ApplyLock(conn.engine, lock_name(run.job), run.run_id, operator_name())
    try:
        probe.acquire()
    except FillgateError:
        ledger.update_run(run_id, control=action)  # the live process stops after its batch
        return ledger.get_run(run_id)
    try:
        ledger.update_run(run_id, status=new_status, control=None,
                          finished_at=utcnow() if new_status == "cancelled" else None,
                          message=f"{new_status} while its process was not running")
    finally:
        probe.release()
    return ledger.get_run(run_id)
