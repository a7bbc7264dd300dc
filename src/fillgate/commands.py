"""What each ``fillgate`` command does, as one library call: the CLI (``cli.py``) and the web
dashboard parse their input and call these; ``report.py`` renders what they return.

Commands that take a job accept a :class:`~fillgate.job.Job` or a
:class:`~fillgate.pipeline.Pipeline` class and do the right thing with either.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fillgate.applier import (
    ApplyResult,
    apply_plan,
    check_plan_matches,
    check_plan_not_applied,
    check_plan_unmodified,
    run_job,
)
from fillgate.config import Config
from fillgate.control import control_run, resume_run
from fillgate.distributed import (
    Cluster,
    apply_distributed,
    cancel_partitions,
    is_distributed_plan,
    is_distributed_run,
    partition_rows,
    plan_distributed,
    read_manifest_header,
    resume_distributed,
    revert_distributed,
    run_distributed,
)
from fillgate.errors import PlanMismatchError, RunStateError, UsageError
from fillgate.job import Job
from fillgate.ledger import Run, operator_name
from fillgate.limits import Limits
from fillgate.monitor import Monitor
from fillgate.pipeline import Pipeline
from fillgate.pipeline_run import PipelineResult, revert_pipeline, run_pipeline, stage_applies
from fillgate.plan import PlanHeader, read_header, verify_plan
from fillgate.planner import PlanResult, make_plan
from fillgate.revert import revert_run
from fillgate.runs import RunKind
from fillgate.stamp import Connected, connect

Runnable = type[Job] | type[Pipeline]


def plan(
    conn: Connected, runnable: Runnable, params: Mapping[str, Any] | None = None, *, out: str | None = None,
    limits: Limits | None = None, monitor: Monitor | None = None, estimate: bool = False,
    cluster: Cluster | None = None,
) -> PlanResult | PipelineResult:
    """``fillgate plan``: a job's plan, or every stage of a pipeline planned (not applied;
    a pipeline's plans are always saved, under ``out`` or ``.fillgate/plans/``). ``estimate``:
    a job's plan times a rolled-back trial batch to estimate the apply's duration. With a
    ``cluster`` (``--workers``, ``--scheduler``, ``--partitions``): a distributed plan, a plan
    directory under ``out`` (default ``.fillgate/plans/``), without an estimate."""
    if cluster is not None and cluster.wanted:
        return plan_distributed(conn, _job_only(runnable), params, out=out, limits=limits, monitor=monitor,
                                cluster=cluster)
    if issubclass(runnable, Pipeline):
        return run_pipeline(conn, runnable, params, out=out or ".fillgate/plans/", limits=limits, monitor=monitor,
                            apply=False)
    return make_plan(conn, runnable, params, out=out, limits=limits, monitor=monitor, estimate=estimate)


@dataclass
class RunResult:
    """What ``fillgate run`` did: a job's plan and apply, or a pipeline's stages."""

    plan: PlanResult | None = None
    apply: ApplyResult | None = None
    pipeline: PipelineResult | None = None

    @property
    def clean(self) -> bool:
        if self.pipeline is not None:
            return self.pipeline.clean
        assert self.plan is not None and self.apply is not None
        return self.apply.clean and not (self.plan.counts["errors"] or self.plan.counts["unexpected_index"])


def run(
    conn: Connected, runnable: Runnable, params: Mapping[str, Any] | None = None, *,
    out: str = ".fillgate/plans/", limits: Limits | None = None, monitor: Monitor | None = None,
    on_planned: Callable[[PlanResult], None] | None = None, cluster: Cluster | None = None,
    stream: bool = False,
) -> RunResult:
    """``fillgate run``: plan, gate and apply a job (``on_planned`` sees the plan before anything
    is written; with ``stream``, after: see ``applier.stream_job``), or every stage of a pipeline
    in turn; with a ``cluster``, distributed."""
    if cluster is not None and cluster.wanted:
        planned, applied = run_distributed(conn, _job_only(runnable), params, out=out, limits=limits,
                                           monitor=monitor, cluster=cluster, on_planned=on_planned)
        return RunResult(plan=planned, apply=applied)
    if issubclass(runnable, Pipeline):
        return RunResult(pipeline=run_pipeline(conn, runnable, params, out=out, limits=limits, monitor=monitor))
    planned, applied = run_job(conn, runnable, params, out=out, limits=limits, monitor=monitor, on_planned=on_planned,
                               stream=stream)
    return RunResult(plan=planned, apply=applied)


def _job_only(runnable: Runnable) -> type[Job]:
    if issubclass(runnable, Pipeline):
        raise UsageError("a pipeline cannot run distributed (--workers, --scheduler, --partitions); "
                         "run each of its jobs distributed, or the pipeline in one process.")
    return runnable


def apply(
    conn: Connected, path: str | Path, limits: Limits | None = None, monitor: Monitor | None = None,
    cluster: Cluster | None = None, *, canary: int | None = None, verify_sql: str | None = None,
) -> ApplyResult:
    """``fillgate apply``: a plan file in this process, or a plan directory (a distributed
    plan) on the ``cluster``'s workers (none: in this process, partition after partition).
    ``canary``/``verify_sql``: see ``applier.apply_plan`` (a plan file only)."""
    if is_distributed_plan(path):
        if canary is not None:
            raise UsageError(f"{path} is a distributed plan; --canary applies a plan file (made in one process).")
        return apply_distributed(conn, path, limits, monitor, cluster)
    if cluster is not None and cluster.distributed:
        raise UsageError(f"{path} is a plan file, made in one process; --workers and --scheduler apply a "
                         "distributed plan (a plan directory from fillgate plan --workers).")
    return apply_plan(conn, path, limits, monitor, canary=canary, verify_sql=verify_sql)


def resume(
    conn: Connected, run_id: str, limits: Limits | None = None, monitor: Monitor | None = None,
    cluster: Cluster | None = None,
) -> ApplyResult:
    """``fillgate resume``: a run from its checkpoint; a distributed run re-dispatches the
    partitions that did not finish (on the ``cluster``, else the one it recorded)."""
    run = conn.ledger.get_run(run_id)
    if is_distributed_run(conn, run):
        if cluster is None or not cluster.distributed:
            recorded = run.args.get("distributed") or {}
            cluster = Cluster(recorded.get("workers"), recorded.get("scheduler"))
        return resume_distributed(conn, run_id, limits, monitor, cluster)
    return resume_run(conn, run_id, limits, monitor)


def control(conn: Connected, run_id: str, action: str) -> Run:
    """``fillgate pause`` / ``cancel``: a distributed run's partitions stop with it."""
    found = control_run(conn, run_id, action)
    if found.status == "cancelled" and is_distributed_run(conn, found):
        cancel_partitions(conn, run_id)
    return found


