"""Planning: read the source page by page (keyset), compute, check every proposed value against
its column, decide per policy, and write the plan file. Nothing is written to the user's
tables; the plan is recorded as a run, with the SHA-256 of its plan (saved or not)."""

from __future__ import annotations

import operator
import os
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any, NoReturn

from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from fillgate.backends import ColumnType, Unstorable, ValueChecker, backend_for, same_value
from fillgate.backends.base import database_reason
from fillgate.collector import fewer_collections
from fillgate.context import RunContext, activate
from fillgate.counts import ANOMALY_OF_LINE, PLAN_COUNTS
from fillgate.errors import ColumnTypeError, FillgateError, GuardRefused, Interrupted, JobError, UsageError
from fillgate.estimate import TRIAL_SIZE, Estimate, trial_estimate
from fillgate.fingerprints import anomaly_fingerprint, error_fingerprint
from fillgate.interrupts import interruptible, stop_requested
from fillgate.job import Job
from fillgate.ledger import Run, error_row, new_run_id, operator_name, utcnow
from fillgate.limits import Limits
from fillgate.lookup import Lookup
from fillgate.monitor import Monitor
from fillgate.plan import LINE_KINDS, PlanHeader, PlanWriter
from fillgate.policy import Decision, Failed
from fillgate.redact import mask_params
from fillgate.runs import RunKind, RunStatus
from fillgate.sql import (
    Change,
    KeyRange,
    bounded_source,
    estimate_rows,
    existing_rows,
    keyset_pages,
    verify_table_and_key,
)
from fillgate.stamp import Connected
from fillgate.values import encode_key

SAMPLE = 20  # findings of each kind kept for the plan's summary

_DECISION_COUNT = {
    Decision.WRITE: "writes",
    Decision.UNCHANGED: "unchanged",
    Decision.SKIPPED: "skipped",
    Decision.DISAGREEMENT: "disagreements",
    Decision.PRESERVED: "preserved",
}


TRACEBACK_FRAMES = 40  # the innermost frames a row error keeps (a RecursionError has a thousand)


def format_traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-TRACEBACK_FRAMES))[-8000:]


