"""Optional integrations: alert sinks (a webhook, Sentry) and health checks that only one
database has (PostgreSQL's replication lag). Each module imports its third-party package only
when used, and says which extra to install when it is missing."""

from __future__ import annotations

import os
from collections.abc import Mapping

from fillgate.alerts import AlertSink


def sinks_from_env(environ: Mapping[str, str] | None = None) -> list[AlertSink]:
    """A WebhookSink if ``FILLGATE_ALERT_WEBHOOK`` is set, a SentrySink if
    ``FILLGATE_SENTRY_DSN`` is set (which needs ``pip install 'fillgate[sentry]'``)."""
    env = os.environ if environ is None else environ
    sinks: list[AlertSink] = []
    if webhook := env.get("FILLGATE_ALERT_WEBHOOK", "").strip():
        from fillgate.contrib.webhook import WebhookSink

        sinks.append(WebhookSink(webhook))
    if dsn := env.get("FILLGATE_SENTRY_DSN", "").strip():
        from fillgate.contrib.sentry import SentrySink

        sinks.append(SentrySink(dsn=dsn))
    return sinks
