"""The batch loop: read by key, compute, diff against policies, gate, then
write + audit + checkpoint in one transaction per batch."""

from __future__ import annotations

import hashlib
import os
import socket
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection

from fillgate.alerts import fingerprint as alert_fingerprint
from fillgate.backends import ColumnType, Unstorable, ValueChecker, backend_for, same_value
from fillgate.context import RunContext, activate
from fillgate.errors import (
    AlreadyDoneError,
    ColumnTypeError,
    ErrorBudgetExceededError,
    FillgateError,
    GateExceededError,
    GuardRefused,
    Interrupted,
    JobError,
    PlanFileError,
    PlanMismatchError,
    RunNotFoundError,
    RunStateError,
    UsageError,
)
from fillgate.interrupts import interruptible, stop_requested
from fillgate.job import Job, load_job
from fillgate.ledger import ApplyLock, Run, error_row, new_run_id, operator_name, utcnow
from fillgate.lookup import Lookup
from fillgate.monitor import Monitor
from fillgate.plan import LINE_KINDS, PlanHeader, PlanWriter, file_sha256, iter_changes, read_header, verify_plan
from fillgate.policy import Decision, Failed
from fillgate.sql import (
    Change,
    TableSQL,
    apply_changes,
    estimate_rows,
    existing_rows,
    keyset_pages,
    verify_table_and_key,
)
from fillgate.stamp import Connected, check_write_allowed
from fillgate.throttle import HealthCheck, Throttle
from fillgate.values import dumps, encode_key

PLAN_COUNTS = (
    "rows", "writes", "inserts", "unchanged", "skipped", "disagreements", "preserved", "errors",
    "unexpected_index",
)
APPLY_COUNTS = ("applied", "conflicts", "errors")
SAMPLE = 20

# Plan line kinds that are anomalies, and the count (alert kind) each one feeds.
_ANOMALY_OF_KIND = {"unexpected_index": "unexpected_index", "error": "errors", "disagreement": "disagreements"}

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
    batch_size: int = 5000
    pause_ms: int = 0
    confirm: str | None = None
    rate: float | None = None  # rows per second
    checks: Sequence[HealthCheck] = ()
    max_hold_s: float | None = None

    def throttle(self, extra_checks: Sequence[HealthCheck] = ()) -> Throttle:
        """The pacing these limits ask for (``--rate``, the pause, health checks)."""
        return Throttle(rate=self.rate, pause_ms=self.pause_ms, checks=[*self.checks, *extra_checks],
                        max_hold_s=self.max_hold_s)

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


def _compute_page(job: Job, rows: list[dict[str, Any]], keys: list[tuple[Any, ...]], ctx: RunContext,
                  results: list[Any] | None, monitor: Monitor) -> list[Any]:
    """One proposal (a mapping, None, or the exception it raised) per row, in order; each
    row's compute time goes to the monitor.

    With a lookup, ``ctx.result`` is the row's aligned lookup result during ``compute`` and
    ``ctx.results`` the list aligned with ``rows`` during ``compute_batch``.
    """
    clock = time.perf_counter
    if type(job).has_batch_compute():
        ctx.results = results
        started = clock()
        try:
            proposals = list(job.compute_batch(rows, ctx))
        except Exception as exc:
            return [exc] * len(rows)
        finally:
            ctx.results = None
        per_row = (clock() - started) * 1000 / max(len(rows), 1)
        for key in keys:
            monitor.row_timing(key, per_row)
        if len(proposals) != len(rows):
            exc = JobError(
                f"compute_batch returned {len(proposals)} results for {len(rows)} rows; "
                "it must return one result per row, in order."
            )
            return [exc] * len(rows)
        return proposals
    out: list[Any] = []
    compute = job.compute
    timing = monitor.row_timing
    for i, row in enumerate(rows):
        ctx.result = results[i] if results is not None else None
        started = clock()
        try:
            out.append(compute(row, ctx))
        except Exception as exc:
            out.append(exc)
        timing(keys[i], (clock() - started) * 1000)
    ctx.result = None
    return out


