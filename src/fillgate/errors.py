"""Every exception fillgate raises, in one place.

Each error carries the process exit code the CLI uses for it (docs/design.md, "Exit codes"):
2 for usage or configuration errors, 3 for refusals by a guard. Messages say what was
wrong, why, and what to do. ``fillgate verify`` exits 4 when the audit log does not match
its tamper evidence (a finding, not an error), and an ``apply --canary`` exits 4 when its
verification fails.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ROW_PROBLEMS = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_TAMPERED = 4  # fillgate verify: the audit log differs from its tamper evidence
EXIT_VERIFY_FAILED = 4  # a verification failed (fillgate verify; a canary's verification)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C


class FillgateError(Exception):
    """Base class of every fillgate error."""

    exit_code: int = EXIT_USAGE


# --- usage and configuration (exit 2) -------------------------------------------------


class UsageError(FillgateError):
    """The command was given something it cannot use."""


class ConfigError(UsageError):
    """fillgate.toml / pyproject.toml / DATABASE_URL is missing or wrong."""


class JobError(UsageError):
    """A job could not be loaded, or is not a valid job."""


class KeyNotUniqueError(JobError):
    """The job's key does not identify one row."""


class PlanFileError(UsageError):
    """A plan file is malformed, truncated or modified."""


class NotInitializedError(UsageError):
    """The target database has no fillgate ledger yet."""


class RunNotFoundError(UsageError):
    """No run with that id exists in the target's ledger."""


class RunStateError(UsageError):
    """The run is in a state that does not allow the requested operation."""


class Interrupted(FillgateError):
    """Ctrl-C or SIGTERM stopped a run. An apply or revert is left paused at a batch
    boundary (``run_id`` names it; ``fillgate resume`` continues it); a plan is left failed."""

    exit_code = EXIT_INTERRUPTED

    def __init__(self, message: str, run_id: str | None = None) -> None:
        super().__init__(message)
        self.run_id = run_id


# --- refusals by a guard (exit 3) -----------------------------------------------------


class GuardRefused(FillgateError):
    """A safety guard refused the command; nothing was written."""

    exit_code = EXIT_REFUSED


class StampMismatchError(GuardRefused):
    """The database's environment stamp differs from the target's environment."""


class ProtectedTargetError(GuardRefused):
    """A write to a protected environment without --confirm ENV."""


class GateExceededError(GuardRefused):
    """The plan has more changes than --max-changes allows."""


class ErrorBudgetExceededError(GuardRefused):
    """The run erred more than --max-errors / --max-error-rate allow."""


class LockHeldError(GuardRefused):
    """Another apply of the same job on the same target holds the lock."""


class TargetEscapeError(GuardRefused):
    """Job code tried to reach a database other than the run's target."""


class AlreadyDoneError(GuardRefused):
    """The plan was already applied, or the run already reverted."""


class PlanMismatchError(GuardRefused):
    """The plan was made for another target, environment or database."""


class ApprovalRequiredError(GuardRefused):
    """The target needs more approvals of the plan (fillgate approve) from other operators."""


class RehearsalRequiredError(GuardRefused):
    """The target needs the job applied on its rehearsal target first (or its counts differ
    from the rehearsal's by more than the tolerance)."""


class CanaryVerificationError(FillgateError):
    """A canary's verification failed: the run stays paused (exit 4)."""

    exit_code = EXIT_VERIFY_FAILED

    def __init__(self, message: str, run_id: str | None = None) -> None:
        super().__init__(message)
        self.run_id = run_id


# --- values a column cannot hold exactly (row errors, exit 1) ------------------------------


class ColumnTypeError(FillgateError):
    """A proposed value its column cannot hold exactly: of the wrong type, too long, out of
    range, or one the database would round, truncate, pad or convert. Found at plan time; a
    row error, so nothing of that row is planned."""

    exit_code = EXIT_ROW_PROBLEMS


class StoredValueError(FillgateError):
    """At apply, the database stored a field differently from the plan (a column type or a
    trigger changed it). The row's change is rolled back and recorded as a row error."""

    exit_code = EXIT_ROW_PROBLEMS


class PartitionFailedError(FillgateError):
    """A partition of a distributed run failed (the others went on); its run says why, and
    ``fillgate resume`` re-dispatches it."""

    exit_code = EXIT_ROW_PROBLEMS


# --- lookups, alerts and throttling ---------------------------------------------------


class MissingExtraError(ConfigError):
    """An optional integration was asked for, but its extra is not installed."""


class LookupTimeoutError(FillgateError, TimeoutError):
    """A batch lookup call took longer than its per-call timeout.

    A subclass of the built-in ``TimeoutError``, so lookups retry it as a transient error
    by default. It is a row error (exit 1), never a NULL write.
    """

    exit_code = EXIT_ROW_PROBLEMS


class LookupResultError(FillgateError):
    """A batch lookup returned something other than a list of results (a row error)."""

    exit_code = EXIT_ROW_PROBLEMS


class AlertDeliveryError(FillgateError):
    """An alert sink could not deliver an alert. The run itself carries on."""

    exit_code = EXIT_ROW_PROBLEMS


class HealthCheckError(UsageError):
    """A health check cannot run against this database (wrong backend, missing privilege)."""


class HoldTimeoutError(GuardRefused):
    """A health check held the run for longer than the allowed maximum; the run stopped."""


class CriticalLoadError(GuardRefused):
    """The database's load passed ``--critical-load``: the run paused at a batch boundary
    (or, before its first batch, did not start)."""


class BatchTimeoutError(FillgateError):
    """A batch's statement ran longer than the batch timeout, also when retried at a quarter
    of its size; the batch was rolled back and the run stopped (resumable)."""

    exit_code = EXIT_ROW_PROBLEMS