@dataclass
class PlanResult:
    header: PlanHeader
    run: Run
    path: Path | None
    counts: dict[str, int]
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    estimate: Estimate | None = None  # the apply's estimated duration (plan with estimate=True)
    # the SHA-256 of the plan file as this process wrote it (computed while writing, never read
    # back from the ledger or the file): ``run`` applies the file without checking its lines
    # again when it still hashes to this
    file_sha256: str | None = None


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
            wrong = JobError(
                f"compute_batch returned {len(proposals)} results for {len(rows)} rows; "
                "it must return one result per row, in order."
            )
            return [wrong] * len(rows)
        return proposals
    out: list[Any] = []
    append = out.append
    compute = job.compute
    ends: list[float] = []  # one clock reading per row: its compute ends where the next one starts
    mark = ends.append
    started = clock()
    if results is None:
        ctx.result = None
        for row in rows:
            try:
                append(compute(row, ctx))
            except Exception as exc:
                append(exc)
            mark(clock())
    else:
        for row, result in zip(rows, results, strict=True):
            ctx.result = result
            try:
                append(compute(row, ctx))
            except Exception as exc:
                append(exc)
            mark(clock())
        ctx.result = None
    timing = monitor.row_timing
    for key, end in zip(keys, ends, strict=True):
        timing(key, (end - started) * 1000)
        started = end
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
        anomaly = ANOMALY_OF_LINE.get(kind)
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
        self._ledger_error(key, phase, type(exc).__name__, message, fp, _printable(format_traceback(exc)), column)

    def unexpected(self, key: tuple[Any, ...], description: str, example: dict[str, Any] | None) -> None:
        """A lookup result that is missing, extra, duplicated or out of place: never written."""
        self._count("unexpected_index")
        self.writer.unexpected(key, description)
        item = {"key": list(key), "message": description, **(example or {})}
        self._sample("unexpected_index", item)
        self.monitor.mismatch(item)
        self._ledger_error(key, "lookup", "UnexpectedIndex", description,
                           anomaly_fingerprint(self.name, "unexpected_index"), None)

    def page(
        self, job: Job, rows: list[dict[str, Any]], ctx: RunContext, lookup: Lookup | None, reader: Connection
    ) -> None:
        """Compute and diff one page of source rows."""
        self.page_errors, self.page_counts, self.page_examples = [], {"rows": len(rows)}, {}
        self.counts["rows"] += len(rows)
        results: list[Any] | None = None
        if lookup is not None:
            rows, results = self._looked_up(rows, lookup)
        keys = self._keys(rows)
        proposals = _compute_page(job, rows, keys, ctx, results, self.monitor)
        if ctx.escape is not None:  # a refusal, not a row error, even if the job caught it
            raise ctx.escape
        if self.mode == "update":
            self._update_page(rows, keys, proposals)
            return
        checked: list[tuple[Mapping[str, Any], tuple[Any, ...], Mapping[str, Any]]] = []
        for row, key, proposal in zip(rows, keys, proposals, strict=True):
            if proposal is None:
                continue
            if isinstance(proposal, BaseException):
                self.row_error(key, proposal)
            else:
                for values in _check_rows(proposal, self.policies, self.key_cols, key):
                    if isinstance(values, JobError):
                        self.row_error(key, values)
                    else:
                        checked.append((row, key, values))
        if not checked:
            return
        forms = self._storage_forms([proposal for _, _, proposal in checked])
        wanted: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        for (_, key, _), stored in zip(checked, forms, strict=True):
            if type(stored) is list:
                self._unstorable(key, stored)
            else:
                wanted.append((key, stored))
        if wanted:
            self._ensure(wanted, reader)

    def _update_page(self, rows: list[dict[str, Any]], keys: list[tuple[Any, ...]], proposals: list[Any]) -> None:
        """An update job's page: check each proposal, then its storage forms, then diff."""
        policies = self.policies
        declared = policies.keys()
        sources: list[Mapping[str, Any]] = []
        checked_keys: list[tuple[Any, ...]] = []
        checked: list[Mapping[str, Any]] = []
        for row, key, proposal in zip(rows, keys, proposals, strict=True):
            if proposal is None:
                continue
            # the common case, checked with two set operations (_check_proposal: the rest)
            if not (type(proposal) is dict and proposal.keys() <= declared and proposal.keys() <= row.keys()):
                if isinstance(proposal, BaseException):
                    self.row_error(key, proposal)
                    continue
                proposal = _check_proposal(proposal, policies, row, key)
            if proposal:
                sources.append(row)
                checked_keys.append(key)
                checked.append(proposal)
        if checked:
            self._diff_page(sources, checked_keys, self._storage_forms(checked))

    def _diff_page(self, rows: list[Mapping[str, Any]], keys: list[tuple[Any, ...]], forms: list[Any]) -> None:
        """Decide every proposed value against the stored one; write the plan's lines."""
        decide = {column: policy.decide for column, policy in self.policies.items()}
        tally = dict.fromkeys(_DECISION_COUNT, 0)
        write, samples = self.writer.change, self.samples["change"]
        for row, key, stored in zip(rows, keys, forms, strict=True):
            if type(stored) is list:
                self._unstorable(key, stored)
                continue
            for column, new in stored.items():
                old = row[column]
                decision = decide[column](old, new)
                tally[decision] += 1
                if decision is Decision.WRITE:  # the hot path: no sample dict once the samples are full
                    write(key, column, old, new)
                    if len(samples) < SAMPLE:
                        self._sample("change", {"key": list(key), "column": column, "old": old, "new": new})
                elif decision is not Decision.UNCHANGED and decision is not Decision.SKIPPED:
                    self._anomaly(decision, key, column, old, new)
        counts = self.page_counts
        for decision, n in tally.items():
            if n:
                name = _DECISION_COUNT[decision]
                counts[name] = counts.get(name, 0) + n

    def _anomaly(self, decision: Decision, key: tuple[Any, ...], column: str, old: Any, new: Any) -> None:
        """A disagreement or a preserved value: a line of the plan and a sample."""
        if decision is Decision.DISAGREEMENT:
            self.writer.disagreement(key, column, old, new)
            self._sample("disagreement", {"key": list(key), "column": column, "old": old, "new": new})
        elif decision is Decision.PRESERVED:
            reason = _printable(new.reason) if isinstance(new, Failed) else f"new value {new!r}"
            self.writer.preserved(key, column, old, reason)
            self._sample("preserved", {"key": list(key), "column": column, "old": old, "reason": reason})

    def _looked_up(self, rows: list[dict[str, Any]], lookup: Lookup) -> tuple[list[dict[str, Any]], list[Any]]:
        """The page's rows whose lookup result can be trusted, with those results (aligned);
        every other row is an unexpected index or a row error, and is not computed."""
        keys = self._keys(rows)
        batch = lookup.resolve(rows)
        mismatch = batch.first_mismatch
        clean: list[dict[str, Any]] = []
        results: list[Any] = []
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
        return clean, results

    def _storage_forms(self, proposals: list[Mapping[str, Any]]) -> list[Any]:
        """Each proposal with every value replaced by its storage form (what the column will
        hold and return on a read), or the list of (column, reason) for the values its
        columns cannot hold exactly. None and Failed values are left as they are."""
        out: list[Any] = list(proposals)
        for column in self.checker.types:
            values = [p.get(column) for p in proposals]
            positions: Sequence[int] = range(len(values))  # the common case: every proposal sets the column
            if any(map(operator.is_, values, repeat(None))) or any(map(isinstance, values, repeat(Failed))):
                positions = [i for i, v in enumerate(values) if v is not None and not isinstance(v, Failed)]
                values = [values[i] for i in positions]
            if not values:
                continue
            forms = self.checker.storage_forms(column, values)
            if forms is values:  # every value is its own storage form
                continue
            for i, value, form in zip(positions, values, forms, strict=True):
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
        self._diff_page([row], [key], [proposal])

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
    estimate: bool = False,
    bounds: KeyRange | None = None,
    parent_run_id: str | None = None,
    on_page: Callable[[Run, list[Change]], None] | None = None,
) -> PlanResult:
    """Dry run: read the source, compute, diff. Writes nothing to the user's tables; records
    the plan as a run and, with ``out``, saves the plan file (a folder gets ``<plan id>.plan``).
    Within a pipeline, the plan run is a child of ``pipeline_run_id`` and job code sees the
    pipeline's run id as ``ctx.run_id``. With ``estimate``, a trial batch of the plan's first
    updates is timed and rolled back (``fillgate.estimate``) to estimate the apply's duration.
    ``bounds``: plan only the source rows in that key range (one partition of a distributed
    plan, whose plan run is ``parent_run_id``). ``on_page`` (``fillgate run --stream``) is
    handed the changes of every page as it is planned, with no read transaction open."""
    job = job_cls(params)
    types = check_job(conn, job_cls, job.args)
    _check_output(out)
    run = conn.ledger.create_run(Run(
        run_id=new_run_id(), kind=RunKind.PLAN, job=job_cls.job_name(), table_name=job_cls.table,
        target=conn.target.name, environment=conn.target.environment, operator=operator_name(),
        status=RunStatus.RUNNING, parent_run_id=parent_run_id or pipeline_run_id, started_at=utcnow(),
        args={"params": mask_params(job.args), "key": list(job_cls.key_columns()),
              "columns": sorted(job_cls.policies()), "out": str(out) if out else None,
              "job_fingerprint": job_cls.code_fingerprint(), **({"partition": bounds.to_json()} if bounds else {})},
    ))
    planning = _Planning(conn, run, job, types, limits or Limits(), monitor or Monitor(), pipeline_run_id)
    planning.trial = estimate
    planning.bounds = bounds or KeyRange()
    planning.on_page = on_page
    with fewer_collections():
        return planning.plan(out)


