"""Watching a run: events, alerts, progress, pacing and timing, behind one object.

The engine calls :class:`Monitor` at the start of a run, after every batch and at the end;
the monitor fans out to the event writer (``--events``), the alerter (webhook, Sentry), the
progress display and the throttle (``--rate``, ``--pause-between-batches``, health checks).
Every part is optional: a bare ``Monitor()`` sends alerts only where the environment
configures sinks, and otherwise only keeps time.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Protocol

from sqlalchemy.engine import Engine

from fillgate.alerts import Alerter
from fillgate.contrib import sinks_from_env
from fillgate.errors import HoldTimeoutError
from fillgate.events import EventWriter, SlowestRows
from fillgate.ledger.chain import AuditChain
from fillgate.runs import WRITING_KINDS, RunStatus
from fillgate.throttle import Throttle

# Every count a batch can carry (events, alerts and the run summary use these names).
BATCH_FIELDS = (
    "rows", "writes", "unchanged", "skipped", "disagreements", "preserved", "conflicts", "errors",
    "unexpected_index", "extra_results",
)


class Progress(Protocol):
    """A progress display (the CLI's is a Rich bar); all calls are cheap."""

    def start(self, description: str, total: int | None) -> None: ...
    def advance(self, done: int) -> None: ...
    def hold(self, reason: str | None) -> None: ...
    def measured(self, rate: float | None) -> None: ...
    def stop(self) -> None: ...


@dataclass
class Monitor:
    """Observes one run at a time (plan, apply, revert or resume)."""

    events: EventWriter = field(default_factory=lambda: EventWriter(None))
    alerter: Alerter = field(default_factory=lambda: Alerter(sinks_from_env()))
    progress: Progress | None = None
    slowest: SlowestRows = field(default_factory=SlowestRows)
    first_mismatch: dict[str, Any] | None = None
    # Row times of the current batch, summed per key (a row's lookup and compute are timed
    # separately), folded into ``slowest`` when the batch is done.
    _row_ms: dict[Any, float] = field(default_factory=dict)
    _run_id: str = ""
    _job: str = ""
    _kind: str = ""
    _batch: int = 0
    _started: float = 0.0
    _batch_started: float = 0.0
    # The current run's pacing (from its Limits), and how to refresh its heartbeat while a
    # health check holds it (so a long hold never makes a live run look dead); both given to
    # run_started by the planner or applier and dropped by run_finished.
    _throttle: Throttle = field(default_factory=Throttle)
    _heartbeat: Callable[[], None] | None = None
    _last_beat: float = 0.0
    # Pacing and holds since ``take_wait`` was last called (for the ledger's batch timeline).
    _paced_ms: float = 0.0
    _held_ms: float = 0.0
    _hold_reason: str | None = None
    # (monotonic time, done) of the last batches: the measured rate the progress ETA uses
    _marks: list[tuple[float, int]] = field(default_factory=list)
    _sizing: tuple[int | None, int] = (None, 0)

    def run_started(
        self, run_id: str, kind: str, job: str, target: str, environment: str, total: int | None,
        *, throttle: Throttle | None = None, heartbeat: Callable[[], None] | None = None,
        rate: float | None = None,
    ) -> None:
        """A run starts: ``throttle`` paces it after every batch (default: no pacing),
        ``heartbeat`` refreshes its heartbeat while it is held; ``rate`` (changes per second,
        e.g. measured by the plan's trial batch) gives the progress ETA until batches are measured."""
        self._run_id, self._job, self._kind, self._batch = run_id, job, kind, 0
        self._throttle = throttle or Throttle()
        self._heartbeat = heartbeat
        self._last_beat = 0.0
        self.slowest = SlowestRows()
        self._row_ms = {}
        self.first_mismatch = None
        self._started = self._batch_started = time.perf_counter()
        self._paced_ms = self._held_ms = 0.0
        self._hold_reason = None
        self._throttle.start()
        self.events.run_started(run_id=run_id, kind=kind, job=job, target=target,
                                environment=environment, total_estimate=total)
        self._marks = [(time.monotonic(), 0)]
        if self.progress is not None:
            self.progress.start(f"{kind} {job}", total)
            if rate:
                self.progress.measured(rate)

    def row_timing(self, key: tuple[Any, ...], ms: float) -> None:
        """Time spent on a row; calls for the same row in one batch add up (lookup + compute)."""
        try:
            self._row_ms[key] = self._row_ms.get(key, 0.0) + ms
        except TypeError:  # an unhashable key value: keep it as it is
            self.slowest.add(ms, key)

    def _fold_row_times(self) -> None:
        # only the batch's slowest rows can enter the run's slowest rows
        for key, ms in heapq.nlargest(self.slowest.n, self._row_ms.items(), key=itemgetter(1)):
            self.slowest.add(ms, key)
        self._row_ms = {}

    def mismatch(self, example: Mapping[str, Any]) -> None:
        if self.first_mismatch is None:
            self.first_mismatch = dict(example)

    def batch_done(
        self,
        counts: Mapping[str, int],
        done: int,
        engine: Engine,
        examples: Mapping[str, Any] | None = None,
        partition: int | None = None,
    ) -> None:
        """After a batch committed: report it (with what :meth:`batch_sizing` said about it),
        alert once if it had anomalies, then pace. ``partition``: the batch's partition of a
        distributed run (its events carry it)."""
        self._batch += 1
        elapsed_ms = (time.perf_counter() - self._batch_started) * 1000
        self._fold_row_times()
        batch = {name: counts.get(name, 0) for name in BATCH_FIELDS}
        self.alerter.batch_done(self._job, self._run_id, self._batch, batch, examples)
        if self.progress is not None:
            self.progress.advance(done)
            self.progress.measured(self.measured_rate(done))
        held_s = 0.0
        if self._throttle.active:
            try:
                held_s = self._throttle.after_batch(batch["rows"] or batch["writes"] or 1, engine,
                                                   on_hold=self._on_hold)
            except HoldTimeoutError as exc:
                hint = (f" Resume it once the database is healthy: fillgate resume {self._run_id}"
                        if self._kind in WRITING_KINDS else " Plan again once the database is healthy.")
                raise HoldTimeoutError(f"{exc}{hint}") from None
            if self.progress is not None and self._throttle.last_held_s:
                self.progress.hold(None)
            self._paced_ms += (self._throttle.last_paced_s + self._throttle.last_paused_s) * 1000
            self._held_ms += held_s * 1000
        self.events.batch_done(run_id=self._run_id, batch=self._batch, counts=batch,
                               elapsed_ms=elapsed_ms, held_ms=held_s * 1000, batch_size=self._sizing[0],
                               timed_out=self._sizing[1], **({} if partition is None else {"partition": partition}))
        self._sizing = (None, 0)
        self._batch_started = time.perf_counter()

    def batch_sizing(self, size: int, timed_out: int = 0) -> None:
        """The size chosen for the batch about to be reported (an apply's or revert's), and the
        size of an attempt of it that timed out (0: none); the next ``batch_done`` event says so."""
        self._sizing = (size, timed_out)

    def measured_rate(self, done: int) -> float | None:
        """Rows per second over the last 20 batches, pacing and holds included (wall time)."""
        self._marks.append((time.monotonic(), done))
        del self._marks[:-21]
        (t0, d0), (t1, d1) = self._marks[0], self._marks[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 and d1 > d0 else None

    def take_wait(self) -> dict[str, Any]:
        """How long pacing (``paced_ms``) and health checks (``held_ms``, the last
        ``hold_reason``) kept the run waiting since the previous call; then start counting anew."""
        wait = {"paced_ms": self._paced_ms, "held_ms": self._held_ms, "hold_reason": self._hold_reason}
        self._paced_ms = self._held_ms = 0.0
        self._hold_reason = None
        return wait

    @property
    def hold_reason(self) -> str | None:
        """Why the run is held now (or was, since its last batch was recorded); None: not held."""
        return self._hold_reason

    def _on_hold(self, reason: str) -> None:
        changed = reason != self._hold_reason
        self._hold_reason = reason
        if self._heartbeat is not None and (changed or time.monotonic() - self._last_beat >= 10.0):
            self._heartbeat()  # a writing run also records why it is held (the dashboard shows it)
            self._last_beat = time.monotonic()
        self.events.run_held(run_id=self._run_id, batch=self._batch, reason=reason,
                             held_ms=self._throttle.hold_s * 1000)
        if self.progress is not None:
            self.progress.hold(reason)

    def run_finished(self, status: str, totals: Mapping[str, int], message: str | None = None,
                     audit: AuditChain | None = None) -> None:
        """``audit``: how far an apply's or revert's audit hash chain got (its committed rows)."""
        duration_ms = (time.perf_counter() - self._started) * 1000
        self._fold_row_times()
        if status == RunStatus.FAILED:
            self.alerter.run_failed(self._job, self._run_id, message or "failed", totals)
        self.events.run_finished(run_id=self._run_id, status=status, totals=dict(totals),
                                 duration_ms=duration_ms, slowest=self.slowest,
                                 audit_rows=audit.rows if audit else None,
                                 audit_sha256=audit.sha256 if audit else None,
                                 message=message if status != RunStatus.SUCCEEDED else None)
        if self.progress is not None:
            self.progress.stop()
        self._heartbeat = None
        self._throttle = Throttle()

    def details(self) -> dict[str, Any]:
        """What ``fillgate show`` prints beyond the counts: slowest rows, first mismatch."""
        self._fold_row_times()
        out: dict[str, Any] = {"slowest": self.slowest.items()}
        if self.first_mismatch is not None:
            out["first_mismatch"] = self.first_mismatch
        return out

    def close(self) -> None:
        self.alerter.close()
        self.events.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