def plan_header(path: str | Path) -> PlanHeader:
    """The header of a plan file or of a plan directory (a distributed plan), unchecked beyond its form."""
    return read_manifest_header(path) if is_distributed_plan(path) else read_header(path)


def target_of_plan(config: Config, path: str | Path, target: str | None = None) -> Connected:
    """The target a plan file was made for, connected (``target``, if given, must be it)."""
    header = plan_header(path)
    if target is not None and target != header.target:
        raise PlanMismatchError(
            f"plan {path} was made for target '{header.target}', not '{target}'. Make a new plan for '{target}'."
        )
    return connect(config.target(header.target))


@dataclass
class RunDescription:
    """What ``fillgate show`` tells about a run."""

    run: Run
    error_groups: list[dict[str, Any]] = field(default_factory=list)
    approvals: list[dict[str, Any]] = field(default_factory=list)  # of the run's plan (plan and apply runs)
    partitions: list[dict[str, Any]] = field(default_factory=list)  # a distributed run's, with progress


def describe(conn: Connected, run_id: str) -> RunDescription:
    """``fillgate show``: a run, and its errors grouped by fingerprint (a pipeline's include its
    stages'; an apply shows its plan's slowest rows and lookup anomalies, as it computes nothing)."""
    ledger = conn.ledger
    found = ledger.get_run(run_id)
    related = [run_id]
    if found.kind == RunKind.PIPELINE:
        related += [r.run_id for r in ledger.children_of(run_id)] + [r.run_id for r in stage_applies(conn, run_id)]
    if found.kind == RunKind.APPLY and not found.details and found.parent_run_id:
        found.details = {**ledger.get_run(found.parent_run_id).details, "from_plan_run": found.parent_run_id}
    approvals = ledger.approvals(found.plan_id) if found.plan_id and found.kind in (RunKind.PLAN, RunKind.APPLY) \
        else []
    partitions = partition_rows(conn, found)
    if partitions:  # a distributed run: its partitions' errors (a plan's, even of a partition that failed)
        related += [p["run_id"] for p in partitions if p["run_id"]]
        if found.kind == RunKind.PLAN:
            related += [r.run_id for r in ledger.children_of(run_id) if r.run_id not in related]
    return RunDescription(found, ledger.error_groups(related), approvals, partitions)


def revert(
    conn: Connected, run_id: str, limits: Limits | None = None, monitor: Monitor | None = None
) -> list[ApplyResult]:
    """``fillgate revert``: one revert run for an apply or revert run; for a pipeline run, one
    per stage it applied, last stage first."""
    found = conn.ledger.get_run(run_id)
    if is_distributed_run(conn, found):
        return revert_distributed(conn, run_id, limits, monitor)
    if found.kind != RunKind.PIPELINE:
        return [revert_run(conn, run_id, limits, monitor)]
    results = revert_pipeline(conn, run_id, limits, monitor)
    if not results:
        raise RunStateError(f"pipeline run {run_id} applied no stage; there is nothing to revert.")
    return results


@dataclass
class Approval:
    """What ``fillgate approve`` recorded, and where the plan stands."""

    plan_id: str
    plan_sha256: str
    path: str
    operator: str
    via: str
    comment: str | None
    approvals: list[dict[str, Any]]
    needed: int


def approve(conn: Connected, path: str | Path, comment: str | None = None, via: str = "cli") -> Approval:
    """``fillgate approve``: record this operator's approval of the plan file (its SHA-256,
    checked against the one its plan run recorded) in the target's ledger. A plan applied
    already, modified, or approved by this operator already is refused (nothing recorded)."""
    path = Path(path).resolve()
    header, sha256 = verify_plan(path)
    check_plan_matches(conn, header, path)
    check_plan_unmodified(conn, header, path, sha256)
    check_plan_not_applied(conn, header)
    operator = operator_name()
    conn.ledger.add_approval(header.plan_id, sha256, operator, via, comment)
    return Approval(header.plan_id, sha256, str(path), operator, via, comment, conn.ledger.approvals(header.plan_id),
                    conn.target.approvals)
