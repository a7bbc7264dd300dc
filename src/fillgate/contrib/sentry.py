"""Alerts to Sentry through the official ``sentry-sdk`` (``pip install 'fillgate[sentry]'``,
``FILLGATE_SENTRY_DSN``)."""

from __future__ import annotations

import atexit
import collections
import datetime as dt
from typing import Any

from fillgate.alerts import Alert
from fillgate.errors import AlertDeliveryError, ConfigError, MissingExtraError


def _import_sentry() -> Any:
    try:
        import sentry_sdk
    except ImportError:
        raise MissingExtraError(
            "the Sentry alert sink needs the sentry-sdk package: pip install 'fillgate[sentry]' "
            "(or unset FILLGATE_SENTRY_DSN)."
        ) from None
    return sentry_sdk


class SentrySink:
    """Sends each alert as one Sentry event through the official ``sentry-sdk``.

    The event's fingerprint is the alert's (so Sentry groups by job + kind), its level the
    alert's, tags ``job``, ``kind``, ``run_id`` (and ``batch``), extras ``counts``, ``example``
    and ``anomalies``. Breadcrumbs: the sink leaves one per alert sent, and every event carries at
    most ``max_breadcrumbs`` of them (the host application's included).

    With ``dsn``, the sink uses a client of its own (no integrations, nothing global is
    patched). Without it, it uses the client the application set up with ``sentry_sdk.init``.
    ``client_options`` go to ``sentry_sdk.Client`` (e.g. ``transport=``, ``environment=``).
    """

    def __init__(self, dsn: str | None = None, *, max_breadcrumbs: int = 10, **client_options: Any) -> None:
        sentry_sdk = _import_sentry()
        self._sdk = sentry_sdk
        self.max_breadcrumbs = max_breadcrumbs
        self._crumbs: collections.deque[dict[str, Any]] = collections.deque(maxlen=max_breadcrumbs)
        self._client: Any = None
        if dsn:
            options: dict[str, Any] = {
                "default_integrations": False,
                "auto_enabling_integrations": False,
                "max_breadcrumbs": max_breadcrumbs,
                **client_options,
            }
            try:
                self._client = sentry_sdk.Client(dsn, **options)
            except Exception as exc:
                raise ConfigError(f"FILLGATE_SENTRY_DSN is not a valid Sentry DSN: {exc}") from None
            atexit.register(self.close)
        elif client_options:
            raise ConfigError("SentrySink client options need a dsn; without one the app's Sentry client is used.")
        elif not (sentry_sdk.get_client().is_active() and sentry_sdk.get_client().dsn):
            raise ConfigError(
                "SentrySink has no DSN: set FILLGATE_SENTRY_DSN, pass dsn=..., or call sentry_sdk.init() first."
            )

    def send(self, alert: Alert) -> None:
        sdk = self._sdk
        event: dict[str, Any] = {
            "message": alert.message,
            "level": alert.level,
            "logger": "fillgate.alerts",
            "fingerprint": [alert.fingerprint],
            "tags": {"job": alert.job, "kind": alert.kind, "run_id": alert.run_id,
                     **({"batch": str(alert.batch)} if alert.batch is not None else {})},
            "extra": {"counts": alert.counts, "example": alert.example, "anomalies": alert.anomalies},
            "breadcrumbs": {"values": list(self._crumbs)},
        }
        cap = self.max_breadcrumbs

        def trim(evt: dict[str, Any], _hint: Any) -> dict[str, Any]:
            crumbs = evt.get("breadcrumbs")
            if isinstance(crumbs, dict) and isinstance(crumbs.get("values"), list):
                crumbs["values"] = crumbs["values"][-cap:] if cap else []
            return evt

        with sdk.isolation_scope() as isolation, sdk.new_scope() as scope:
            if self._client is not None:
                # a client of its own sends fillgate's breadcrumbs only, never the process's
                isolation.clear_breadcrumbs()
                scope.clear_breadcrumbs()
                scope.set_client(self._client)
            scope.add_event_processor(trim)
            event_id = sdk.capture_event(event)
        if event_id is None and self._client is not None and not self._client.is_active():
            raise AlertDeliveryError("the Sentry client is not active; the alert was dropped.")
        self._crumbs.append({
            "category": "fillgate.alert", "level": alert.level, "message": alert.message[:200],
            "timestamp": _now_iso(), "data": {"kind": alert.kind, "batch": alert.batch},
        })

    def flush(self, timeout: float = 2.0) -> None:
        client = self._client or self._sdk.get_client()
        client.flush(timeout=timeout)

    def close(self) -> None:
        """Send what is queued (at most 2 s); a client of its own is closed."""
        if self._client is not None:
            client, self._client = self._client, None
            client.close(timeout=2.0)
            atexit.unregister(self.close)
        else:
            self._sdk.flush(timeout=2.0)


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat()
