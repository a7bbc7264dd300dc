"""fillgate: safe, reviewable, reversible backfills and enrichment sweeps for SQL databases.

The public API is imported lazily (PEP 562), so ``import fillgate`` and the ``fillgate``
command start fast; ``from fillgate import Job`` works as usual.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing here would slow every start

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "Config": "config", "Target": "config", "load_config": "config",
    "RunContext": "context",
    "ApplyResult": "engine", "Limits": "engine", "PlanResult": "engine", "apply_plan": "engine",
    "make_plan": "engine", "resume_run": "engine",
    "ConfigError": "errors", "FillgateError": "errors", "GuardRefused": "errors", "Interrupted": "errors",
    "JobError": "errors", "PlanFileError": "errors", "TargetEscapeError": "errors", "UsageError": "errors",
    "Job": "job", "Param": "job", "load_job": "job",
    "Lookup": "lookup",
    "Pipeline": "pipeline",
    "Failed": "policy", "FillMissing": "policy", "Overwrite": "policy", "Policy": "policy", "Promote": "policy",
    "preview_revert": "revert", "revert_run": "revert",
    "connect": "stamp", "init_target": "stamp",
}

__all__ = [
    "ApplyResult",
    "Config",
    "ConfigError",
    "Failed",
    "FillMissing",
    "FillgateError",
    "GuardRefused",
    "Interrupted",
    "Job",
    "JobError",
    "Limits",
    "Lookup",
    "Overwrite",
    "Param",
    "Pipeline",
    "PlanFileError",
    "PlanResult",
    "Policy",
    "Promote",
    "RunContext",
    "Target",
    "TargetEscapeError",
    "UsageError",
    "apply_plan",
    "connect",
    "init_target",
    "load_config",
    "load_job",
    "make_plan",
    "preview_revert",
    "resume_run",
    "revert_run",
]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fillgate' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"fillgate.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:
    from fillgate.config import Config, Target, load_config
    from fillgate.context import RunContext
    from fillgate.engine import ApplyResult, Limits, PlanResult, apply_plan, make_plan, resume_run
    from fillgate.errors import (
        ConfigError,
        FillgateError,
        GuardRefused,
        Interrupted,
        JobError,
        PlanFileError,
        TargetEscapeError,
        UsageError,
    )
    from fillgate.job import Job, Param, load_job
    from fillgate.lookup import Lookup
    from fillgate.pipeline import Pipeline
    from fillgate.policy import Failed, FillMissing, Overwrite, Policy, Promote
    from fillgate.revert import preview_revert, revert_run
    from fillgate.stamp import connect, init_target
