"""Run events as JSON lines, for people with ``jq`` and for scripts.

``--events FILE`` (or ``-`` for stdout) writes one JSON object per line, flushed as soon as it
is written, so ``tail -f FILE | jq`` follows a run live. A file is appended to, never
truncated: several runs can share one file, told apart by ``run_id``.

Every event starts with the same two fields, then its own:

``event``  the event type (below).
``ts``     when it was written: ISO 8601 in UTC with milliseconds, e.g.
           ``"2024-05-01T12:00:00.123Z"``.

The event types and their fields (names are stable; new fields may be added):

``run_started``
    ``run_id``          the run's ULID.
    ``kind``            ``plan``, ``apply`` or ``revert`` (``fillgate run`` writes a plan run,
                        then an apply run; a resumed run keeps its kind).
    ``job``             the job's name (``module:Class``).
    ``target``          the target's name.
    ``environment``     the target's environment.
    ``total_estimate``  plan: rows expected (a cheap estimate from catalog statistics,
                        never a COUNT); null if unknown. apply, revert: the changes left to write.

``batch_done`` (one per batch)
    ``run_id``            the run.
    ``batch``             the batch number, from 1.
    ``rows``              plan: source rows read and computed in the batch (a page);
                          apply, revert: changes in the batch.
    ``writes``            changes written (apply) or proposed (plan).
    ``unchanged``         values already equal to the proposal.
    ``skipped``           values the policy left alone (e.g. FillMissing on a filled value).
    ``disagreements``     known stored values that differ from a known new value (Promote).
    ``preserved``         known stored values a NULL / unknown / failed value did not replace.
    ``conflicts``         rows changed since the plan (compare-and-set failed); left alone.
    ``errors``            plan: rows whose compute or lookup failed, or that propose a value
                          their column cannot hold exactly; apply: rows the database rejected
                          or stored differently from the plan (rolled back).
    ``unexpected_index``  rows whose lookup result was missing, extra, duplicated or out of
                          place; never written.
    ``elapsed_ms``        time spent on the batch, throttling excluded.
    ``held_ms``           time spent after the batch in throttling: rate pacing, the pause
                          between batches and health-check holds.
    ``batch_size``        apply, revert: the size chosen for the batch (``--batch-size``, or
                          with ``--chunk-time`` the adaptive size; the last batch may hold
                          fewer ``rows``); null for a plan.
    ``timed_out``         apply, revert: the size of an attempt of this batch that timed out
                          and was rolled back (the batch is its first quarter); 0 if none.

``run_held`` (when a health check holds the run; once per poll while held)
    ``run_id``   the run.
    ``batch``    the last batch done.
    ``reason``   why, e.g. ``"replication lag 12.3s > 5s"``.
    ``held_ms``  how long this hold has lasted so far.

``run_finished``
    ``run_id``       the run.
    ``status``       ``planned``, ``succeeded``, ``failed``, ``paused`` or ``cancelled``.
    ``totals``       the run's counts. plan: ``rows``, ``writes``, ``unchanged``, ``skipped``,
                     ``disagreements``, ``preserved``, ``errors``, ``unexpected_index`` (the
                     ``batch_done`` counts summed) and any the plan adds; apply, revert:
                     ``applied``, ``conflicts``, ``errors`` (of the whole run,
                     resumes included).
    ``duration_ms``  wall time of the run.
    ``slowest``      the 10 slowest rows, slowest first: ``[{"key": [...], "ms": 812.4}, ...]``
                     (compute and lookup time of the row).
    ``audit_rows``   apply, revert: the audit rows the run has written (committed batches,
                     resumes included); null for a plan run, or a run started before the
                     ledger kept tamper evidence.
    ``audit_sha256`` apply, revert: the head of the run's audit hash chain over those rows
                     (the same value ``fillgate show`` prints); null when ``audit_rows`` is.
                     Kept outside the database, it is an anchor the database's owner cannot
                     rewrite: ``fillgate verify --events FILE`` checks the ledger against it.
    ``message``      why a run paused or failed (e.g. ``--critical-load``), else null.

``apply_checked`` (an apply, after its guards passed, before its first batch)
    ``run_id``     the apply run.
    ``approvals``  the approvals counted for a target with ``approvals = N``:
                   ``[{"operator": ..., "via": ..., "comment": ..., "at": ...}]`` (else ``[]``).
    ``rehearsal``  for a target with ``rehearse_on``: the rehearsal relied on (``target``,
                   ``run_id``, ``plan_id``, ``differences`` per kind), or ``{"skipped": true}``
                   with ``--skip-rehearsal``; null otherwise.
    ``canary``     with ``--canary N``: ``{"changes": N, "verify_sql": ...}``; null otherwise.

``canary_paused`` (a canary run paused after its canary, once it was verified)
    ``run_id``    the run.
    ``done``      changes processed (the canary's).
    ``total``     the plan's changes.
    ``verified``  true if the verification passed (the run waits for ``fillgate resume``);
                  false if it failed (the run stays paused: revert or resume it).
    ``problems``  what the verification found, or null.

Values JSON lacks are written for reading, not for round trips: dates and times in ISO 8601,
tuples and sets as lists, bytes as hex, anything else (Decimal, UUID, ...) as its ``str()``;
NaN and infinities as null.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import heapq
import itertools
import json
import math
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from fillgate.errors import UsageError
from fillgate.redact import mask_secrets

EVENT_FIELDS: dict[str, tuple[str, ...]] = {
    "run_started": ("run_id", "kind", "job", "target", "environment", "total_estimate"),
    "batch_done": (
        "run_id", "batch", "rows", "writes", "unchanged", "skipped", "disagreements", "preserved",
        "conflicts", "errors", "unexpected_index", "elapsed_ms", "held_ms", "batch_size", "timed_out",
    ),
    "run_held": ("run_id", "batch", "reason", "held_ms"),
    "run_finished": ("run_id", "status", "totals", "duration_ms", "slowest", "audit_rows", "audit_sha256",
                     "message"),
    "apply_checked": ("run_id", "approvals", "rehearsal", "canary"),
    "canary_paused": ("run_id", "done", "total", "verified", "problems"),
}
"""The documented fields of each event type, in the order they are written."""

BATCH_COUNTS = EVENT_FIELDS["batch_done"][2:-4]
"""The per-batch counts of ``batch_done`` (``rows`` .. ``unexpected_index``)."""


def _default(value: Any) -> Any:
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    return str(value)


def _clean(value: Any) -> Any:
    """NaN and infinities are not JSON: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