def check_job(conn: Connected, job_cls: type[Job], args: Mapping[str, Any]) -> dict[str, ColumnType]:
    """Before anything is recorded: the table, its key and the written columns exist (and
    fillgate can write them), and the source selects the key it is paged by. Returns the
    written columns' types."""
    verify_table_and_key(conn.engine, job_cls.table, job_cls.key_columns(), list(job_cls.policies()))
    types = _written_column_types(conn, job_cls)
    _check_source_selects_key(conn, job_cls, args)
    return types


class _Planning:
    """One plan run from start to finish: reading pages, saving progress, the plan file."""

    def __init__(self, conn: Connected, run: Run, job: Job, types: Mapping[str, ColumnType], limits: Limits,
                 monitor: Monitor, pipeline_run_id: str | None) -> None:
        job_cls = type(job)
        self.conn, self.run, self.job, self.limits, self.monitor = conn, run, job, limits, monitor
        self.name = job_cls.job_name()
        self.checker = backend_for(conn.engine).checker(conn.engine, job_cls.table, types)
        self.ctx = RunContext(run_id=pipeline_run_id or run.run_id, target=conn.target, job=self.name,
                              params=job.args, engine=conn.engine, stage_run_id=run.run_id)
        self.saved = time.monotonic()
        self.last_saved: dict[str, int] = {}
        self.trial = False
        self.estimate: Estimate | None = None
        self.bounds = KeyRange()  # the key range planned (a partition), or every row
        self.on_page: Callable[[Run, list[Change]], None] | None = None

    def plan(self, out: str | Path | None) -> PlanResult:
        conn, run, job_cls = self.conn, self.run, type(self.job)
        plan_dir, plan_file = _plan_location(out)
        self.planner = planner = _Planner(run, job_cls, PlanWriter(plan_dir), self.monitor, self.checker)
        if self.on_page is not None:
            planner.writer.collect()
        self.last_saved = dict(planner.counts)
        try:
            self.monitor.run_started(
                run.run_id, RunKind.PLAN, self.name, conn.target.name, conn.target.environment,
                estimate_rows(conn.engine, job_cls.table),
                throttle=self.limits.with_checks(job_cls.health_checks).throttle(),
                heartbeat=lambda: conn.ledger.update_run(run.run_id, heartbeat_at=utcnow()),
            )
        except BaseException as exc:  # the events cannot be written: the run is recorded as failed
            self._fail(exc)
        lookup: Lookup | None = None
        try:
            with conn.engine.connect() as reader, activate(self.ctx):
                lookup = self.job.build_lookup(self.ctx)
                self._read_pages(reader, lookup)
            if self.trial:
                self.estimate = self._estimate()
            header = self._header()
            if plan_dir is not None:
                path: Path | None = planner.writer.finish(header, plan_file or plan_dir / f"{run.run_id}.plan")
            else:
                path = None
                planner.writer.seal(header)
        except BaseException as exc:
            self._fail(exc)
        finally:
            try:
                self.checker.close()
            finally:
                if lookup is not None:
                    lookup.close()
        return self._finish(header, path)

    def _read_pages(self, reader: Connection, lookup: Lookup | None) -> None:
        job_cls, planner, counts, monitor = type(self.job), self.planner, self.planner.counts, self.monitor
        source, params = bounded_source(reader.dialect, job_cls.select_sql(), job_cls.paging_key(), self.bounds,
                                        self.job.args)
        pages = keyset_pages(reader, source, job_cls.paging_key(), job_cls.page_size, params)
        for rows in pages:
            reader.rollback()  # keep no read transaction open between pages
            with interruptible():
                planner.page(self.job, rows, self.ctx, lookup, reader)
            planner.end_page()
            # errors are stored with their page; progress at most once a second
            if planner.page_errors or time.monotonic() - self.saved >= 1.0:
                with self.conn.engine.begin() as tx:
                    self.conn.ledger.insert_errors(tx, planner.page_errors)
                    self._save_progress(tx)
            monitor.batch_done(planner.page_counts, counts["rows"], self.conn.engine, planner.examples())
            self.limits.check_errors(counts["errors"], counts["rows"], f"plan of {self.name}")
            if self.on_page is not None:
                reader.rollback()
                self.on_page(self.run, planner.writer.take())
            reason = stop_requested()
            if reason is not None:
                raise Interrupted(f"plan {self.run.run_id} of {self.name} stopped: {reason} after "
                                  f"{counts['rows']} rows; nothing was saved. Plan again.", self.run.run_id)
        if counts["rows"] > self.last_saved["rows"]:
            with self.conn.engine.begin() as tx:
                self._save_progress(tx)

    def _estimate(self) -> Estimate:
        """The apply's duration, from a timed trial batch that is rolled back."""
        job_cls, writer = type(self.job), self.planner.writer
        sample = writer.first_updates(min(TRIAL_SIZE, self.limits.batch_size))
        return trial_estimate(self.conn, self.run.run_id, job_cls.table, job_cls.key_columns(), sample,
                              writer.changes, self.limits.rate)

    def _save_progress(self, tx: Connection) -> None:
        """The run's counts, and its timeline since the last save."""
        counts, last, ledger = self.planner.counts, self.last_saved, self.conn.ledger
        ledger.update_run(self.run.run_id, tx, counts=counts, heartbeat_at=utcnow())
        wait = self.monitor.take_wait()
        elapsed_ms = max((time.monotonic() - self.saved) * 1000 - wait["paced_ms"] - wait["held_ms"], 0)
        ledger.record_batch(tx, self.run.run_id, done=counts["rows"], rows=counts["rows"] - last["rows"],
                            writes=counts["writes"] - last["writes"], errors=counts["errors"] - last["errors"],
                            elapsed_ms=elapsed_ms, **wait)
        self.saved, self.last_saved = time.monotonic(), dict(counts)

    def _header(self) -> PlanHeader:
        job_cls, conn, run = type(self.job), self.conn, self.run
        return PlanHeader(
            plan_id=run.run_id, job=self.name, job_fingerprint=job_cls.code_fingerprint(), job_spec=job_cls.spec(),
            health_checks=len(job_cls.health_checks), table=job_cls.table, key=list(job_cls.key_columns()),
            columns={c: p.describe() for c, p in self.planner.policies.items()}, target=conn.target.name,
            environment=conn.target.environment, database_id=conn.database_id, dialect=conn.engine.dialect.name,
            created_at=utcnow().isoformat() + "Z", operator=run.operator, params=mask_params(self.job.args),
            counts=self.planner.counts,
        )

    def _fail(self, exc: BaseException) -> NoReturn:
        """Record the plan as failed and raise (a Ctrl-C as Interrupted)."""
        counts = self.planner.counts
        self.planner.writer.discard()
        if isinstance(exc, KeyboardInterrupt):
            exc = Interrupted(f"plan {self.run.run_id} of {self.name} stopped: interrupted by Ctrl-C after "
                              f"{counts['rows']} rows; nothing was saved. Plan again.", self.run.run_id)
        if isinstance(exc, GuardRefused):  # a refusal says what it recorded
            exc = type(exc)(f"{exc} Recorded as failed plan run {self.run.run_id} (fillgate show "
                            f"{self.run.run_id}); no plan file was saved and nothing was written to your tables.")
        message = str(exc) if isinstance(exc, FillgateError) else f"{type(exc).__name__}: {exc}"
        self.conn.ledger.fail_run(self.run.run_id, message, counts=counts, details=self.monitor.details())
        self.monitor.run_finished(RunStatus.FAILED, counts, message)
        if isinstance(exc, Interrupted):
            raise exc from None
        raise exc

    def _finish(self, header: PlanHeader, path: Path | None) -> PlanResult:
        ledger, run, counts = self.conn.ledger, self.run, self.planner.counts
        details = self.monitor.details()
        if self.estimate is not None:
            details["estimate"] = self.estimate.to_json()
        ledger.transition(run.run_id, RunStatus.PLANNED, counts=counts, total=header.changes, plan_id=run.run_id,
                          plan_path=str(path) if path else None, plan_sha256=self.planner.writer.file_sha256,
                          finished_at=utcnow(), details=details)
        self.monitor.run_finished(RunStatus.PLANNED, counts)
        return PlanResult(header=header, run=ledger.get_run(run.run_id), path=path, counts=counts,
                          samples=self.planner.samples, estimate=self.estimate,
                          file_sha256=self.planner.writer.file_sha256)


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
    try:
        with conn.engine.connect() as reader:
            selected = set(reader.execute(probe, {k: params[k] for k in wanted}).keys())
    except DBAPIError as exc:
        if exc.connection_invalidated:
            raise
        raise JobError(f"the job's source cannot be run (nothing was recorded): the database answered: "
                       f"{database_reason(exc)}. Fix the job's source SELECT.") from None
    absent = [k for k in job_cls.paging_key() if k not in selected]
    if absent:
        raise JobError(
            f"the job's source does not select the key column(s) {', '.join(absent)} it is paged by; "
            f"add {', '.join(absent)} to the source's SELECT."
        )


def _check_output(out: str | Path | None) -> None:
    """``-o`` names a file or a folder: never a device, FIFO or socket (saving the plan there
    would replace it: ``-o /dev/full`` replaced the device with the plan file)."""
    if out is None:
        return
    path = Path(out).resolve()
    if path.exists() and not path.is_file() and not path.is_dir():
        raise UsageError(f"-o {out}: {path} exists and is not a regular file or a folder (a device, FIFO or "
                         "socket); give a plan file path or a folder. Nothing was recorded.")


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


