"""Alerts: at most one per batch, with a fingerprint that groups them across runs and deploys.

An :class:`Alerter` looks at each batch's counts. When some count is over its threshold, it
sends ONE :class:`Alert` for the batch, never one per row, to every configured sink:

* ``kind`` is the most severe anomaly present, in this order:
  ``unexpected_index`` (lookup results that did not belong to their row) >
  ``extra_results`` (lookup results that belonged to no row) > ``errors`` > ``conflicts`` >
  ``disagreements`` > any other count given a threshold. Grouping by the most severe kind keeps
  a batch that misaligned AND disagreed in the same group as every other misaligned batch.
* ``anomalies`` lists every kind present, most severe first; ``message`` describes them all;
  ``counts`` has the whole batch's counts; ``example`` is the first example of ``kind``.
* ``fingerprint`` hashes only the job and the kind, so it is the same in every run and every
  deploy: the alerting system groups the alerts into one issue per job and kind.

A run failure sends one alert of kind ``run_failed``.

Sinks are pluggable: anything with ``send(alert)``. Built in, under ``fillgate.contrib``:
``webhook.WebhookSink`` (POST the alert as JSON) and ``sentry.SentrySink`` (the official
``sentry-sdk``, ``pip install 'fillgate[sentry]'``); ``fillgate.contrib.sinks_from_env`` builds
them from ``FILLGATE_ALERT_WEBHOOK`` and ``FILLGATE_SENTRY_DSN``. A sink that fails never breaks
the run: the failure is logged, warned about and counted, and after three failures in a row the
sink is switched off for the rest of the run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from fillgate.errors import ConfigError
from fillgate.fingerprints import anomaly_fingerprint
from fillgate.redact import mask_secrets

log = logging.getLogger("fillgate.alerts")

SEVERITY: tuple[str, ...] = (
    "unexpected_index", "extra_results", "errors", "conflicts", "disagreements",
)
"""Anomaly kinds, most severe first. Kinds given a threshold but not listed rank after these."""

DEFAULT_THRESHOLDS: dict[str, int | None] = {
    "unexpected_index": 0,
    "extra_results": 0,
    "errors": 0,
    "conflicts": None,
    "disagreements": 0,
}
"""A batch is anomalous when ``counts[kind] > threshold``; None switches a kind off."""

LEVELS = {"unexpected_index": "error", "extra_results": "error", "run_failed": "error"}
"""Alert level per kind; every other kind is a ``warning``."""

_DESCRIPTIONS = {
    "unexpected_index": "rows whose lookup result was missing, extra, duplicated or out of place (not written)",
    "extra_results": "lookup results that belonged to no row (ignored)",
    "errors": "row errors",
    "conflicts": "conflicts (rows changed since the plan; left alone)",
    "disagreements": "disagreements (known values that differ; not written)",
}

MAX_FAILURES_IN_A_ROW = 3


@dataclass
class Alert:
    """One alert: for one anomalous batch, or for a failed run (``batch`` None)."""

    kind: str
    job: str
    run_id: str
    batch: int | None
    fingerprint: str
    counts: dict[str, Any]
    example: dict[str, Any] | None
    message: str
    level: str = "warning"
    anomalies: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), default=str, ensure_ascii=False, sort_keys=False)


@runtime_checkable
class AlertSink(Protocol):
    """Where alerts go. ``send`` may raise; the Alerter contains the failure."""

    def send(self, alert: Alert) -> None: ...


class Alerter:
    """Turns batch counts into at most one alert per batch; see the module docstring.

    ``thresholds`` override :data:`DEFAULT_THRESHOLDS` per count name (None switches one off;
    any other count of the batch can be given one). ``max_alerts`` caps the batch alerts of
    one Alerter (None = no cap); suppressed alerts are counted in ``suppressed``.
    """

    def __init__(
        self,
        sinks: Sequence[AlertSink] = (),
        thresholds: Mapping[str, int | None] | None = None,
        *,
        max_alerts: int | None = None,
    ) -> None:
        for sink in sinks:
            if not callable(getattr(sink, "send", None)):
                raise ConfigError(f"alert sink {sink!r} has no send(alert) method.")
        self.sinks = list(sinks)
        self.thresholds: dict[str, int | None] = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
        self.max_alerts = max_alerts
        self.sent: list[Alert] = []
        self.suppressed = 0
        self.failures = 0
        self.delivered = 0
        self._failing: dict[int, int] = {}
        self._disabled: set[int] = set()

    @property
    def enabled(self) -> bool:
        return bool(self.sinks)

    def anomalies(self, counts: Mapping[str, Any]) -> list[str]:
        """The kinds over their threshold in ``counts``, most severe first."""
        extra = [k for k in self.thresholds if k not in SEVERITY]
        found = []
        for kind in (*SEVERITY, *extra):
            limit = self.thresholds.get(kind)
            value = counts.get(kind) or 0
            if limit is not None and isinstance(value, int | float) and value > limit:
                found.append(kind)
        return found

    def batch_done(
        self,
        job: str,
        run_id: str,
        batch_no: int,
        counts: Mapping[str, Any],
        examples: Mapping[str, Any] | None = None,
    ) -> Alert | None:
        """Send one alert if the batch has anomalies; return it (or None)."""
        found = self.anomalies(counts)
        if not found:
            return None
        kind = found[0]
        examples = examples or {}
        parts = []
        for name in found:
            limit = self.thresholds.get(name) or 0
            over = f" (threshold {limit})" if limit else ""
            parts.append(f"{counts.get(name)} {_DESCRIPTIONS.get(name, name)}{over}")
        message = f"{job}: batch {batch_no} of run {run_id} had " + "; ".join(parts) + "."
        first = examples.get(kind)
        if kind == "unexpected_index" and isinstance(first, Mapping) and "expected" in first:
            message += f" First mismatch: expected {first.get('expected')!r}, got {first.get('got')!r}."
        alert = Alert(
            kind=kind,
            job=job,
            run_id=run_id,
            batch=batch_no,
            fingerprint=anomaly_fingerprint(job, kind),
            counts=dict(counts),
            example=dict(first) if isinstance(first, Mapping) else first,
            message=message,
            level=LEVELS.get(kind, "warning"),
            anomalies=found,
        )
        if self.max_alerts is not None and len(self.sent) >= self.max_alerts:
            self.suppressed += 1
            return None
        self._deliver(alert)
        return alert

    def run_failed(self, job: str, run_id: str, message: str, counts: Mapping[str, Any] | None = None) -> Alert:
        """Send one alert for a failed run."""
        alert = Alert(
            kind="run_failed",
            job=job,
            run_id=run_id,
            batch=None,
            fingerprint=anomaly_fingerprint(job, "run_failed"),
            counts=dict(counts or {}),
            example=None,
            message=f"{job}: run {run_id} failed: {mask_secrets(message)}",
            level=LEVELS["run_failed"],
            anomalies=["run_failed"],
        )
        self._deliver(alert)
        return alert

    def close(self) -> None:
        """Flush and close the sinks that can be (e.g. Sentry's queue)."""
        for sink in self.sinks:
            closer = getattr(sink, "close", None)
            if callable(closer):
                try:
                    closer()
                except Exception as exc:
                    log.warning("closing alert sink %r failed: %s", sink, exc)

    def _deliver(self, alert: Alert) -> None:
        self.sent.append(alert)
        for sink in self.sinks:
            sid = id(sink)
            if sid in self._disabled:
                continue
            try:
                sink.send(alert)
            except Exception as exc:
                self.failures += 1
                self._failing[sid] = self._failing.get(sid, 0) + 1
                note = f"alert sink {sink!r} failed ({type(exc).__name__}: {exc}); the run carries on."
                if self._failing[sid] >= MAX_FAILURES_IN_A_ROW:
                    self._disabled.add(sid)
                    note += f" It failed {MAX_FAILURES_IN_A_ROW} times in a row and is off for the rest of the run."
                log.warning(note)
                warnings.warn(note, RuntimeWarning, stacklevel=3)
            else:
                self._failing[sid] = 0
                self.delivered += 1
