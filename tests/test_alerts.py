"""Alerts: one per anomalous batch, stable fingerprints, webhook and Sentry sinks for real."""

from __future__ import annotations

import json
import socket
import threading
import warnings
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import sentry_sdk
from sentry_sdk.envelope import Envelope
from sentry_sdk.transport import Transport

from fillgate.alerts import DEFAULT_THRESHOLDS, Alert, Alerter
from fillgate.contrib import sinks_from_env
from fillgate.contrib.sentry import SentrySink
from fillgate.contrib.webhook import WebhookSink
from fillgate.errors import AlertDeliveryError, ConfigError, MissingExtraError
from fillgate.fingerprints import anomaly_fingerprint as fingerprint
from fillgate.lookup import Lookup

CLEAN = {"rows": 100, "writes": 40, "unchanged": 60, "errors": 0, "unexpected_index": 0, "disagreements": 0}


class Recorder:
    """Keeps what a sink is sent."""

    def __init__(self) -> None:
        self.alerts: list[Alert] = []

    def send(self, alert: Alert) -> None:
        self.alerts.append(alert)


# --- the Alerter --------------------------------------------------------------------------------


def test_clean_batches_send_nothing() -> None:
    sink = Recorder()
    alerter = Alerter([sink])
    for n in range(1, 6):
        assert alerter.batch_done("jobs:FillAlbums", "R1", n, CLEAN, {}) is None
    assert sink.alerts == []


def test_one_alert_per_batch_covering_every_anomaly_with_the_most_severe_kind() -> None:
    sink = Recorder()
    alerter = Alerter([sink])
    counts = {**CLEAN, "unexpected_index": 3, "errors": 2, "disagreements": 5}
    examples = {
        "unexpected_index": {"key": [17], "expected": 4, "got": 5},
        "errors": {"key": [3], "message": "boom"},
    }
    alert = alerter.batch_done("jobs:FillAlbums", "R1", 7, counts, examples)
    assert sink.alerts == [alert]
    assert alert is not None
    assert alert.kind == "unexpected_index" and alert.level == "error"
    assert alert.anomalies == ["unexpected_index", "errors", "disagreements"]
    assert alert.fingerprint == fingerprint("jobs:FillAlbums", "unexpected_index")
    assert alert.example == {"key": [17], "expected": 4, "got": 5}
    assert alert.counts == counts and alert.batch == 7 and alert.run_id == "R1"
    assert alert.message == (
        "jobs:FillAlbums: batch 7 of run R1 had 3 rows whose lookup result was missing, extra, duplicated "
        "or out of place (not written); 2 row errors; 5 disagreements (known values that differ; not written). "
        "First mismatch: expected 4, got 5."
    )


def test_fingerprint_is_stable_per_job_and_kind_only() -> None:
    a = fingerprint("jobs:FillAlbums", "unexpected_index")
    assert a == fingerprint("jobs:FillAlbums", "unexpected_index")
    assert len(a) == 32 and int(a, 16) >= 0  # a plain hex string
    assert a != fingerprint("jobs:FillAlbums", "errors")
    assert a != fingerprint("jobs:Other", "unexpected_index")
    sink = Recorder()
    alerter = Alerter([sink])
    for run in ("R1", "R2"):
        alerter.batch_done("jobs:FillAlbums", run, 1, {**CLEAN, "disagreements": 1})
    assert len({x.fingerprint for x in sink.alerts}) == 1


def test_fingerprint_known_value() -> None:
    """Pinned: changing it would split every existing alert group in two."""
    import hashlib

    assert fingerprint("j", "errors") == hashlib.sha256(b"fillgate|j|errors").hexdigest()[:32]


