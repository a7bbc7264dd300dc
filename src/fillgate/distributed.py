"""Distributed runs: one job planned and applied across many workers (Dask, or this process).

The source's key space is split into partitions by row count (``sql.partition_bounds``); each
partition is planned and applied by a worker (``partitions.py``) with its own connection to
the target. For the user it stays one run:

- a distributed plan is a plan directory: ``manifest.json`` (the header, and every partition's
  key range, plan file, plan run and SHA-256) beside the partitions' plan files. ``apply``
  verifies it as a whole (the manifest against the SHA-256 its plan run recorded, every
  partition file against its manifest entry and its own plan run) and gates it as one plan;
- a distributed apply is one apply run (the coordinator's) with one row per partition in
  ``fillgate_partitions``; each partition applies as a child run of it, whose batches commit
  their data, audit rows and the partition's checkpoint in one transaction. The coordinator
  waits for the partitions, turns their batches into ``batch_done`` events (with the
  partition), and keeps the run's counts the sum of theirs. ``resume`` re-dispatches the
  partitions that did not finish; pause, cancel and revert act on every partition.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fillgate.applier import (
    ApplyResult,
    check_plan_matches,
    check_plan_not_applied,
    check_plan_unmodified,
    lock_name,
    new_writing_run,
    start_writing_run,
    with_job_checks,
)
from fillgate.control import check_resumable, control_run
from fillgate.errors import (
    FillgateError,
    GateExceededError,
    Interrupted,
    PartitionFailedError,
    PlanFileError,
    RunStateError,
    UsageError,
)
from fillgate.interrupts import stop_requested
from fillgate.job import Job
from fillgate.ledger import ApplyLock, Run, new_run_id, operator_name, utcnow
from fillgate.limits import Limits
from fillgate.monitor import Monitor
from fillgate.partitions import apply_partition, partition_lock, plan_partition
from fillgate.plan import PlanHeader, verify_plan
from fillgate.planner import SAMPLE, PlanResult, check_job
from fillgate.revert import revert_run
from fillgate.runs import FINISHED, RunKind, RunStatus
from fillgate.sql import partition_bounds
from fillgate.stamp import Connected, check_write_allowed
from fillgate.validate import SHA256
from fillgate.values import dumps, loads

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
APPLY_COUNTS = ("applied", "conflicts", "errors")
PER_WORKER = 2
"""Partitions per worker by default: each partition costs a plan run, an apply run and their
ledger writes, and Dask hands a free worker the next one, so two keep the workers busy to the end."""


# --- where partitions run ------------------------------------------------------------------


class Executor(Protocol):
    """Runs partition tasks: Dask (``contrib.dask_cluster``) or this process (``InProcess``)."""

    remote: bool  # tasks run in other processes: jobs travel by their spec (path:Class)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any: ...
    def wait(self, pending: list[Any], timeout: float) -> tuple[list[Any], list[Any]]: ...
    def outcome(self, handle: Any) -> tuple[Any, BaseException | None]: ...
    def close(self) -> None: ...


class _Done:
    """A task InProcess ran: its value or its exception."""

    __slots__ = ("error", "value")

    def __init__(self, value: Any, error: BaseException | None) -> None:
        self.value, self.error = value, error


class InProcess:
    """Runs each task at once, in this process, one after the other."""

    remote = False

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return _Done(fn(*args), None)
        except Exception as exc:
            return _Done(None, exc)

    def wait(self, pending: list[Any], timeout: float) -> tuple[list[Any], list[Any]]:
        return list(pending), []

    def outcome(self, handle: Any) -> tuple[Any, BaseException | None]:
        return handle.value, handle.error

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class Cluster:
    """Where a distributed run's partitions go: ``workers`` local Dask worker processes, or an
    existing Dask cluster at ``scheduler`` (``tcp://host:8786``); neither: this process."""

    workers: int | None = None
    scheduler: str | None = None
    partitions: int | None = None  # default: a few per worker

    @classmethod
    def from_options(cls, workers: int | None, scheduler: str | None, partitions: int | None = None) -> Cluster:
        """From ``--workers``, ``--scheduler`` (else ``DASK_SCHEDULER_ADDRESS``) and ``--partitions``."""
        if workers is not None and scheduler:
            raise UsageError("--workers starts a local Dask cluster and --scheduler uses an existing one; "
                             "give one of them.")
        if scheduler is None and workers is None and os.environ.get("DASK_SCHEDULER_ADDRESS"):
            scheduler = os.environ["DASK_SCHEDULER_ADDRESS"]
        return cls(workers, scheduler or None, partitions)

    @property
    def distributed(self) -> bool:
        """A Dask cluster was asked for."""
        return self.workers is not None or self.scheduler is not None

    @property
    def wanted(self) -> bool:
        """A distributed plan was asked for (a cluster, or ``--partitions`` in this process)."""
        return self.distributed or self.partitions is not None

    def partition_count(self, executor: Executor) -> int:
        if self.partitions is not None:
            return self.partitions
        return PER_WORKER * max(getattr(executor, "worker_count", None) or self.workers or 1, 1)

    def open(self) -> Executor:
        """The executor: Dask is imported only here, when a cluster was asked for."""
        if not self.distributed:
            return InProcess()
        from fillgate.contrib.dask_cluster import DaskExecutor  # MissingExtraError without Dask

        return DaskExecutor(workers=self.workers, scheduler=self.scheduler)

    def describe(self) -> dict[str, Any]:
        return {"workers": self.workers, "scheduler": self.scheduler}


# --- the manifest --------------------------------------------------------------------------


@dataclass
class DistributedPlan:
    """A verified plan directory: its header, partitions, folder, and the manifest's SHA-256."""

    header: PlanHeader
    partitions: list[dict[str, Any]]
    folder: Path
    sha256: str
    part_headers: list[tuple[PlanHeader, str]] = field(default_factory=list)  # (header, file SHA-256)

    @property
    def manifest(self) -> Path:
        return self.folder / MANIFEST


def is_distributed_plan(path: str | Path) -> bool:
    """A plan directory (or its manifest) rather than a plan file."""
    path = Path(path)
    return path.is_dir() or path.name == MANIFEST


def _body_sha256(partitions: list[dict[str, Any]]) -> str:
    text = "\n".join(f"{p['part']} {p['plan_id']} {p['file']} {p['sha256']} {p['changes']}" for p in partitions)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_manifest(folder: Path, header: PlanHeader, partitions: list[dict[str, Any]]) -> str:
    """Write ``manifest.json`` atomically; returns its SHA-256 (recorded with the plan run)."""
    header.lines = len(partitions)
    header.changes = sum(p["changes"] for p in partitions)
    header.body_sha256 = _body_sha256(partitions)
    entries = [{k: p[k] for k in ("part", "lo", "hi", "plan_id", "file", "sha256", "changes")} for p in partitions]
    data = dumps({"fillgate_distributed_plan": MANIFEST_FORMAT, "header": asdict(header), "partitions": entries})
    raw = (data + "\n").encode("utf-8")
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_bytes(raw)
    os.replace(tmp, folder / MANIFEST)
    return hashlib.sha256(raw).hexdigest()


def read_manifest_header(path: str | Path) -> PlanHeader:
    """The header of a plan directory (for finding its target), unchecked beyond its form."""
    return _read_manifest(Path(path))[0]


def _read_manifest(path: Path) -> tuple[PlanHeader, list[dict[str, Any]], Path, str]:
    folder = path if path.is_dir() else path.parent
    manifest = folder / MANIFEST
    try:
        raw = manifest.read_bytes()
        data = loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise PlanFileError(f"{folder} is not a distributed plan: it has no {MANIFEST}.") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise PlanFileError(f"cannot read {manifest}: {exc}; the file is damaged. Re-create it with fillgate plan.") \
            from None
    if not isinstance(data, dict) or data.get("fillgate_distributed_plan") != MANIFEST_FORMAT \
            or not isinstance(data.get("header"), dict) or not isinstance(data.get("partitions"), list):
        raise PlanFileError(f"{manifest} is not a fillgate distributed plan manifest (format {MANIFEST_FORMAT}).")
    header = PlanHeader.from_line(dumps(data["header"]), manifest)
    return header, data["partitions"], folder, hashlib.sha256(raw).hexdigest()


def _entry(manifest: Path, number: int, entry: Any) -> dict[str, Any]:
    """One partition entry of the manifest, checked for form."""
    ok = isinstance(entry, dict) and entry.get("part") == number and isinstance(entry.get("file"), str) \
        and isinstance(entry.get("plan_id"), str) and isinstance(entry.get("changes"), int) \
        and isinstance(entry.get("sha256"), str) and SHA256.fullmatch(entry["sha256"]) is not None
    name = entry.get("file", "") if isinstance(entry, dict) else ""
    if not ok or not name or name.startswith(".") or "/" in name or "\\" in name:
        raise PlanFileError(f"{manifest}: partition entry {number} is malformed; the file was modified. "
                            "Re-create it with fillgate plan.")
    return dict(entry)


def verify_manifest(path: str | Path) -> DistributedPlan:
    """Read a plan directory and check it as a whole: the manifest's form, the body checksum
    of its partition list, and every partition file (``verify_plan``) against its entry and
    the header (same job, table, key, columns, target, environment and database)."""
    header, raw_entries, folder, sha = _read_manifest(Path(path))
    manifest = folder / MANIFEST
    entries = [_entry(manifest, i, e) for i, e in enumerate(raw_entries)]
    if len(entries) != header.lines or _body_sha256(entries) != header.body_sha256 \
            or sum(e["changes"] for e in entries) != header.changes:
        raise PlanFileError(f"{manifest} does not match its header (partitions, changes or checksum differ): "
                            "it was modified after planning. Re-create it with fillgate plan.")
    plan = DistributedPlan(header, entries, folder, sha)
    same = ("job", "table", "key", "columns", "target", "environment", "database_id", "dialect", "job_fingerprint")
    for entry in entries:
        file = folder / entry["file"]
        part_header, file_sha = verify_plan(file)
        differs = [name for name in same if getattr(part_header, name) != getattr(header, name)]
        if file_sha != entry["sha256"] or part_header.plan_id != entry["plan_id"] \
                or part_header.changes != entry["changes"] or differs:
            what = ", ".join(differs) or "SHA-256, plan id or change count"
            raise PlanFileError(f"partition {entry['part']} ({file}) does not match {manifest} ({what} differ): "
                                "the plan was modified after planning. Re-create it with fillgate plan.")
        plan.part_headers.append((part_header, file_sha))
    return plan


def check_distributed_plan(conn: Connected, plan: DistributedPlan) -> None:
    """The checks of a single plan, for the manifest and for every partition: made for this
    target and database, byte for byte what each plan run recorded, and every partition
    planned as a part of this very plan."""
    check_plan_matches(conn, plan.header, plan.folder)
    check_plan_unmodified(conn, plan.header, plan.manifest, plan.sha256)
    for entry, (part_header, file_sha) in zip(plan.partitions, plan.part_headers, strict=True):
        file = plan.folder / entry["file"]
        check_plan_unmodified(conn, part_header, file, file_sha)
        if conn.ledger.get_run(part_header.plan_id).parent_run_id != plan.header.plan_id:
            raise PlanFileError(f"partition {entry['part']} ({file}) was not planned as a part of plan "
                                f"{plan.header.plan_id}: the plan directory was modified. Re-create it with "
                                "fillgate plan.")


# --- planning --------------------------------------------------------------------------------


def plan_distributed(
    conn: Connected, job_cls: type[Job], params: Mapping[str, Any] | None = None, *, out: str | Path | None = None,
    limits: Limits | None = None, monitor: Monitor | None = None, cluster: Cluster | None = None,
    executor: Executor | None = None,
) -> PlanResult:
    """Plan a job partition by partition on the cluster's workers, into a plan directory
    ``<out>/<plan id>/`` (default out: ``.fillgate/plans/``). Writes nothing to the user's tables."""
    cluster, limits, monitor = cluster or Cluster(), limits or Limits(), monitor or Monitor()
    job = job_cls(params)
    check_job(conn, job_cls, job.args)
    own = executor is None
    executor = executor or cluster.open()
    try:
        run = conn.ledger.create_run(Run(
            run_id=new_run_id(), kind=RunKind.PLAN, job=job_cls.job_name(), table_name=job_cls.table,
            target=conn.target.name, environment=conn.target.environment, operator=operator_name(),
            status=RunStatus.RUNNING, started_at=utcnow(),
            args={"params": job.args, "key": list(job_cls.key_columns()), "columns": sorted(job_cls.policies()),
                  "out": str(out) if out else None, "distributed": cluster.describe()},
        ))
        return _Planning(conn, run, job, limits, monitor, executor).plan(out, cluster.partition_count(executor))
    finally:
        if own:
            executor.close()


class _Planning:
    def __init__(self, conn: Connected, run: Run, job: Job, limits: Limits, monitor: Monitor,
                 executor: Executor) -> None:
        self.conn, self.run, self.job, self.limits, self.monitor, self.executor = \
            conn, run, job, limits, monitor, executor

    def plan(self, out: str | Path | None, partitions: int) -> PlanResult:
        conn, run, job_cls = self.conn, self.run, type(self.job)
        self.monitor.run_started(run.run_id, RunKind.PLAN, run.job or "", conn.target.name,
                                 conn.target.environment, None)
        try:
            with conn.engine.connect() as reader:
                ranges = partition_bounds(reader, job_cls.select_sql(), job_cls.paging_key(), partitions,
                                          self.job.args)
            conn.ledger.create_partitions(run.run_id, [{"part": i, "lo": r.lo, "hi": r.hi}
                                                       for i, r in enumerate(ranges)])
            folder = Path(out or ".fillgate/plans/").resolve() / run.run_id
            folder.mkdir(parents=True, exist_ok=True)
            parts = self._dispatch([r.to_json() for r in ranges], folder)
            header = self._header(parts)
            sha = write_manifest(folder, header, parts)
        except BaseException as exc:
            message = str(exc) if isinstance(exc, FillgateError) else f"{type(exc).__name__}: {exc}"
            conn.ledger.fail_run(run.run_id, message)
            self.monitor.run_finished(RunStatus.FAILED, {}, message)
            raise
        conn.ledger.transition(run.run_id, RunStatus.PLANNED, counts=header.counts, total=header.changes,
                               plan_id=run.run_id, plan_path=str(folder), plan_sha256=sha, finished_at=utcnow())
        self.monitor.run_finished(RunStatus.PLANNED, header.counts)
        samples: dict[str, list[dict[str, Any]]] = {}
        for part in parts:
            for kind, items in part["samples"].items():
                samples.setdefault(kind, []).extend(items[:max(SAMPLE - len(samples.get(kind, [])), 0)])
        return PlanResult(header=header, run=conn.ledger.get_run(run.run_id), path=folder, counts=header.counts,
                          samples=samples)

    def _dispatch(self, ranges: list[dict[str, Any]], folder: Path) -> list[dict[str, Any]]:
        """Plan every partition; the first partition that fails stops the plan (after the others end)."""
        job_cls = type(self.job)
        job_ref: str | type[Job] = _remote_spec(job_cls) if self.executor.remote else job_cls
        handles = {self.executor.submit(plan_partition, self.conn.target, job_ref, self.job.args, bounds,
                                        str(folder), self.run.run_id, i, self.limits): i
                   for i, bounds in enumerate(ranges)}
        results: dict[int, dict[str, Any]] = {}
        failure: BaseException | None = None
        pending, rows = list(handles), 0
        while pending:
            done, pending = self.executor.wait(pending, 0.5)
            for handle in done:
                value, exc = self.executor.outcome(handle)
                if exc is not None:
                    failure = failure or exc
                    continue
                results[handles[handle]] = value
                rows += value["counts"].get("rows", 0)
                self.monitor.batch_done(value["counts"], rows, self.conn.engine, partition=handles[handle])
        if failure is not None:
            raise failure
        return [results[i] for i in sorted(results)]

    def _header(self, parts: list[dict[str, Any]]) -> PlanHeader:
        job_cls, conn, run = type(self.job), self.conn, self.run
        counts: dict[str, int] = {}
        for part in parts:
            for name, value in part["counts"].items():
                counts[name] = counts.get(name, 0) + value
        return PlanHeader(
            plan_id=run.run_id, job=run.job or "", job_fingerprint=job_cls.code_fingerprint(),
            job_spec=job_cls.spec(), health_checks=len(job_cls.health_checks), table=job_cls.table,
            key=list(job_cls.key_columns()), columns={c: p.describe() for c, p in job_cls.policies().items()},
            target=conn.target.name, environment=conn.target.environment, database_id=conn.database_id,
            dialect=conn.engine.dialect.name, created_at=utcnow().isoformat() + "Z", operator=run.operator,
            params=self.job.args, counts=counts,
        )


# --- applying ------------------------------------------------------------------------------


def apply_distributed(
    conn: Connected, path: str | Path, limits: Limits | None = None, monitor: Monitor | None = None,
    cluster: Cluster | None = None, executor: Executor | None = None,
) -> ApplyResult:
    """Apply a plan directory: every check of a single plan, on the whole and on each
    partition, then one apply run whose partitions run on the cluster's workers."""
    limits, monitor, cluster = limits or Limits(), monitor or Monitor(), cluster or Cluster()
    plan = verify_manifest(path)
    check_distributed_plan(conn, plan)
    check_write_allowed(conn.target, limits.confirm)
    gate = limits.change_gate(conn.target)
    with_job_checks(limits, plan.header)  # the job's health checks load (each worker loads them again)
    if gate is not None and plan.header.changes > gate:
        raise GateExceededError(
            f"plan {plan.folder.name} has {plan.header.changes} changes, more than --max-changes {gate}. Nothing "
            f"was written. Review the plan; if it is right, re-run with --max-changes {plan.header.changes}."
        )
    check_plan_not_applied(conn, plan.header)
    h = plan.header
    run = new_writing_run(
        conn, RunKind.APPLY, job=h.job, table_name=h.table, plan_id=h.plan_id, plan_path=str(plan.folder),
        plan_sha256=plan.sha256, parent_run_id=h.plan_id, total=h.changes,
        args={"key": h.key, "source": h.job, "batch_size": limits.batch_size, "max_changes": gate,
              "distributed": cluster.describe()},
    )
    lock = start_writing_run(conn, run)
    try:
        conn.ledger.create_partitions(run.run_id, [
            {"part": e["part"], "lo": e["lo"], "hi": e["hi"], "plan_file": str(plan.folder / e["file"]),
             "plan_sha256": e["sha256"], "total": e["changes"]} for e in plan.partitions])
        return _dispatch_apply(conn, run, lock, limits, monitor, cluster, executor,
                               [e["part"] for e in plan.partitions])
    finally:
        lock.release()


def _dispatch_apply(conn: Connected, run: Run, lock: ApplyLock, limits: Limits, monitor: Monitor,
                    cluster: Cluster, executor: Executor | None, parts: list[int]) -> ApplyResult:
    own = executor is None
    executor = executor or cluster.open()
    try:
        return _Coordinating(conn, run, lock, limits, monitor, executor).dispatch(parts)
    finally:
        if own:
            executor.close()


def run_distributed(
    conn: Connected, job_cls: type[Job], params: Mapping[str, Any] | None = None, *,
    out: str | Path = ".fillgate/plans/", limits: Limits | None = None, monitor: Monitor | None = None,
    cluster: Cluster | None = None, on_planned: Callable[[PlanResult], None] | None = None,
) -> tuple[PlanResult, ApplyResult]:
    """``fillgate run --workers N``: plan on the cluster, gate, and apply on the same cluster."""
    limits, cluster = limits or Limits(), cluster or Cluster()
    check_write_allowed(conn.target, limits.confirm)
    gate = limits.change_gate(conn.target)
    executor = cluster.open()
    try:
        planned = plan_distributed(conn, job_cls, params, out=out, limits=limits, monitor=monitor, cluster=cluster,
                                   executor=executor)
        if on_planned is not None:
            on_planned(planned)
        assert planned.path is not None
        try:
            return planned, apply_distributed(conn, planned.path, limits, monitor, cluster, executor)
        except GateExceededError:
            changes = planned.header.changes
            raise GateExceededError(
                f"the plan has {changes} changes, more than --max-changes {gate}. Nothing was written to your "
                f"tables. The plan was recorded as plan run {planned.run.run_id} and saved to {planned.path}: "
                f"review it (fillgate show {planned.run.run_id}), and if it is right apply it with: "
                f"fillgate apply {planned.path} --max-changes {changes}"
            ) from None
    finally:
        executor.close()


class _Coordinating:
    """The coordinator of one distributed apply: dispatches partitions, follows their
    batches in the ledger, and ends the run with the sum of theirs."""

    def __init__(self, conn: Connected, run: Run, lock: ApplyLock, limits: Limits, monitor: Monitor,
                 executor: Executor) -> None:
        self.conn, self.run, self.lock, self.limits, self.monitor, self.executor = \
            conn, run, lock, limits, monitor, executor
        self.seen: dict[str, int] = {}  # child run -> its last batch reported
        self.progress: dict[str, tuple[int, str]] = {}  # child run -> (checkpoint, status) last seen
        self.done = -1
        self.beat = 0.0
        self.conflicts: list[dict[str, Any]] = []

    def dispatch(self, parts: list[int]) -> ApplyResult:
        run = self.run
        self.monitor.run_started(run.run_id, run.kind, run.job or "", run.target, run.environment, run.total)
        handles = {self.executor.submit(apply_partition, self.conn.target, run.run_id, p, self.limits): p
                   for p in parts}
        failures: dict[int, BaseException] = {}
        pending = list(handles)
        asked = False
        try:
            while pending:
                done, pending = self.executor.wait(pending, 0.5)
                for handle in done:
                    value, exc = self.executor.outcome(handle)
                    if exc is not None:
                        failures[handles[handle]] = exc
                    else:
                        self.conflicts.extend(value.get("conflicts", [])[:max(SAMPLE - len(self.conflicts), 0)])
                if not asked and stop_requested() is not None:  # Ctrl-C or SIGTERM: every partition pauses
                    self.conn.ledger.update_run(run.run_id, control="pause")
                    asked = True
                self._follow()
        except KeyboardInterrupt:
            self._follow()
            self.conn.ledger.transition(run.run_id, RunStatus.PAUSED, control=None,
                                        message="interrupted by Ctrl-C; partitions stop after their batch")
            raise Interrupted(f"apply run {run.run_id} was interrupted by Ctrl-C.", run.run_id) from None
        self._follow()
        return self._finish(failures, asked)

    def _follow(self) -> None:
        """Report the partitions' new batches as events; keep the run's counts their sum."""
        ledger, run = self.conn.ledger, self.run
        parts = ledger.partitions(run.run_id)
        done = sum(p["checkpoint"] for p in parts)
        for p in parts:
            child = p["child_run_id"]
            if child is None or self.progress.get(child) == (p["checkpoint"], p["status"]):
                continue  # no batch committed since the last look
            self.progress[child] = (p["checkpoint"], p["status"])
            for batch in ledger.batches(child):
                if batch["batch"] > self.seen.get(child, 0):
                    self.seen[child] = batch["batch"]
                    self.monitor.batch_done(batch, done, self.conn.engine, partition=p["part"])
        now = time.monotonic()
        if done == self.done and now - self.beat < 5:
            return
        self.done = done
        with self.conn.engine.begin() as tx:  # the run's counts are the sum of its partitions'
            ledger.update_run(run.run_id, tx, counts=_totals(parts), checkpoint=done, heartbeat_at=utcnow())
            if now - self.beat >= 5:
                self.lock.heartbeat(tx)
                self.beat = now

    def _finish(self, failures: dict[int, BaseException], interrupted: bool) -> ApplyResult:
        ledger, run = self.conn.ledger, self.run
        parts = ledger.partitions(run.run_id)
        totals, control = _totals(parts), ledger.read_control(run.run_id)
        stopped: str | None = None
        message: str | None = None
        if failures:
            status = RunStatus.FAILED
            message = "; ".join(f"partition {p} failed: {_reason(e)}" for p, e in sorted(failures.items()))
        elif control == "cancel":
            status, stopped = RunStatus.CANCELLED, RunStatus.CANCELLED
            cancel_partitions(self.conn, run.run_id)
        elif all(p["status"] == RunStatus.SUCCEEDED for p in parts):
            status = RunStatus.SUCCEEDED
        else:
            status = RunStatus.PAUSED
            stopped = "interrupted" if interrupted else RunStatus.PAUSED
            message = "interrupted; partitions stopped after their batch" if interrupted else None
        finished = utcnow() if status in FINISHED else None
        values: dict[str, Any] = {"counts": totals, "checkpoint": sum(p["checkpoint"] for p in parts),
                                  "control": None, "finished_at": finished, "message": message}
        if status is RunStatus.FAILED:
            ledger.fail_run(run.run_id, message or "", counts=totals, control=None)
        else:
            ledger.transition(run.run_id, status, **values)
        self.monitor.run_finished(status, totals, message)
        if failures:
            raise PartitionFailedError(f"apply run {run.run_id}: {message}. The other partitions went on; "
                                       f"after fixing the cause, continue it with: fillgate resume {run.run_id}")
        return ApplyResult(run=ledger.get_run(run.run_id), counts=totals, conflicts=self.conflicts, stopped=stopped)


def _remote_spec(job_cls: type[Job]) -> str:
    """How a worker loads the job: a package's module by its name (so the job keeps its name,
    ``package.module:Class``); a module of its own by its file, which loads it under the
    same name (the file's stem)."""
    module = job_cls.__module__
    return f"{module}:{job_cls.__qualname__}" if "." in module else job_cls.spec()


def _reason(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, FillgateError) else f"{type(exc).__name__}: {exc}"


def _totals(parts: list[dict[str, Any]]) -> dict[str, int]:
    return {name: sum(int(p["counts"].get(name, 0)) for p in parts) for name in APPLY_COUNTS}


# --- acting on a distributed run -----------------------------------------------------------


def is_distributed_run(conn: Connected, run: Run) -> bool:
    return run.kind == RunKind.APPLY and bool(run.args.get("distributed"))


def resume_distributed(
    conn: Connected, run_id: str, limits: Limits | None = None, monitor: Monitor | None = None,
    cluster: Cluster | None = None, executor: Executor | None = None,
) -> ApplyResult:
    """Continue a distributed apply (paused, failed, or whose coordinator died): re-dispatch
    every partition that did not finish; each continues from its checkpoint."""
    limits, monitor, cluster = limits or Limits(), monitor or Monitor(), cluster or Cluster()
    ledger = conn.ledger
    run = ledger.get_run(run_id)
    check_resumable(run)
    check_write_allowed(conn.target, limits.confirm)
    lock = ApplyLock(conn.engine, lock_name(run.job), run.run_id, operator_name()).acquire()
    try:
        run = ledger.get_run(run_id)
        check_resumable(run)
        plan = verify_manifest(run.plan_path or "")
        if plan.sha256 != run.plan_sha256:
            raise PlanFileError(f"plan {run.plan_path} changed since run {run_id} started applying it; "
                                "refusing to resume.")
        if run.status == RunStatus.RUNNING:  # its coordinator is gone (we hold its lock)
            ledger.transition(run_id, RunStatus.PAUSED, message="its coordinator was gone")
        ledger.transition(run_id, RunStatus.RUNNING, control=None, message=None, finished_at=None,
                          pid=os.getpid(), host=socket.gethostname(), heartbeat_at=utcnow())
        parts = [p["part"] for p in ledger.partitions(run_id)
                 if p["status"] not in (RunStatus.SUCCEEDED, RunStatus.CANCELLED)]
        return _dispatch_apply(conn, ledger.get_run(run_id), lock, limits, monitor, cluster, executor, parts)
    finally:
        lock.release()


def cancel_partitions(conn: Connected, run_id: str) -> None:
    """Cancel every partition of a cancelled distributed run that has not finished: a live
    one after its batch, one whose worker is gone at once."""
    ledger = conn.ledger
    job = ledger.get_run(run_id).job
    for p in ledger.partitions(run_id):
        child = p["child_run_id"]
        if child is None:
            ledger.update_partition(run_id, p["part"], status=RunStatus.CANCELLED)
            continue
        if ledger.get_run(child).status in FINISHED:
            continue
        found = control_run(conn, child, "cancel", lock=partition_lock(job, run_id, p["part"]))
        ledger.update_partition(run_id, p["part"], status=found.status)


def revert_distributed(
    conn: Connected, run_id: str, limits: Limits | None = None, monitor: Monitor | None = None
) -> list[ApplyResult]:
    """Revert every partition of a finished distributed apply (one revert run per partition
    that wrote anything); a partition already reverted is left alone."""
    ledger = conn.ledger
    run = ledger.get_run(run_id)
    if run.status in (RunStatus.RUNNING, RunStatus.PAUSED):
        raise RunStateError(f"run {run_id} is {run.status}; cancel it first (fillgate cancel {run_id}), "
                            "then revert what it applied.")
    results = []
    for p in ledger.partitions(run_id):
        child = p["child_run_id"]
        if child is None or any(r.status == RunStatus.SUCCEEDED for r in ledger.reverts_of(child)):
            continue
        if ledger.get_run(child).status not in WRITING_DONE or not ledger.count_changes(child):
            continue  # still going, or wrote nothing
        results.append(revert_run(conn, child, limits, monitor))
    if not results:
        raise RunStateError(f"distributed run {run_id} has no partition left to revert.")
    return results


WRITING_DONE = frozenset({RunStatus.SUCCEEDED, RunStatus.CANCELLED, RunStatus.FAILED})


def partition_rows(conn: Connected, run: Run) -> list[dict[str, Any]]:
    """Per-partition progress of a distributed plan or apply (for show), JSON-ready."""
    out = []
    for p in conn.ledger.partitions(run.run_id):
        out.append({"part": p["part"], "status": p["status"], "run_id": p["child_run_id"],
                    "checkpoint": p["checkpoint"], "total": p["total"], "counts": p["counts"],
                    "lo": None if p["lo"] is None else list(p["lo"]),
                    "hi": None if p["hi"] is None else list(p["hi"])})
    return out