class _Planner:
    """The state of one plan: counts, samples, the plan writer and the page's ledger rows."""

    def __init__(self, run: Run, job_cls: type[Job], writer: PlanWriter, monitor: Monitor,
                 checker: ValueChecker) -> None:
        self.run = run
        self.checker = checker  # the storage form of every proposed value, per column
        self.name = job_cls.job_name()
        self.policies = job_cls.policies()
        self.key_cols = job_cls.key_columns()
        self.source_key = job_cls.paging_key()
        self.table = job_cls.table
        self.mode = job_cls.writes
        self.ensured: set[str] = set()  # keys of rows an insert/upsert plan already covers
        self.nullable = {c: t.nullable for c, t in checker.types.items()}
        self.writer = writer
        self.monitor = monitor
        self.counts = dict.fromkeys(PLAN_COUNTS, 0)
        self.samples: dict[str, list[dict[str, Any]]] = {kind: [] for kind in LINE_KINDS}
        self.page_errors: list[dict[str, Any]] = []
        self.page_counts: dict[str, int] = {}
        self.page_examples: dict[str, Any] = {}  # the page's first example of each anomaly, for its alert

    def _sample(self, kind: str, item: dict[str, Any]) -> None:
        if len(self.samples[kind]) < SAMPLE:
            self.samples[kind].append(item)
        anomaly = _ANOMALY_OF_KIND.get(kind)
        if anomaly is not None:
            self.page_examples.setdefault(anomaly, item)

    def _count(self, name: str, n: int = 1) -> None:
        """Count into the page; ``end_page`` adds the page to the run's counts."""
        self.page_counts[name] = self.page_counts.get(name, 0) + n

    def end_page(self) -> None:
        for name, n in self.page_counts.items():
            if name in self.counts and name != "rows":
                self.counts[name] += n

    def _ledger_error(self, key: tuple[Any, ...], phase: str, error_type: str, message: str,
                      fp: str, tb: str | None, column: str | None = None) -> None:
        self.page_errors.append(error_row(self.run.run_id, phase, key, column, error_type, message, fp, tb))

    def row_error(self, key: tuple[Any, ...], exc: BaseException, phase: str = "plan",
                  column: str | None = None) -> None:
        self._count("errors")
        fp = error_fingerprint(self.name, exc)
        message = _printable(str(exc) or type(exc).__name__)
        self.writer.error(key, type(exc).__name__, message, fp)
        self._sample("error", {"key": list(key), "error_type": type(exc).__name__, "message": message})
        self._ledger_error(key, phase, type(exc).__name__, message, fp, _printable(_format_tb(exc)), column)

    def unexpected(self, key: tuple[Any, ...], description: str, example: dict[str, Any] | None) -> None:
        """A lookup result that is missing, extra, duplicated or out of place: never written."""
        self._count("unexpected_index")
        self.writer.unexpected(key, description)
        item = {"key": list(key), "message": description, **(example or {})}
        self._sample("unexpected_index", item)
        self.monitor.mismatch(item)
        self._ledger_error(key, "lookup", "UnexpectedIndex", description,
                           alert_fingerprint(self.name, "unexpected_index"), None)

    def page(
        self, job: Job, rows: list[dict[str, Any]], ctx: RunContext, lookup: Lookup | None, reader: Connection
    ) -> None:
        """Compute and diff one page of source rows."""
        self.page_errors, self.page_counts, self.page_examples = [], {"rows": len(rows)}, {}
        self.counts["rows"] += len(rows)
        keys = self._keys(rows)
        results: list[Any] | None = None
        if lookup is not None:
            batch = lookup.resolve(rows)
            mismatch = batch.first_mismatch
            clean: list[dict[str, Any]] = []
            results = []
            for i, (row, outcome) in enumerate(zip(rows, batch.outcomes, strict=True)):
                if outcome.unexpected:
                    example = None
                    if mismatch is not None and mismatch.get("row") == i:
                        example = {"expected": mismatch.get("expected"), "got": mismatch.get("got")}
                    self.unexpected(keys[i], outcome.unexpected, example)
                elif outcome.error is not None:
                    self.row_error(keys[i], outcome.error, "lookup")
                else:
                    clean.append(row)
                    results.append(outcome.value)
                    self.monitor.row_timing(keys[i], outcome.elapsed_ms)
            if batch.extra_results:
                self.page_counts["extra_results"] = batch.extra_results
            rows = clean
            keys = self._keys(rows)
        proposals = _compute_page(job, rows, keys, ctx, results, self.monitor)
        if ctx.escape is not None:  # a refusal, not a row error, even if the job caught it
            raise ctx.escape
        checked: list[tuple[Mapping[str, Any], tuple[Any, ...], Mapping[str, Any]]] = []
        for row, key, proposal in zip(rows, keys, proposals, strict=True):
            if proposal is None:
                continue
            if isinstance(proposal, BaseException):
                self.row_error(key, proposal)
            elif self.mode == "update":
                proposal = _check_proposal(proposal, self.policies, row, key)
                if proposal:
                    checked.append((row, key, proposal))
            else:
                for values in _check_rows(proposal, self.policies, self.key_cols, key):
                    if isinstance(values, JobError):
                        self.row_error(key, values)
                    else:
                        checked.append((row, key, values))
        if not checked:
            return
        forms = self._storage_forms([proposal for _, _, proposal in checked])
        if self.mode == "update":
            for (row, key, _), stored in zip(checked, forms, strict=True):
                if type(stored) is list:
                    self._unstorable(key, stored)
                else:
                    self._diff(row, key, stored)
            return
        wanted: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        for (_, key, _), stored in zip(checked, forms, strict=True):
            if type(stored) is list:
                self._unstorable(key, stored)
            else:
                wanted.append((key, stored))
        if wanted:
            self._ensure(wanted, reader)

    def _storage_forms(self, proposals: list[Mapping[str, Any]]) -> list[Any]:
        """Each proposal with every value replaced by its storage form (what the column will
        hold and return on a read), or the list of (column, reason) for the values its
        columns cannot hold exactly. None and Failed values are left as they are."""
        out: list[Any] = list(proposals)
        for column in self.checker.types:
            present = [(i, v) for i, p in enumerate(proposals) if (v := p.get(column)) is not None]
            if not present:
                continue
            values = [v for _, v in present]
            if any(isinstance(v, Failed) for v in values):
                present = [(i, v) for i, v in present if not isinstance(v, Failed)]
                values = [v for _, v in present]
            forms = self.checker.storage_forms(column, values)
            if forms is values:  # every value is its own storage form
                continue
            for (i, value), form in zip(present, forms, strict=True):
                if form is value:
                    continue
                current = out[i]
                if type(form) is Unstorable:
                    if type(current) is list:
                        current.append((column, form.reason))
                    else:
                        out[i] = [(column, form.reason)]
                elif type(current) is not list:
                    if current is proposals[i]:  # copied before the first change: the job may reuse its dicts
                        current = out[i] = dict(current)
                    current[column] = form
        return out

    def _unstorable(self, key: tuple[Any, ...], problems: list[tuple[str, str]]) -> None:
        """A row proposing a value its column cannot hold exactly: nothing of the row is planned."""
        message = " ".join(reason for _, reason in problems) + " Nothing is planned for this row."
        column = problems[0][0] if len(problems) == 1 else None
        self.row_error(key, ColumnTypeError(message), column=column)

    def _keys(self, rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        if len(self.source_key) == 1:
            (column,) = self.source_key
            return [(row[column],) for row in rows]
        return [tuple(row[k] for k in self.source_key) for row in rows]

    def _ensure(self, wanted: list[tuple[tuple[Any, ...], dict[str, Any]]], reader: Connection) -> None:
        """Insert (or upsert) jobs: plan an insert for every wanted row that does not exist."""
        row_keys = [tuple(values[k] for k in self.key_cols) for _, values in wanted]
        existing = existing_rows(reader, self.table, self.key_cols, list(self.policies), row_keys)
        reader.rollback()
        for (source_key, values), key in zip(wanted, row_keys, strict=True):
            current = existing.get(key)
            if current is None:
                not_null = [c for c, v in values.items() if v is None and not self.nullable.get(c, True)]
                if not_null:
                    self._unstorable(source_key, [(c, f"column {c!r} is NOT NULL, and the proposed row sets it to "
                                                      "None.") for c in not_null])
                    continue
            encoded = encode_key(key)
            if encoded in self.ensured:
                self._count("unchanged")  # another source row already asked for this row
                continue
            self.ensured.add(encoded)
            if current is None:
                self._count("writes")
                self._count("inserts")
                self.writer.insert(key, values)
                self._sample("insert", {"key": list(key), "values": values, "source": list(source_key)})
            elif self.mode == "upsert":
                self._diff(current, key, {c: v for c, v in values.items() if c not in self.key_cols})
            else:
                same = all(same_value(current.get(c), v) for c, v in values.items() if c in current)
                self._count("unchanged" if same else "skipped")

    def _diff(self, row: Mapping[str, Any], key: tuple[Any, ...], proposal: Mapping[str, Any]) -> None:
        counts = self.page_counts
        for column, new in proposal.items():
            old = row[column]
            decision = self.policies[column].decide(old, new)
            name = _DECISION_COUNT[decision]
            counts[name] = counts.get(name, 0) + 1
            if decision is Decision.WRITE:  # the hot path: no sample dict once the samples are full
                self.writer.change(key, column, old, new)
                if len(self.samples["change"]) < SAMPLE:
                    self._sample("change", {"key": list(key), "column": column, "old": old, "new": new})
            elif decision is Decision.DISAGREEMENT:
                self.writer.disagreement(key, column, old, new)
                self._sample("disagreement", {"key": list(key), "column": column, "old": old, "new": new})
            elif decision is Decision.PRESERVED:
                reason = _printable(new.reason) if isinstance(new, Failed) else f"new value {new!r}"
                self.writer.preserved(key, column, old, reason)
                self._sample("preserved", {"key": list(key), "column": column, "old": old, "reason": reason})

    def examples(self) -> dict[str, Any]:
        """The current page's first example of each anomaly kind, for its alert."""
        return self.page_examples


def make_plan(
    conn: Connected,
    job_cls: type[Job],
    params: Mapping[str, Any] | None = None,
    *,
    out: str | Path | None = None,
    limits: Limits | None = None,
    monitor: Monitor | None = None,
    pipeline_run_id: str | None = None,
) -> PlanResult:
    """Dry run: read the source, compute, diff. Writes nothing to the user's tables; records
    the plan as a run and, with ``out``, saves the plan file. Within a pipeline, the plan run
    is a child of ``pipeline_run_id`` and job code sees the pipeline's run id as ``ctx.run_id``."""
    limits = limits or Limits()
    monitor = monitor or Monitor()
    monitor.throttle = limits.throttle(job_cls.health_checks)
    job = job_cls(params)
    name = job_cls.job_name()
    key_cols = job_cls.key_columns()
    verify_table_and_key(conn.engine, job_cls.table, key_cols, list(job_cls.policies()))
    types = _written_column_types(conn, job_cls)
    _check_source_selects_key(conn, job_cls, job.args)
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
            args={"params": job.args, "key": list(key_cols), "columns": sorted(job_cls.policies()),
                  "out": str(out) if out else None},
            parent_run_id=pipeline_run_id,
            started_at=utcnow(),
        )
    )
    plan_dir, plan_file = _plan_location(out)
    checker = backend_for(conn.engine).checker(conn.engine, job_cls.table, types)
    planner = _Planner(run, job_cls, PlanWriter(plan_dir), monitor, checker)
    counts = planner.counts
    ctx = RunContext(run_id=pipeline_run_id or run.run_id, target=conn.target, job=name, params=job.args,
                     engine=conn.engine, stage_run_id=run.run_id)
    monitor.run_started(run.run_id, "plan", name, conn.target.name, conn.target.environment,
                        estimate_rows(conn.engine, job_cls.table))
    lookup: Lookup | None = None
    saved = time.monotonic()
    last_saved = dict(counts)
    monitor.heartbeat = lambda: ledger.update_run(run.run_id, heartbeat_at=utcnow())

    def save_progress(tx: Connection) -> None:  # the run's counts and its timeline since the last save
        nonlocal saved, last_saved
        ledger.update_run(run.run_id, tx, counts=counts, heartbeat_at=utcnow())
        wait = monitor.take_wait()
        ledger.record_batch(tx, run.run_id, done=counts["rows"], rows=counts["rows"] - last_saved["rows"],
                            writes=counts["writes"] - last_saved["writes"],
                            errors=counts["errors"] - last_saved["errors"],
                            elapsed_ms=max((time.monotonic() - saved) * 1000 - wait["paced_ms"] - wait["held_ms"], 0),
                            **wait)
        saved, last_saved = time.monotonic(), dict(counts)

    try:
        with conn.engine.connect() as reader, activate(ctx):
            lookup = job.build_lookup(ctx)
            pages = keyset_pages(reader, job_cls.select_sql(), job_cls.paging_key(), job_cls.page_size, job.args)
            for rows in pages:
                reader.rollback()  # keep no read transaction open between pages
                with interruptible():
                    planner.page(job, rows, ctx, lookup, reader)
                planner.end_page()
                # errors are stored with their page; progress at most once a second
                if planner.page_errors or time.monotonic() - saved >= 1.0:
                    with conn.engine.begin() as tx:
                        ledger.insert_errors(tx, planner.page_errors)
                        save_progress(tx)
                monitor.batch_done(planner.page_counts, counts["rows"], conn.engine, planner.examples())
                limits.check_errors(counts["errors"], counts["rows"], f"plan of {name}")
                reason = stop_requested()
                if reason is not None:
                    raise Interrupted(f"plan {run.run_id} of {name} stopped: {reason} after "
                                      f"{counts['rows']} rows; nothing was saved. Plan again.", run.run_id)
            if counts["rows"] > last_saved["rows"]:
                with conn.engine.begin() as tx:
                    save_progress(tx)
        header = PlanHeader(
            plan_id=run.run_id,
            job=name,
            job_fingerprint=job_cls.code_fingerprint(),
            job_spec=job_cls.spec(),
            health_checks=len(job_cls.health_checks),
            table=job_cls.table,
            key=list(key_cols),
            columns={c: p.describe() for c, p in planner.policies.items()},
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
            path = planner.writer.finish(header, plan_file or plan_dir / f"{run.run_id}.plan")
        else:
            planner.writer.seal(header)
    except BaseException as exc:
        planner.writer.discard()
        if isinstance(exc, KeyboardInterrupt):
            exc = Interrupted(f"plan {run.run_id} of {name} stopped: interrupted by Ctrl-C after "
                              f"{counts['rows']} rows; nothing was saved. Plan again.", run.run_id)
        message = str(exc) if isinstance(exc, FillgateError) else f"{type(exc).__name__}: {exc}"
        ledger.update_run(run.run_id, status="failed", counts=counts, finished_at=utcnow(),
                          message=message[:4000], details=monitor.details())
        monitor.run_finished("failed", counts, message)
        if isinstance(exc, Interrupted):
            raise exc from None
        raise
    finally:
        monitor.heartbeat = None
        try:
            checker.close()
        finally:
            if lookup is not None:
                lookup.close()
    ledger.update_run(
        run.run_id,
        status="planned",
        counts=counts,
        total=header.changes,
        plan_id=run.run_id,
        plan_path=str(path) if path else None,
        plan_sha256=planner.writer.file_sha256,
        finished_at=utcnow(),
        details=monitor.details(),
    )
    monitor.run_finished("planned", counts)
    run = ledger.get_run(run.run_id)
    return PlanResult(header=header, run=run, path=path, counts=counts, samples=planner.samples)


def _written_column_types(conn: Connected, job_cls: type[Job]) -> dict[str, ColumnType]:
    """The types of the columns the job may write (and, for inserts, of its key), by the
    job's spelling of their names; a column fillgate cannot write at all stops the plan."""
    backend = backend_for(conn.engine)
    with conn.engine.connect() as reader:
        reflected = backend.column_types(reader, job_cls.table)
    by_lower = {name.lower(): ctype for name, ctype in reflected.items()}
    written = [*job_cls.policies(), *(job_cls.key_columns() if job_cls.writes != "update" else ())]
    types: dict[str, ColumnType] = {}
    for column in written:
        ctype = reflected.get(column) or by_lower[column.lower()]  # verify_table_and_key checked they exist
        problem = backend.unsupported(ctype)
        if problem is not None:
            raise JobError(f"job {job_cls.job_name()} writes {problem}")
        types[column] = ctype
    return types


def _check_source_selects_key(conn: Connected, job_cls: type[Job], params: Mapping[str, Any]) -> None:
    """The source selects the column(s) it is paged by (asked with LIMIT 0, before any run)."""
    body = job_cls.select_sql().strip().rstrip(";")
    probe = text(f"SELECT * FROM ({body}) fillgate_src LIMIT 0")
    wanted = set(probe._bindparams)  # the names the source binds
    if not wanted <= set(params):
        return  # keyset_pages names the unbound parameters
    with conn.engine.connect() as reader:
        selected = set(reader.execute(probe, {k: params[k] for k in wanted}).keys())
    absent = [k for k in job_cls.paging_key() if k not in selected]
    if absent:
        raise JobError(
            f"the job's source does not select the key column(s) {', '.join(absent)} it is paged by; "
            f"add {', '.join(absent)} to the source's SELECT."
        )


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


def _check_rows(
    proposal: Any, policies: Mapping[str, Any], key_cols: Sequence[str], key: tuple[Any, ...]
) -> list[Any]:
    """An insert/upsert proposal: a row (dict) or rows holding the key and declared columns.
    A proposal of the wrong shape, or setting a column the job does not declare, is a bug of
    the job and stops the plan (JobError); a row whose key value is None is a row error
    (returned as a JobError in its place)."""
    rows = [proposal] if isinstance(proposal, Mapping) else proposal
    if not isinstance(rows, list | tuple) or not all(isinstance(r, Mapping) for r in rows):
        raise JobError(
            f"compute returned a {type(proposal).__name__} for row {encode_key(key)}; an insert or upsert job's "
            "compute must return a row (dict of column: value), a list of rows, or None. Fix the job and plan again."
        )
    out: list[Any] = []
    for row in rows:
        undeclared = [c for c in row if c not in policies and c not in key_cols]
        if undeclared:
            raise JobError(
                f"compute proposed a row (for source row {encode_key(key)}) setting column(s) "
                f"{', '.join(map(repr, undeclared))}, which the job does not declare in key "
                f"({', '.join(key_cols)}) or columns ({', '.join(policies)}). Declare them, or stop proposing "
                "them, and plan again."
            )
        absent = [k for k in key_cols if k not in row]
        if absent:
            raise JobError(
                f"compute proposed a row without the key column(s) {', '.join(absent)}: every row an insert or "
                f"upsert job proposes must hold its key ({', '.join(key_cols)}). Fix the job and plan again."
            )
        missing = [k for k in key_cols if row[k] is None]
        if missing:
            out.append(JobError(f"a proposed row's key column(s) {', '.join(missing)} are None: {dict(row)!r}."))
        else:
            out.append(dict(row))
    return out


def _check_proposal(
    proposal: Any, policies: Mapping[str, Any], row: Mapping[str, Any], key: tuple[Any, ...]
) -> Mapping[str, Any]:
    """A proposal must be a mapping of declared columns the source selected; anything else is
    a bug of the job, and stops the plan (JobError)."""
    if type(proposal) is dict and proposal.keys() <= policies.keys() and proposal.keys() <= row.keys():
        return proposal  # the common case, checked with two set operations
    if not isinstance(proposal, Mapping):
        raise JobError(
            f"compute returned a {type(proposal).__name__} for row {encode_key(key)}; it must return a dict of "
            "column: value (or None to leave the row alone). Fix the job and plan again."
        )
    undeclared = [c for c in proposal if c not in policies]
    if undeclared:
        raise JobError(
            f"compute proposed column(s) {', '.join(map(repr, undeclared))} for row {encode_key(key)} that the job "
            f"does not declare in columns ({', '.join(policies)}). Declare them with a policy, or stop proposing them, "
            "and plan again."
        )
    unselected = [c for c in proposal if c not in row]
    if unselected:
        raise JobError(
            f"the job's source does not select column(s) {', '.join(unselected)}, so their stored "
            "values cannot be compared; add them to the source's SELECT."
        )
    return proposal


def _printable(message: str) -> str:
    """Text that the plan file (UTF-8) and every database can hold: a lone surrogate is
    written as its escape sequence."""
    if message.isascii():
        return message
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


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
    monitor: Monitor | None = None,
) -> ApplyResult:
    """Write ``changes`` for ``run``: one transaction per batch holding the data changes,
    their audit rows, conflicts/errors, the run's counts and its checkpoint."""
    monitor = monitor or Monitor()
    monitor.throttle = limits.throttle()
    ledger = conn.ledger
    engine = conn.engine

    def heartbeat() -> None:
        with engine.begin() as tx:
            ledger.update_run(run.run_id, tx, heartbeat_at=utcnow())
            lock.heartbeat(tx)

    monitor.heartbeat = heartbeat
    sql = TableSQL(engine.dialect, run.table_name or "", run.args["key"])
    source = run.args.get("source") or run.job or run.kind
    counts = {k: run.counts.get(k, 0) for k in APPLY_COUNTS}
    checkpoint = run.checkpoint
    audit = run.audit  # the run's audit hash chain, as far as the committed batches got
    table = run.table_name
    conflicts_sample: list[dict[str, Any]] = []
    result = ApplyResult(run=run, counts=counts, conflicts=conflicts_sample)
    remaining = None if run.total is None else run.total - checkpoint
    monitor.run_started(run.run_id, run.kind, run.job or "", run.target, run.environment, remaining)
    status = "succeeded"
    batch_started = time.perf_counter()
    try:
        for batch in _batches(changes, limits.batch_size):
            with interruptible(), engine.begin() as tx:
                outcome = apply_changes(tx, sql, batch)
                now = utcnow()
                chained = ledger.insert_changes(tx, run.run_id, table or "", source, now, [
                    (c.key_text or encode_key(c.key), c.column, c.op,
                     c.old_text or dumps(c.old), c.new_text or dumps(c.new))
                    for c in outcome.applied
                ], audit)
                problems = []
                for change, current, exists in outcome.conflicts:
                    message = _conflict_message(change, current, exists)
                    fingerprint = hashlib.sha256(f"{source}|conflict|{change.column}".encode()).hexdigest()[:16]
                    problems.append(error_row(run.run_id, "apply", change.key, change.column, "Conflict", message,
                                              fingerprint, created_at=now))
                    if len(conflicts_sample) < SAMPLE:
                        conflicts_sample.append({"key": list(change.key), "column": change.column,
                                                 "expected": change.old, "found": current,
                                                 "row_exists": exists})
                for change, exc in outcome.errors:
                    problems.append(error_row(run.run_id, "apply", change.key, change.column, type(exc).__name__,
                                              str(exc), error_fingerprint(source, exc), created_at=now))
                ledger.insert_errors(tx, problems)
                counts["applied"] += len(outcome.applied)
                counts["conflicts"] += len(outcome.conflicts)
                counts["errors"] += len(outcome.errors)
                checkpoint += len(batch)
                ledger.update_run(run.run_id, tx, checkpoint=checkpoint, counts=counts, heartbeat_at=now,
                                  audit=chained)
                ledger.record_batch(tx, run.run_id, done=checkpoint, rows=len(batch), writes=len(outcome.applied),
                                    conflicts=len(outcome.conflicts), errors=len(outcome.errors),
                                    elapsed_ms=(time.perf_counter() - batch_started) * 1000, committed_at=now,
                                    **monitor.take_wait())
                lock.heartbeat(tx)
                control = ledger.read_control(run.run_id, tx)
            audit = chained
            examples: dict[str, Any] = {}
            if problems:
                examples["conflicts"] = {k: problems[0][k] for k in ("row_key", "column_name", "error_type", "message")}
            monitor.batch_done(
                {"rows": len(batch), "writes": len(outcome.applied), "conflicts": len(outcome.conflicts),
                 "errors": len(outcome.errors)},
                checkpoint - run.checkpoint, engine, examples or None,
            )
            batch_started = time.perf_counter()
            if control in ("pause", "cancel"):
                status = "paused" if control == "pause" else "cancelled"
                ledger.update_run(run.run_id, status=status, control=None,
                                  finished_at=utcnow() if status == "cancelled" else None)
                result.stopped = status
                break
            limits.check_errors(counts["errors"], checkpoint, f"{run.kind} run {run.run_id}")
            reason = stop_requested()
            if reason is not None and checkpoint < (run.total if run.total is not None else checkpoint + 1):
                status = "paused"
                done = f"{checkpoint} of {run.total}" if run.total is not None else str(checkpoint)
                ledger.update_run(run.run_id, status=status, control=None, message=f"{reason} after {done} changes")
                result.stopped = "interrupted"
                break
    except KeyboardInterrupt:
        # a second Ctrl-C, inside a batch: the database rolled that batch back, and every
        # batch before it is committed with its checkpoint, so the run is resumable
        committed = ledger.get_run(run.run_id)  # what the database kept (the batch in flight is gone)
        message = f"interrupted by Ctrl-C during a batch (rolled back) after {committed.checkpoint} changes"
        ledger.update_run(run.run_id, status="paused", control=None, message=message)
        monitor.run_finished("paused", committed.counts, message, audit=committed.audit)
        raise Interrupted(f"{run.kind} run {run.run_id} was {message}.", run.run_id) from None
    except BaseException as exc:
        message = str(exc) if isinstance(exc, FillgateError) else f"{type(exc).__name__}: {exc}"
        ledger.update_run(run.run_id, status="failed", finished_at=utcnow(), message=message[:4000])
        # the chain of what the database committed (the batch in flight was rolled back)
        monitor.run_finished("failed", counts, message, audit=ledger.get_run(run.run_id).audit)
        raise
    finally:
        monitor.heartbeat = None
    if status == "succeeded":
        ledger.update_run(run.run_id, status="succeeded", finished_at=utcnow(), control=None, message=None)
    monitor.run_finished(status, counts, audit=audit)
    result.run = ledger.get_run(run.run_id)
    return result