def test_thresholds_are_configurable() -> None:
    sink = Recorder()
    alerter = Alerter([sink], {"errors": 10, "disagreements": None, "conflicts": 0, "preserved": 100})
    assert alerter.batch_done("j", "R", 1, {**CLEAN, "errors": 10, "disagreements": 99}) is None
    alert = alerter.batch_done("j", "R", 2, {**CLEAN, "errors": 11, "conflicts": 1, "preserved": 101})
    assert alert is not None and alert.anomalies == ["errors", "conflicts", "preserved"]
    assert alert.kind == "errors" and alert.level == "warning"
    assert "11 row errors (threshold 10)" in alert.message
    assert DEFAULT_THRESHOLDS["errors"] == 0  # the defaults are untouched


def test_extra_results_alert_even_when_every_row_aligned() -> None:
    alert = Alerter([Recorder()]).batch_done("j", "R", 1, {**CLEAN, "extra_results": 1})
    assert alert is not None and alert.kind == "extra_results" and alert.level == "error"


def test_run_failed_sends_one_alert() -> None:
    sink = Recorder()
    alert = Alerter([sink]).run_failed("j", "R9", "3 errors exceed --max-errors 2.", {"rows": 10, "errors": 3})
    assert sink.alerts == [alert]
    assert alert.kind == "run_failed" and alert.batch is None and alert.level == "error"
    assert alert.fingerprint == fingerprint("j", "run_failed")
    assert alert.message == "j: run R9 failed: 3 errors exceed --max-errors 2."


def test_a_failing_sink_never_breaks_the_run_and_is_switched_off_after_three() -> None:
    class Broken:
        calls = 0

        def send(self, alert: Alert) -> None:
            Broken.calls += 1
            raise AlertDeliveryError("webhook down")

    good = Recorder()
    alerter = Alerter([Broken(), good])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for n in range(1, 6):
            alerter.batch_done("j", "R", n, {**CLEAN, "errors": 1})
    assert len(good.alerts) == 5  # the other sink still gets everything
    assert Broken.calls == 3 and alerter.failures == 3 and alerter.delivered == 5
    assert any("off for the rest of the run" in str(w.message) for w in caught)


def test_max_alerts_caps_and_counts_the_rest() -> None:
    sink = Recorder()
    alerter = Alerter([sink], max_alerts=2)
    for n in range(1, 6):
        alerter.batch_done("j", "R", n, {**CLEAN, "errors": 1})
    assert len(sink.alerts) == 2 and alerter.suppressed == 3


def test_sink_without_send_is_refused() -> None:
    with pytest.raises(ConfigError, match="no send"):
        Alerter([object()])  # type: ignore[list-item]


# --- the webhook sink, against a real local HTTP server ------------------------------------------


