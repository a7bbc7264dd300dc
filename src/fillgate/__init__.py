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
    "ApplyResult": "applier", "apply_plan": "applier", "run_job": "applier",
    "PlanResult": "planner", "make_plan": "planner",
    "Limits": "limits",
    "control_run": "control", "resume_run": "control",
    "ConfigError": "errors", "FillgateError": "errors", "GuardRefused": "errors", "Interrupted": "errors",
    "JobError": "errors", "PlanFileError": "errors", "TargetEscapeError": "errors", "UsageError": "errors",
    "Job": "job", "Param": "job",
    "load_job": "loader", "load_runnable": "loader",
    "Lookup": "lookup",
    "Monitor": "monitor", "EventWriter": "events", "Alerter": "alerts",
    "HealthCheck": "throttle", "SQLCheck": "throttle", "Throttle": "throttle",
    "WebhookSink": "contrib.webhook", "SentrySink": "contrib.sentry", "ReplicationLagCheck": "contrib.postgres",
    "Pipeline": "pipeline", "run_pipeline": "pipeline_run", "revert_pipeline": "pipeline_run",
    "Failed": "policy", "FillMissing": "policy", "Overwrite": "policy", "Policy": "policy", "Promote": "policy",
    "preview_revert": "revert", "revert_run": "revert",
    "row_history": "history",
    "connect": "stamp", "init_target": "stamp",
    "Cluster": "distributed", "plan_distributed": "distributed", "apply_distributed": "distributed",
    "run_distributed": "distributed", "resume_distributed": "distributed",
}

__all__ = [
    "Alerter",
    "ApplyResult",
    "Cluster",
    "Config",
    "ConfigError",
    "EventWriter",
    "Failed",
    "FillMissing",
    "FillgateError",
    "GuardRefused",
    "HealthCheck",
    "Interrupted",
    "Job",
    "JobError",
    "Limits",
    "Lookup",
    "Monitor",
    "Overwrite",
    "Param",
    "Pipeline",
    "PlanFileError",
    "PlanResult",
    "Policy",
    "Promote",
    "ReplicationLagCheck",
    "RunContext",
    "SQLCheck",
    "SentrySink",
    "Target",
    "TargetEscapeError",
    "Throttle",
    "UsageError",
    "WebhookSink",
    "apply_distributed",
    "apply_plan",
    "connect",
    "control_run",
    "init_target",
    "load_config",
    "load_job",
    "load_runnable",
    "make_plan",
    "plan_distributed",
    "preview_revert",
    "resume_distributed",
    "resume_run",
    "revert_pipeline",
    "revert_run",
    "row_history",
    "run_distributed",
    "run_job",
    "run_pipeline",
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
    from fillgate.alerts import Alerter
    from fillgate.applier import ApplyResult, apply_plan, run_job
    from fillgate.config import Config, Target, load_config
    from fillgate.context import RunContext
    from fillgate.contrib.postgres import ReplicationLagCheck
    from fillgate.contrib.sentry import SentrySink
    from fillgate.contrib.webhook import WebhookSink
    from fillgate.control import control_run, resume_run
    from fillgate.distributed import Cluster, apply_distributed, plan_distributed, resume_distributed, run_distributed
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
    from fillgate.events import EventWriter
    from fillgate.history import row_history
    from fillgate.job import Job, Param
    from fillgate.limits import Limits
    from fillgate.loader import load_job, load_runnable
    from fillgate.lookup import Lookup
    from fillgate.monitor import Monitor
    from fillgate.pipeline import Pipeline
    from fillgate.pipeline_run import revert_pipeline, run_pipeline
    from fillgate.planner import PlanResult, make_plan
    from fillgate.policy import Failed, FillMissing, Overwrite, Policy, Promote
    from fillgate.revert import preview_revert, revert_run
    from fillgate.stamp import connect, init_target
    from fillgate.throttle import HealthCheck, SQLCheck, Throttle