def _conflict_message(change: Change, current: Any, exists: bool) -> str:
    if change.op == "insert":
        return f"row {encode_key(change.key)} already exists ({current!r}); not inserted."
    if change.op == "delete":
        if not exists:
            return f"row {encode_key(change.key)} no longer exists; nothing to delete."
        return f"row {encode_key(change.key)} changed since it was inserted (now {current!r}); not deleted."
    found = f"found {current!r}" if exists else "the row no longer exists"
    return f"{change.column} changed since the plan: expected {change.old!r}, {found}; left alone."


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
    if planned.kind != "plan":
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


def _with_job_checks(limits: Limits, header: PlanHeader) -> Limits:
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
    return replace(limits, checks=[*limits.checks, *job_cls.health_checks])


def apply_plan(
    conn: Connected, path: str | Path, limits: Limits | None = None, monitor: Monitor | None = None
) -> ApplyResult:
    """Write exactly the reviewed plan, audited, after every check passes."""
    limits = limits or Limits()
    path = Path(path).resolve()
    header, sha256 = verify_plan(path)
    check_plan_matches(conn, header, path)
    check_plan_unmodified(conn, header, path, sha256)
    check_write_allowed(conn.target, limits.confirm)
    limits = _with_job_checks(limits, header)
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
        plan_sha256=sha256,
        parent_run_id=header.plan_id,
        total=header.changes,
        started_at=utcnow(),
    )
    lock = _start_run(conn, run)
    try:
        return execute(conn, run, iter_changes(path), limits, lock, monitor)
    finally:
        lock.release()


