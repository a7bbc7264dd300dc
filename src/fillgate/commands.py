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

from fillgate.applier import ApplyResult, run_job
from fillgate.config import Config
from fillgate.errors import PlanMismatchError, RunStateError
from fillgate.job import Job
from fillgate.ledger import Run
from fillgate.limits import Limits
from fillgate.monitor import Monitor
from fillgate.pipeline import Pipeline
from fillgate.pipeline_run import PipelineResult, revert_pipeline, run_pipeline, stage_applies
from fillgate.plan import read_header
from fillgate.planner import PlanResult, make_plan
from fillgate.revert import revert_run
from fillgate.runs import RunKind
from fillgate.stamp import Connected, connect

Runnable = type[Job] | type[Pipeline]


def plan(
    conn: Connected, runnable: Runnable, params: Mapping[str, Any] | None = None, *, out: str | None = None,
    limits: Limits | None = None, monitor: Monitor | None = None,
) -> PlanResult | PipelineResult:
    """``fillgate plan``: a job's plan, or every stage of a pipeline planned (not applied;
    a pipeline's plans are always saved, under ``out`` or ``.fillgate/plans/``)."""
    if issubclass(runnable, Pipeline):
        return run_pipeline(conn, runnable, params, out=out or ".fillgate/plans/", limits=limits, monitor=monitor,
                            apply=False)
    return make_plan(conn, runnable, params, out=out, limits=limits, monitor=monitor)


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
    on_planned: Callable[[PlanResult], None] | None = None, stream: bool = False,
) -> RunResult:
    """``fillgate run``: plan, gate and apply a job (``on_planned`` sees the plan before anything
    is written; with ``stream``, after: see ``applier.stream_job``), or every stage of a pipeline
    in turn."""
    if issubclass(runnable, Pipeline):
        return RunResult(pipeline=run_pipeline(conn, runnable, params, out=out, limits=limits, monitor=monitor))
    planned, applied = run_job(conn, runnable, params, out=out, limits=limits, monitor=monitor, on_planned=on_planned,
                               stream=stream)
    return RunResult(plan=planned, apply=applied)


def target_of_plan(config: Config, path: str | Path, target: str | None = None) -> Connected:
    """The target a plan file was made for, connected (``target``, if given, must be it)."""
    header = read_header(path)
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
    return RunDescription(found, ledger.error_groups(related))


def revert(
    conn: Connected, run_id: str, limits: Limits | None = None, monitor: Monitor | None = None
) -> list[ApplyResult]:
    """``fillgate revert``: one revert run for an apply or revert run; for a pipeline run, one
    per stage it applied, last stage first."""
    if conn.ledger.get_run(run_id).kind != RunKind.PIPELINE:
        return [revert_run(conn, run_id, limits, monitor)]
    results = revert_pipeline(conn, run_id, limits, monitor)
    if not results:
        raise RunStateError(f"pipeline run {run_id} applied no stage; there is nothing to revert.")
    return results
