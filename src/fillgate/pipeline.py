"""Pipelines: a job made of stages, run in order on one target under one run id.

Each stage is an ordinary :class:`~fillgate.job.Job`. This module defines a pipeline;
``pipeline_run`` runs one (plans and applies its stages in order) and reverts one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from fillgate.errors import JobError, UsageError
from fillgate.job import Job, Param, validate_job_class


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
