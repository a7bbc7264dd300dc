"""Running a pipeline: its stages planned and applied in order on one target, under one run.

``run_pipeline`` plans and applies the stages one after the other (a later stage sees what
earlier ones wrote), every stage under the same target and with the pipeline's run id as
``ctx.run_id``. Each stage's plan and apply are runs of their own, children of the pipeline
run, so each is audited, resumable and revertable; ``revert_pipeline`` undoes the stages in
reverse order. A stage that reaches for another target is refused before it writes anything,
and the refusal names the stage.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fillgate.applier import ApplyResult, apply_plan
from fillgate.counts import PIPELINE_COUNTS
from fillgate.errors import GuardRefused, UsageError
from fillgate.ledger import Run, new_run_id, operator_name, utcnow
from fillgate.limits import Limits
from fillgate.monitor import Monitor
from fillgate.pipeline import Pipeline
from fillgate.planner import PlanResult, make_plan
from fillgate.redact import mask_params
from fillgate.revert import revert_run
from fillgate.runs import RunKind, RunStatus
from fillgate.stamp import Connected, check_write_allowed
from fillgate.workflow import check_reviewed_only


@dataclass
class StageResult:
    stage: str
    plan: PlanResult
    apply: ApplyResult | None = None


@dataclass
class PipelineResult:
    run: Run
    stages: list[StageResult] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return all(
            not s.plan.counts["errors"] and not s.plan.counts["unexpected_index"]
            and (s.apply is None or s.apply.clean)
            for s in self.stages
        )


def _totals(stages: Sequence[StageResult]) -> dict[str, int]:
    """The pipeline's counts: its stages' plan and apply counts, summed."""
    totals = dict.fromkeys(PIPELINE_COUNTS, 0)
    for stage in stages:
        for counts in (stage.plan.counts, stage.apply.counts if stage.apply else {}):
            for name, value in counts.items():
                if name in totals:
                    totals[name] += value
    return totals


def run_pipeline(
    conn: Connected,
    pipeline: type[Pipeline],
    params: Mapping[str, Any] | None = None,
    *,
    out: str | Path = ".fillgate/plans/",
    limits: Limits | None = None,
    monitor: Monitor | None = None,
    apply: bool = True,
) -> PipelineResult:
    """Plan (and with ``apply``, apply) every stage in order, under one pipeline run.

    ``--max-changes`` and the other limits apply to each stage. Without ``apply`` every stage
    is planned against the current data (a preview: a later stage may find more to do once
    earlier stages are applied).
    """
    limits = limits or Limits()
    per_stage = pipeline.stage_params(params or {})
    if apply:
        check_write_allowed(conn.target, limits.confirm)
        check_reviewed_only(conn, "a pipeline run")
    run = conn.ledger.create_run(Run(
        run_id=new_run_id(), kind=RunKind.PIPELINE, job=pipeline.job_name(), target=conn.target.name,
        environment=conn.target.environment, operator=operator_name(), status=RunStatus.RUNNING,
        args={"params": mask_params(params or {}), "stages": [s.job_name() for s in pipeline.stages], "apply": apply},
        started_at=utcnow(),
    ))
    result = PipelineResult(run=run)
    try:
        status = _run_stages(conn, pipeline, per_stage, str(out), limits, monitor, apply, result)
    except BaseException as exc:
        conn.ledger.fail_run(run.run_id, str(exc), counts=_totals(result.stages))
        if isinstance(exc, GuardRefused):
            raise type(exc)(f"{exc} {_recorded(run, result)}") from None
        raise
    conn.ledger.transition(run.run_id, status, counts=_totals(result.stages),
                           finished_at=None if status is RunStatus.PAUSED else utcnow())
    result.run = conn.ledger.get_run(run.run_id)
    return result


def _run_stages(conn: Connected, pipeline: type[Pipeline], per_stage: list[dict[str, Any]], out: str,
                limits: Limits, monitor: Monitor | None, apply: bool, result: PipelineResult) -> RunStatus:
    """Plan (and apply) each stage in turn; the status the pipeline run ends in."""
    out_dir = out if out.endswith("/") else f"{out}/"
    run_id = result.run.run_id
    for stage, stage_params in zip(pipeline.stages, per_stage, strict=True):
        planned = make_plan(conn, stage, stage_params, out=out_dir, limits=limits, monitor=monitor,
                            pipeline_run_id=run_id)
        step = StageResult(stage.job_name(), planned)
        result.stages.append(step)
        if apply and planned.header.changes and planned.path is not None:
            step.apply = apply_plan(conn, planned.path, limits, monitor)
            if step.apply.stopped:  # paused (by request or Ctrl-C) or cancelled between batches
                return RunStatus.CANCELLED if step.apply.stopped == RunStatus.CANCELLED else RunStatus.PAUSED
        conn.ledger.update_run(run_id, counts=_totals(result.stages))
    return RunStatus.SUCCEEDED if apply else RunStatus.PLANNED


def _recorded(run: Run, result: PipelineResult) -> str:
    """What a refused pipeline left behind, for the refusal's message."""
    plans = [f"{s.stage}: plan run {s.plan.run.run_id}" + (f" ({s.plan.path})" if s.plan.path else "")
             for s in result.stages]
    applied = [f"{s.stage}: apply run {s.apply.run.run_id}" for s in result.stages if s.apply is not None]
    return (f"Recorded: pipeline run {run.run_id} (now failed)"
            + (f"; stage plans {'; '.join(plans)}" if plans else "")
            + (f"; applied stages (audited, revertable) {'; '.join(applied)}" if applied
               else "; no stage wrote to your tables") + ".")


def stage_applies(conn: Connected, pipeline_run_id: str) -> list[Run]:
    """The apply runs of a pipeline run's stages, in the order they ran."""
    out: list[Run] = []
    for plan_run in conn.ledger.children_of(pipeline_run_id):
        out.extend(r for r in conn.ledger.runs_of_plan(plan_run.run_id) if r.kind == "apply")
    return out


def revert_pipeline(
    conn: Connected, pipeline_run_id: str, limits: Limits | None = None, monitor: Monitor | None = None
) -> list[ApplyResult]:
    """Revert every stage a pipeline run applied, last stage first."""
    run = conn.ledger.get_run(pipeline_run_id)
    if run.kind != "pipeline":
        raise UsageError(f"run {pipeline_run_id} is a {run.kind} run, not a pipeline run.")
    return [revert_run(conn, applied.run_id, limits, monitor)
            for applied in reversed(stage_applies(conn, pipeline_run_id))]
