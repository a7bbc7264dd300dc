"""Pipelines: a job made of stages, run in order on one target under one run id.

Each stage is an ordinary :class:`~fillgate.job.Job`. ``run_pipeline`` plans and applies the
stages one after the other (a later stage sees what earlier ones wrote), every stage under
the same target and with the pipeline's run id as ``ctx.run_id``. Each stage's plan and
apply are runs of their own, children of the pipeline run, so each is audited, resumable
and revertable; ``revert_pipeline`` undoes the stages in reverse order. A stage that reaches
for another target is refused before it writes anything, and the refusal names the stage.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from fillgate.engine import ApplyResult, Limits, PlanResult, apply_plan, make_plan
from fillgate.errors import GuardRefused, JobError, UsageError
from fillgate.job import Job, Param, validate_job_class
from fillgate.ledger import Run, new_run_id, operator_name, utcnow
from fillgate.monitor import Monitor
from fillgate.revert import revert_run
from fillgate.stamp import Connected, check_write_allowed


class Pipeline:
    """Base class of a pipeline: set ``stages`` to the stage jobs, in order.

    ``params`` given to the pipeline are handed to every stage that declares them; a
    parameter no stage declares is an error.
    """

    stages: ClassVar[Sequence[type[Job]]] = ()
    name: ClassVar[str | None] = None

    @classmethod
    def job_name(cls) -> str:
        return cls.name or f"{cls.__module__}:{cls.__qualname__}"

    @classmethod
    def stage_params(cls, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The parameters of each stage; an unknown parameter is an error."""
        declared: dict[str, Param | type] = {}
        for stage in cls.stages:
            declared.update(stage.params)
        unknown = set(params) - set(declared)
        if unknown:
            raise UsageError(
                f"pipeline {cls.job_name()} has no parameter(s) {', '.join(sorted(unknown))}; its stages "
                f"declare: {', '.join(sorted(declared)) or 'none'}."
            )
        return [{k: v for k, v in params.items() if k in stage.params} for stage in cls.stages]


def validate_pipeline(cls: type[Pipeline], spec: str) -> type[Pipeline]:
    if not cls.stages:
        raise JobError(f"pipeline {spec} has no stages; set stages = [StageA, StageB, ...].")
    for stage in cls.stages:
        validate_job_class(stage, f"{spec} stage {getattr(stage, '__qualname__', stage)!r}")
    names = [stage.job_name() for stage in cls.stages]
    if len(set(names)) != len(names):
        raise JobError(f"pipeline {spec} lists a stage twice; every stage must be a different job.")
    return cls


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
    totals: dict[str, int] = {}
    for stage in stages:
        for name in ("rows", "writes", "inserts", "errors", "disagreements", "preserved", "unexpected_index"):
            totals[name] = totals.get(name, 0) + stage.plan.counts.get(name, 0)
        if stage.apply is not None:
            for name in ("applied", "conflicts"):
                totals[name] = totals.get(name, 0) + stage.apply.counts.get(name, 0)
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
    name = pipeline.job_name()
    run = conn.ledger.create_run(
        Run(
            run_id=new_run_id(),
            kind="pipeline",
            job=name,
            target=conn.target.name,
            environment=conn.target.environment,
            operator=operator_name(),
            status="running",
            args={"params": dict(params or {}), "stages": [s.job_name() for s in pipeline.stages],
                  "apply": apply},
            started_at=utcnow(),
        )
    )
    out_dir = str(out) if str(out).endswith("/") else f"{out}/"
    result = PipelineResult(run=run)
    status = "succeeded" if apply else "planned"
    try:
        for stage, stage_params in zip(pipeline.stages, per_stage, strict=True):
            planned = make_plan(conn, stage, stage_params, out=out_dir, limits=limits, monitor=monitor,
                                pipeline_run_id=run.run_id)
            step = StageResult(stage.job_name(), planned)
            result.stages.append(step)
            if apply and planned.header.changes and planned.path is not None:
                step.apply = apply_plan(conn, planned.path, limits, monitor)
                if step.apply.stopped:
                    status = step.apply.stopped
                    break
            conn.ledger.update_run(run.run_id, counts=_totals(result.stages))
    except BaseException as exc:
        conn.ledger.update_run(run.run_id, status="failed", counts=_totals(result.stages),
                               finished_at=utcnow(), message=str(exc)[:4000])
        if isinstance(exc, GuardRefused):
            raise type(exc)(f"{exc} {_recorded(run, result)}") from None
        raise
    conn.ledger.update_run(run.run_id, status=status, counts=_totals(result.stages), finished_at=utcnow())
    result.run = conn.ledger.get_run(run.run_id)
    return result


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
    out = []
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
