"""Alerts to a webhook: each alert POSTed as a JSON object (``FILLGATE_ALERT_WEBHOOK``)."""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping

from fillgate.alerts import Alert
from fillgate.errors import AlertDeliveryError, ConfigError
from fillgate.redact import redact_url


def _safe_url(url: str) -> str:
    """scheme://host[:port]/… — webhook paths and queries often hold secrets."""
    return redact_url(url, hide_path=True)


class WebhookSink:
    """POSTs each alert as a JSON object (:meth:`Alert.to_dict`) to ``url``.

    Any 2xx answer is success; anything else raises
    :class:`~fillgate.errors.AlertDeliveryError` (the URL is never shown in full).
    """

    def __init__(self, url: str, timeout: float = 5.0, headers: Mapping[str, str] | None = None) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"alert webhook must be an http(s) URL, got {parts.scheme or 'no scheme'}:// "
                "(check FILLGATE_ALERT_WEBHOOK)."
            )
        self.url = url
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json", "User-Agent": "fillgate", **(headers or {})}

    def send(self, alert: Alert) -> None:
        body = alert.to_json().encode("utf-8")
        request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
        where = _safe_url(self.url)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                status = response.status
        except urllib.error.HTTPError as exc:
            exc.close()  # it holds the response's socket
            raise AlertDeliveryError(f"alert webhook {where} answered HTTP {exc.code}.") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AlertDeliveryError(f"alert webhook {where} unreachable: {reason}.") from None
        if not 200 <= status < 300:
            raise AlertDeliveryError(f"alert webhook {where} answered HTTP {status}.")

    def __repr__(self) -> str:
        return f"WebhookSink({_safe_url(self.url)})"
