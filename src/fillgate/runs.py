"""A run's lifecycle: its kinds, its statuses, the one table of allowed status changes, and
whether its process is still alive.

Every plan, apply, revert, pipeline, init and stamp is a run. Its status only ever changes
along ``TRANSITIONS`` (as Shopify's maintenance_tasks validates its run statuses), and
``Ledger.transition`` makes each change a compare-and-set on the status the run had, so two
processes can never both move a run (a resume racing a finishing apply, a pause racing a
resume): the loser gets a :class:`~fillgate.errors.RunStateError`.

A run records the host and pid of the process writing it and a heartbeat (``heartbeat_at``),
refreshed with every batch and while a health check holds the run. A run whose status says
``running`` but whose process is gone (killed, crashed, the machine rebooted) is shown as
interrupted: ``fillgate resume`` continues it, ``fillgate cancel`` gives it up. The same test
decides whether SQLite's lock row is stale.
"""

from __future__ import annotations

import datetime as dt
import errno
import os
import socket
from enum import StrEnum
from typing import Protocol

from fillgate.errors import RunStateError


class RunKind(StrEnum):
    INIT = "init"  # the ledger was created and the database stamped
    STAMP = "stamp"  # the stamp was changed (--force-stamp)
    PLAN = "plan"
    APPLY = "apply"
    REVERT = "revert"
    PIPELINE = "pipeline"


class RunStatus(StrEnum):
    RUNNING = "running"
    PLANNED = "planned"  # a plan (or a pipeline planned without applying) is done
    PAUSED = "paused"  # an apply or revert stopped between batches; resume continues it
    FAILED = "failed"  # stopped by an error; an apply or revert can still be resumed or cancelled
    CANCELLED = "cancelled"
    SUCCEEDED = "succeeded"


WRITING_KINDS = (RunKind.APPLY, RunKind.REVERT)
"""The kinds of run that write the user's tables (and the audit log)."""

TRANSITIONS: dict[RunStatus, frozenset[RunStatus]] = {
    RunStatus.RUNNING: frozenset({RunStatus.PLANNED, RunStatus.PAUSED, RunStatus.FAILED, RunStatus.CANCELLED,
                                  RunStatus.SUCCEEDED}),
    RunStatus.PAUSED: frozenset({RunStatus.RUNNING, RunStatus.CANCELLED}),
    RunStatus.FAILED: frozenset({RunStatus.RUNNING, RunStatus.CANCELLED}),
    RunStatus.PLANNED: frozenset(),
    RunStatus.CANCELLED: frozenset(),
    RunStatus.SUCCEEDED: frozenset(),
}
"""Every status change a run may make. A run is created ``running`` (``succeeded`` for init
and stamp runs, which are done when recorded)."""

FINISHED = frozenset(status for status, after in TRANSITIONS.items() if not after)
"""Statuses a run never leaves."""

MESSAGE_LIMIT = 4000
"""The longest message kept with a run (the rest is cut; the whole error is in fillgate_errors
or the output of the command that failed)."""


def sources_of(status: RunStatus | str) -> frozenset[RunStatus]:
    """The statuses from which a run may move to ``status``."""
    return frozenset(before for before, after in TRANSITIONS.items() if status in after)


def check_transition(run_id: str, before: RunStatus | str, after: RunStatus | str) -> None:
    """Refuse a status change ``TRANSITIONS`` does not allow."""
    if RunStatus(after) not in TRANSITIONS[RunStatus(before)]:
        raise RunStateError(f"run {run_id} is {before}; it cannot become {after}.")


# A process on another host is presumed gone when its heartbeat is older than this. A live
# process refreshes its heartbeat at every batch and every poll of a hold, so only a single
# batch slower than this could be mistaken for a dead process.
STALE_AFTER = dt.timedelta(minutes=5)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True


def process_gone(host: str | None, pid: int | None, heartbeat_at: dt.datetime | None,
                 now: dt.datetime) -> str | None:
    """Why the process (``host``, ``pid``, last heartbeat) is gone, or None if it may be alive.
    On this host the process table decides; elsewhere the heartbeat's age."""
    if host == socket.gethostname() and pid is not None:
        return None if pid_alive(pid) else f"its process (pid {pid} on {host}) is gone"
    if heartbeat_at is not None and now - heartbeat_at > STALE_AFTER:
        age = int((now - heartbeat_at).total_seconds())
        return f"its process (pid {pid} on {host}) has sent no heartbeat for {age}s"
    return None


class RunRecord(Protocol):
    """What liveness needs of a run (``ledger.Run`` has it)."""

    status: str
    host: str | None
    pid: int | None
    heartbeat_at: dt.datetime | None


def interrupted(run: RunRecord, now: dt.datetime | None = None) -> str | None:
    """For a run recorded as ``running`` whose process is gone: why (it was killed, crashed,
    or its machine went away), so it is shown as interrupted rather than running."""
    if run.status != "running":
        return None
    now = now or dt.datetime.now(dt.UTC).replace(tzinfo=None)
    return process_gone(run.host, run.pid, run.heartbeat_at, now)


def shown_status(run: RunRecord) -> str:
    """The status to show a person: ``interrupted`` for a running run whose process is gone."""
    return "interrupted" if interrupted(run) else run.status