_encoder = json.JSONEncoder(default=_default, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def utc_timestamp(now: dt.datetime | None = None) -> str:
    """``2024-05-01T12:00:00.123Z``."""
    now = now or dt.datetime.now(dt.UTC)
    return now.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class EventWriter:
    """Writes run events as JSON lines to a file, ``-`` (stdout), an open text stream, or
    nowhere (``None``: every call is a no-op, so callers need no ``if``)."""

    def __init__(
        self,
        target: str | Path | TextIO | None,
        *,
        clock: Callable[[], dt.datetime] | None = None,
    ) -> None:
        self._clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self._lock = threading.Lock()
        self._owned = False
        self._where = "-" if str(target) == "-" else str(target) if isinstance(target, str | Path) else "the stream"
        self._stream: TextIO | None
        if target is None:
            self._stream = None
        elif isinstance(target, str | Path):
            if str(target) == "-":
                self._stream = sys.stdout
            else:
                path = Path(target)
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    self._stream = path.open("a", encoding="utf-8")
                except OSError as exc:
                    raise UsageError(f"cannot write events to {path}: {exc.strerror or exc}.") from None
                self._owned = True
        else:
            self._stream = target
        self.count = 0

    @property
    def enabled(self) -> bool:
        return self._stream is not None

    def emit(self, event: str, **fields: Any) -> None:
        """Write ``{"event": event, "ts": ..., **fields}`` as one line, flushed at once."""
        if self._stream is None:
            return
        if "ts" in fields:
            raise UsageError("event field 'ts' is set by the writer; use another name.")
        record = {"event": event, "ts": utc_timestamp(self._clock()), **fields}
        line = mask_secrets(_encoder.encode(_clean(record)))  # a password in a message never reaches the file
        with self._lock:
            try:
                self._stream.write(line + "\n")
                self._stream.flush()
            except OSError as exc:  # a full disk, a closed pipe: say so (the run stops, recorded as failed)
                self._stream = None  # no further event (the run's end is recorded in the ledger)
                raise UsageError(f"cannot write events to {self._where}: {exc.strerror or exc}.") from None
            self.count += 1

    # --- the documented events, with their fields spelled out ------------------------------

    def run_started(
        self, *, run_id: str, kind: str, job: str, target: str, environment: str,
        total_estimate: int | None, **extra: Any,
    ) -> None:
        self.emit("run_started", run_id=run_id, kind=kind, job=job, target=target,
                  environment=environment, total_estimate=total_estimate, **extra)

    def batch_done(
        self, *, run_id: str, batch: int, counts: Mapping[str, Any], elapsed_ms: float,
        held_ms: float = 0.0, batch_size: int | None = None, timed_out: int = 0, **extra: Any,
    ) -> None:
        """``counts`` gives the batch counts; a count it lacks is written as 0."""
        fields = {name: counts.get(name, 0) for name in BATCH_COUNTS}
        self.emit("batch_done", run_id=run_id, batch=batch, **fields,
                  elapsed_ms=round(elapsed_ms, 3), held_ms=round(held_ms, 3), batch_size=batch_size,
                  timed_out=timed_out, **extra)

    def run_held(self, *, run_id: str, batch: int, reason: str, held_ms: float, **extra: Any) -> None:
        self.emit("run_held", run_id=run_id, batch=batch, reason=reason, held_ms=round(held_ms, 3), **extra)

    def run_finished(
        self, *, run_id: str, status: str, totals: Mapping[str, Any], duration_ms: float,
        slowest: SlowestRows | Sequence[Mapping[str, Any]] = (), audit_rows: int | None = None,
        audit_sha256: str | None = None, message: str | None = None, **extra: Any,
    ) -> None:
        rows = slowest.items() if isinstance(slowest, SlowestRows) else list(slowest)
        self.emit("run_finished", run_id=run_id, status=status, totals=dict(totals),
                  duration_ms=round(duration_ms, 3), slowest=rows, audit_rows=audit_rows,
                  audit_sha256=audit_sha256, message=message, **extra)

    def close(self) -> None:
        """Close a file this writer opened; a stream it was given (or stdout) stays open."""
        with self._lock:
            stream, self._stream = self._stream, None
        if stream is not None and self._owned:
            with contextlib.suppress(OSError):  # what could not be written was reported when it was written
                stream.close()

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SlowestRows:
    """The ``n`` slowest rows seen: a bounded min-heap of ``(ms, key)``, O(log n) per row."""

    def __init__(self, n: int = 10) -> None:
        if n < 1:
            raise UsageError(f"SlowestRows keeps at least one row, got n={n}.")
        self.n = n
        self._heap: list[tuple[float, int, Any]] = []
        self._seq = itertools.count()  # ties never compare keys (they may not be comparable)

    def add(self, ms: float, key: Any) -> None:
        heap = self._heap
        if len(heap) < self.n:
            heapq.heappush(heap, (ms, next(self._seq), key))
        elif ms > heap[0][0]:
            heapq.heapreplace(heap, (ms, next(self._seq), key))

    def update(self, other: SlowestRows) -> None:
        """Merge the rows another tracker kept (e.g. one per batch into one per run)."""
        for ms, _, key in other._heap:
            self.add(ms, key)

    def items(self) -> list[dict[str, Any]]:
        """Slowest first: ``[{"key": [...], "ms": 812.4}, ...]``; a tuple key becomes a list."""
        ordered = sorted(self._heap, key=lambda item: (-item[0], item[1]))
        return [{"key": list(key) if isinstance(key, tuple) else key, "ms": round(ms, 3)}
                for ms, _, key in ordered]

    def __len__(self) -> int:
        return len(self._heap)
