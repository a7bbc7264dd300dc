"""Whether a run's process is still alive.

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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fillgate.ledger.store import Run

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


def interrupted(run: Run, now: dt.datetime | None = None) -> str | None:
    """For a run recorded as ``running`` whose process is gone: why (it was killed, crashed,
    or its machine went away), so it is shown as interrupted rather than running."""
    if run.status != "running":
        return None
    now = now or dt.datetime.now(dt.UTC).replace(tzinfo=None)
    return process_gone(run.host, run.pid, run.heartbeat_at, now)


def shown_status(run: Run) -> str:
    """The status to show a person: ``interrupted`` for a running run whose process is gone."""
    return "interrupted" if interrupted(run) else run.status
