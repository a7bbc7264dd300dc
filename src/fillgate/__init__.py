"""fillgate: safe, reviewable, reversible backfills and enrichment sweeps for SQL databases."""

from fillgate.config import Config, Target, load_config
from fillgate.context import RunContext
from fillgate.engine import ApplyResult, Limits, PlanResult, apply_plan, make_plan, resume_run
from fillgate.errors import (
    ConfigError,
    FillgateError,
    GuardRefused,
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

__version__ = "0.1.0"

__all__ = [
    "ApplyResult",
    "Config",
    "ConfigError",
    "Failed",
    "FillMissing",
    "FillgateError",
    "GuardRefused",
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
