"""Running a distributed run's partitions on Dask (``pip install 'fillgate[dask]'``).

``DaskExecutor(workers=N)`` starts a local cluster of N worker processes (one thread each);
``DaskExecutor(scheduler="tcp://host:8786")`` connects to an existing cluster, whose workers
must reach the target database and import the job's code (its module, or its file at the
same path). Dask re-runs the task of a worker that died; a partition is safe to re-run
(``fillgate.partitions``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable
from typing import Any

from fillgate.errors import MissingExtraError, UsageError

try:
    import dask.config as _dask_config
    import distributed as _distributed
except ImportError as exc:  # pragma: no cover - the extra is not installed
    raise MissingExtraError(
        f"distributed runs need Dask ({exc.name} is not installed): pip install 'fillgate[dask]'"
    ) from None

dask: Any = _distributed  # untyped: its calls are typed here
dask_config: Any = _dask_config


class DaskExecutor:
    """Partition tasks on a Dask cluster: a local one, or the one at ``scheduler``."""

    remote = True

    def __init__(self, workers: int | None = None, scheduler: str | None = None) -> None:
        self.cluster: Any = None
        if scheduler:
            try:
                self.client = dask.Client(scheduler, timeout="20s")
            except OSError as exc:
                raise UsageError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from None
        else:
            # no statistical profiling of running tasks (every 10 ms, it slows pure-Python
            # jobs down) nor GIL sampling in the local workers
            quiet = {"distributed.worker.profile.enabled": False,
                     "distributed.admin.system-monitor.gil.enabled": False}
            with warnings.catch_warnings(), dask_config.set(quiet):
                warnings.simplefilter("ignore")  # "port 8787 is in use": its HTTP server takes another port
                self.cluster = dask.LocalCluster(n_workers=workers or 1, threads_per_worker=1, processes=True,
                                                 dashboard_address=None, silence_logs=logging.ERROR)
            self.client = dask.Client(self.cluster)

    @property
    def worker_count(self) -> int:
        return len(self.client.scheduler_info().get("workers", {})) or 1

    def worker_pids(self) -> list[int]:
        """The process ids of the workers (tests kill one)."""
        return sorted(self.client.run(_pid).values())

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.client.submit(fn, *args, pure=False)

    def wait(self, pending: list[Any], timeout: float) -> tuple[list[Any], list[Any]]:
        with contextlib.suppress(TimeoutError):
            dask.wait(pending, timeout=timeout, return_when="FIRST_COMPLETED")
        done = [f for f in pending if f.done()]
        return done, [f for f in pending if not f.done()]

    def outcome(self, handle: Any) -> tuple[Any, BaseException | None]:
        if handle.status == "finished":
            return handle.result(), None
        exc = handle.exception()
        return None, exc if isinstance(exc, BaseException) else RuntimeError(str(exc))

    def close(self) -> None:
        quiet = logging.getLogger("distributed")
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)  # workers told to stop log their closed connections
        try:
            self.client.close()
            if self.cluster is not None:
                self.cluster.close()
        finally:
            quiet.setLevel(level)


def _pid() -> int:
    return os.getpid()