class Hook:
    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.requests: list[dict[str, Any]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                hook.requests.append({"path": self.path, "headers": dict(self.headers),
                                      "body": json.loads(self.rfile.read(length))})
                self.send_response(hook.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/secret-token?x=1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook() -> Iterator[Hook]:
    server = Hook()
    yield server
    server.close()


def test_webhook_receives_exactly_the_alert_json(hook: Hook) -> None:
    alerter = Alerter([WebhookSink(hook.url)])
    counts = {**CLEAN, "unexpected_index": 2}
    alerter.batch_done("jobs:FillAlbums", "R1", 3, counts, {"unexpected_index": {"key": [9], "expected": 0, "got": 1}})
    alerter.run_failed("jobs:FillAlbums", "R1", "boom", counts)
    assert [r["path"] for r in hook.requests] == ["/hooks/secret-token?x=1"] * 2
    assert hook.requests[0]["headers"]["Content-Type"] == "application/json"
    assert hook.requests[0]["body"] == {
        "kind": "unexpected_index",
        "job": "jobs:FillAlbums",
        "run_id": "R1",
        "batch": 3,
        "fingerprint": fingerprint("jobs:FillAlbums", "unexpected_index"),
        "counts": counts,
        "example": {"key": [9], "expected": 0, "got": 1},
        "message": "jobs:FillAlbums: batch 3 of run R1 had 2 rows whose lookup result was missing, extra, "
                   "duplicated or out of place (not written). First mismatch: expected 0, got 1.",
        "level": "error",
        "anomalies": ["unexpected_index"],
    }
    assert hook.requests[1]["body"]["kind"] == "run_failed" and hook.requests[1]["body"]["batch"] is None
    assert alerter.delivered == 2 and alerter.failures == 0


def test_webhook_http_error_is_contained_and_hides_the_url() -> None:
    server = Hook(status=500)
    try:
        sink = WebhookSink(server.url)
        with pytest.raises(AlertDeliveryError) as info:
            sink.send(Alerter().run_failed("j", "R", "x"))
        assert "HTTP 500" in str(info.value) and "secret-token" not in str(info.value)
        alerter = Alerter([sink])
        with pytest.warns(RuntimeWarning, match="HTTP 500"):
            alerter.batch_done("j", "R", 1, {**CLEAN, "errors": 1})
        assert alerter.failures == 1
        assert "secret-token" not in repr(sink)
    finally:
        server.close()


def test_webhook_unreachable_is_contained() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    alerter = Alerter([WebhookSink(f"http://127.0.0.1:{port}/x", timeout=1)])
    with pytest.warns(RuntimeWarning, match="unreachable"):
        alerter.batch_done("j", "R", 1, {**CLEAN, "errors": 1})
    assert alerter.failures == 1


def test_webhook_needs_an_http_url() -> None:
    with pytest.raises(ConfigError, match="http"):
        WebhookSink("ftp://example.org/x")


def test_sinks_from_env(hook: Hook) -> None:
    assert sinks_from_env({}) == []
    (sink,) = sinks_from_env({"FILLGATE_ALERT_WEBHOOK": hook.url})
    assert isinstance(sink, WebhookSink)
    sinks = sinks_from_env({"FILLGATE_ALERT_WEBHOOK": hook.url, "FILLGATE_SENTRY_DSN": "https://k@example.invalid/1"})
    assert [type(s) for s in sinks] == [WebhookSink, SentrySink]
    sinks[1].close()  # type: ignore[attr-defined]


# --- the Sentry sink, with the real sentry-sdk and a transport that keeps envelopes ---------------


class KeepEnvelopes(Transport):
    """A sentry-sdk transport that captures envelopes locally instead of sending them."""

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.envelopes: list[Envelope] = []

    def capture_envelope(self, envelope: Envelope) -> None:
        self.envelopes.append(envelope)

    def events(self) -> list[dict[str, Any]]:
        return [e.get_event() for e in self.envelopes if e.get_event() is not None]  # type: ignore[misc]


@pytest.fixture
def sentry_global() -> Iterator[KeepEnvelopes]:
    """``sentry_sdk.init`` as an application would, with the capturing transport."""
    transport = KeepEnvelopes()
    sentry_sdk.init(dsn="https://public@example.invalid/1", transport=transport, default_integrations=False)
    yield transport
    sentry_sdk.get_client().close()
    sentry_sdk.get_global_scope().set_client(None)  # back to no client


def test_sentry_event_per_anomalous_batch_with_fingerprint_tags_and_extras(sentry_global: KeepEnvelopes) -> None:
    alerter = Alerter([SentrySink()])
    alerter.batch_done("jobs:FillAlbums", "R1", 1, CLEAN, {})
    alerter.batch_done("jobs:FillAlbums", "R1", 2, {**CLEAN, "unexpected_index": 1, "disagreements": 2},
                       {"unexpected_index": {"key": [5], "expected": 3, "got": 4}})
    alerter.batch_done("jobs:FillAlbums", "R1", 3, CLEAN, {})
    alerter.batch_done("jobs:FillAlbums", "R1", 4, {**CLEAN, "errors": 1}, {"errors": {"key": [8]}})
    events = sentry_global.events()
    assert len(events) == 2
    first, second = events
    assert first["fingerprint"] == [fingerprint("jobs:FillAlbums", "unexpected_index")]
    assert first["level"] == "error"
    assert first["tags"] == {"job": "jobs:FillAlbums", "kind": "unexpected_index", "run_id": "R1", "batch": "2"}
    assert first["extra"]["counts"]["unexpected_index"] == 1
    assert first["extra"]["example"] == {"key": [5], "expected": 3, "got": 4}
    assert first["extra"]["anomalies"] == ["unexpected_index", "disagreements"]
    assert "batch 2 of run R1" in first["message"]
    assert second["fingerprint"] == [fingerprint("jobs:FillAlbums", "errors")]
    assert second["level"] == "warning" and second["tags"]["kind"] == "errors"


def test_five_hundred_misaligned_rows_make_one_sentry_event_not_500(sentry_global: KeepEnvelopes) -> None:
    """End to end: a service that shifts every index; the lookup marks all 500 rows, the
    alerter sends one event."""
    rows = [{"album": f"a{i}"} for i in range(500)]
    with Lookup(lambda xs: [{"index": i + 1} for i in range(len(xs))], input=lambda r: r["album"]) as lookup:
        batch = lookup.resolve(rows)
    assert batch.unexpected_index == 500
    alerter = Alerter([SentrySink()])
    counts = {"rows": 500, **batch.counts()}
    alerter.batch_done("jobs:FillAlbums", "R1", 1, counts, {"unexpected_index": batch.first_mismatch})
    events = sentry_global.events()
    assert len(events) == 1
    assert events[0]["extra"]["counts"]["unexpected_index"] == 500
    assert events[0]["extra"]["example"]["expected"] == 0 and events[0]["extra"]["example"]["got"] == 1


def test_same_fingerprint_across_runs(sentry_global: KeepEnvelopes) -> None:
    alerter = Alerter([SentrySink()])
    for run in ("R1", "R2", "R3"):
        alerter.batch_done("jobs:FillAlbums", run, 1, {**CLEAN, "disagreements": 1})
    prints = {tuple(e["fingerprint"]) for e in sentry_global.events()}
    runs = [e["tags"]["run_id"] for e in sentry_global.events()]
    assert len(prints) == 1 and runs == ["R1", "R2", "R3"]


def test_breadcrumbs_are_capped(sentry_global: KeepEnvelopes) -> None:
    for i in range(50):
        sentry_sdk.add_breadcrumb(message=f"app crumb {i}")
    sink = SentrySink(max_breadcrumbs=4)
    alerter = Alerter([sink], {"errors": 0})
    for n in range(1, 8):
        alerter.batch_done("j", "R", n, {**CLEAN, "errors": 1})
    last = sentry_global.events()[-1]
    crumbs = last["breadcrumbs"]["values"]
    assert len(crumbs) == 4
    assert sum(1 for c in crumbs if c.get("category") == "fillgate.alert") >= 1


def test_sentry_sink_with_its_own_dsn_leaves_the_global_client_alone() -> None:
    assert not sentry_sdk.get_client().dsn
    transport = KeepEnvelopes()
    sink = SentrySink(dsn="https://public@example.invalid/2", transport=transport, max_breadcrumbs=2)
    alert = Alerter([sink]).run_failed("j", "R", "3 errors exceed --max-errors 2.", {"errors": 3})
    (event,) = transport.events()
    assert event["fingerprint"] == [alert.fingerprint]
    assert event["level"] == "error" and event["tags"] == {"job": "j", "kind": "run_failed", "run_id": "R"}
    assert event["extra"]["counts"] == {"errors": 3}
    assert not sentry_sdk.get_client().dsn
    sink.close()


def test_sentry_sink_without_dsn_or_client_is_a_clear_error() -> None:
    assert not sentry_sdk.get_client().dsn
    with pytest.raises(ConfigError, match="FILLGATE_SENTRY_DSN"):
        SentrySink()


def test_sentry_sink_without_the_sdk_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_sentry(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "sentry_sdk" or name.startswith("sentry_sdk."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sentry)
    with pytest.raises(MissingExtraError, match=r"pip install 'fillgate\[sentry\]'"):
        SentrySink(dsn="https://public@example.invalid/1")