def run_job(
    conn: Connected,
    job_cls: type[Job],
    params: Mapping[str, Any] | None = None,
    *,
    out: str | Path = ".fillgate/plans/",
    limits: Limits | None = None,
    monitor: Monitor | None = None,
    on_planned: Callable[[PlanResult], None] | None = None,
) -> tuple[PlanResult, ApplyResult]:
    """Plan, gate and apply in one go (``fillgate run``). The plan is saved under ``out`` so
    the apply can be resumed; ``on_planned`` sees it before anything is written.

    A guard that refuses after planning (``--max-changes``, a held lock, ...) writes nothing
    to the user's tables, and its message says what the plan left behind: the plan run and
    the plan file, which can be reviewed and applied later."""
    limits = limits or Limits()
    check_write_allowed(conn.target, limits.confirm)
    planned = make_plan(conn, job_cls, params, out=out, limits=limits, monitor=monitor)
    if on_planned is not None:
        on_planned(planned)
    assert planned.path is not None  # out is never None here
    try:
        return planned, apply_plan(conn, planned.path, limits, monitor)
    except GateExceededError:
        changes = planned.header.changes
        confirm = f" --confirm {conn.target.environment}" if conn.target.protected else ""
        raise GateExceededError(
            f"the plan has {changes} changes, more than --max-changes {limits.max_changes}. Nothing "
            f"was written to your tables. The plan was recorded as plan run {planned.run.run_id} and "
            f"saved to {planned.path}: review it (fillgate show {planned.run.run_id}), and if it is right "
            f"apply it with: fillgate apply {planned.path} --max-changes {changes}{confirm}"
        ) from None
    except GuardRefused as exc:
        raise type(exc)(
            f"{exc} The plan was recorded as plan run {planned.run.run_id} and saved to {planned.path}; "
            "nothing was written to your tables."
        ) from None


def _check_resumable(run: Run) -> None:
    if run.kind not in ("apply", "revert"):
        raise RunStateError(
            f"run {run.run_id} is a {run.kind} run; only apply and revert runs can be resumed."
        )
    if run.status == "succeeded":
        raise RunStateError(f"run {run.run_id} already succeeded; there is nothing to resume.")
    if run.status == "cancelled":
        raise RunStateError(
            f"run {run.run_id} was cancelled; it cannot be resumed. Make a new plan instead."
        )


def resume_run(
    conn: Connected, run_id: str, limits: Limits | None = None, monitor: Monitor | None = None
) -> ApplyResult:
    """Continue an apply or revert from its checkpoint: after a pause, a failure, or a
    process that died. Every change is applied exactly once."""
    from fillgate.revert import inverse_changes

    limits = limits or Limits()
    ledger = conn.ledger
    run = ledger.get_run(run_id)
    _check_resumable(run)  # refuse early, without taking the lock
    check_write_allowed(conn.target, limits.confirm)
    lock = ApplyLock(conn.engine, lock_name(run.job), run.run_id, operator_name()).acquire()
    try:
        # Read the run again under the lock: its own process may have finished (or moved its
        # checkpoint) between the first read and the lock.
        run = ledger.get_run(run_id)
        _check_resumable(run)
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
            limits = _with_job_checks(limits, read_header(path))  # the file was just checked whole
        else:
            changes = islice(inverse_changes(ledger, run.parent_run_id or ""), run.checkpoint, None)
        ledger.update_run(run_id, status="running", control=None, message=None, finished_at=None,
                          pid=os.getpid(), host=socket.gethostname(), heartbeat_at=utcnow())
        run = ledger.get_run(run_id)
        return execute(conn, run, changes, limits, lock, monitor)
    finally:
        lock.release()


def control_run(conn: Connected, run_id: str, action: str) -> Run:
    """Ask a run to pause or cancel between batches; a run whose process is gone is
    paused or cancelled at once. A failed run can be cancelled (given up on)."""
    if action not in ("pause", "cancel"):
        raise UsageError(f"unknown run action {action!r}; use pause or cancel.")
    done = {"pause": "paused", "cancel": "cancelled"}[action]
    stoppable = ("running", "paused", "failed") if action == "cancel" else ("running", "paused")
    ledger = conn.ledger

    def checked(run: Run) -> Run:
        if run.kind not in ("apply", "revert"):
            raise RunStateError(f"run {run_id} is a {run.kind} run; only apply and revert runs can be {done}.")
        if run.status not in stoppable:
            raise RunStateError(
                f"run {run_id} has status {run.status}; only {', '.join(stoppable[:-1])} or {stoppable[-1]} "
                f"runs can be {done}."
            )
        return run

    run = checked(ledger.get_run(run_id))
    probe = ApplyLock(conn.engine, lock_name(run.job), run.run_id, operator_name())
    try:
        probe.acquire()
    except FillgateError:
        ledger.update_run(run_id, control=action)  # the live process stops after its batch
        return ledger.get_run(run_id)
    try:
        # Under the lock no process is writing this run: read it again (it may have finished
        # or been resumed and paused since the first read), then change it.
        run = checked(ledger.get_run(run_id))
        if run.status == "running":  # its process is gone (killed, crashed)
            ledger.update_run(run_id, status=done, control=None,
                              finished_at=utcnow() if done == "cancelled" else None,
                              message=f"{done} while its process was not running")
        elif action == "cancel":  # paused or failed: give up on it (what it applied stays audited)
            ledger.update_run(run_id, status="cancelled", control=None, finished_at=utcnow())
    finally:
        probe.release()
    return ledger.get_run(run_id)
