"""Issue 3 end to end, through the CLI and the library, on every backend: batched lookups
against a real local HTTP service that can misbehave (zero wrong writes, the unexpected_index
bucket, exactly one alert per bad batch to a real webhook), lookup failures and retries, run
events (``--events FILE|-``), ``fillgate show``, throttling (``--hold-while``, ``--max-hold``,
``--rate``) and the progress bar."""

from __future__ import annotations

import gzip
import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from sqlalchemy.engine import Connection
from typer.testing import CliRunner

from fillgate.alerts import Alerter
from fillgate.events import EVENT_FIELDS, EventWriter
from fillgate.fingerprints import anomaly_fingerprint as fingerprint
from fillgate.monitor import Monitor
from fillgate.report import RichProgress
from fillgate.throttle import Throttle

from conftest import TestDB, run_cli

N = 20  # people; pages and lookup calls of 5: ids 1-5, 6-10, 11-15, 16-20
BAR = ("━", "╸", "╺")  # what a Rich progress bar is drawn with

ENRICH_JOBS = '''
import json
import urllib.error
import urllib.request

from fillgate import FillMissing, Job, Lookup, Overwrite, Param


class ServiceDown(ConnectionError):
    """HTTP 5xx: transient, retried."""


class BadRequest(ValueError):
    """HTTP 4xx: not transient, fails the call at once."""


def service(url):
    def fetch(ids):
        body = json.dumps({"inputs": ids}).encode()
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return json.loads(response.read())["results"]
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code >= 500:
                raise ServiceDown(f"lookup service answered HTTP {exc.code}") from None
            raise BadRequest(f"lookup service answered HTTP {exc.code}") from None
    return fetch


class EnrichEmail(Job):
    table = "people"
    key = ("id",)
    columns = {"email": FillMissing()}
    source = "SELECT id, name, email FROM people"
    params = {"url": Param(str)}
    page_size = 5

    def build_lookup(self, ctx):
        return Lookup(service(self.args["url"]), input=lambda row: row["id"], batch_size=5,
                      concurrency=2, timeout=5, retries=2, backoff=0.01, transient=(ServiceDown,))

    def compute(self, row, ctx):
        return {"email": ctx.result["email"]}


class ReconcileEmail(EnrichEmail):
    columns = {"email": Overwrite()}


class EnrichEmailByKey(EnrichEmail):
    def build_lookup(self, ctx):
        return Lookup(service(self.args["url"]), input=lambda row: row["id"], batch_size=5,
                      match_by="id", retries=0)
'''


def email_of(i: int) -> str:
    """What the service says person ``i``'s email is."""
    return f"user{i}@svc.example"


# --- a real batch lookup service, with faults on demand ----------------------------------------

# For a call of 5 inputs, the positions whose result is wrong in each faulty mode.
FAULTS: dict[str, set[int]] = {
    "healthy": set(),
    "drop": {2, 3, 4},  # the result at position 2 is left out: 2, 3, 4 hold the wrong index
    "swap": {1, 2},  # the results at positions 1 and 2 change places
    "short": {4},  # N-1 results: the last one is missing
    "duplicate": {2, 3},  # position 3 repeats position 2's result (index 2 twice)
}


class LookupService:
    """``POST {"inputs": [id, ...]}`` -> ``{"results": [{"index": i, "id": id, "email": ...}]}``.

    A call whose first input is in ``faulty`` gets ``mode``'s fault; a call containing an id in
    ``fail`` answers 503 every time; in ``flaky``, 503 on its first attempt only; in ``bad``, 400.
    """

    def __init__(self) -> None:
        self.mode = "healthy"
        self.faulty: set[int] = set()
        self.fail: set[int] = set()
        self.flaky: set[int] = set()
        self.bad: set[int] = set()
        self.attempts: dict[int, int] = {}  # first input of a call -> attempts seen
        self.lock = threading.Lock()
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                ids = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["inputs"]
                status, results = service.answer(ids)
                body = json.dumps({"results": results}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/lookup"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def answer(self, ids: list[int]) -> tuple[int, list[dict[str, Any]]]:
        with self.lock:
            attempt = self.attempts[ids[0]] = self.attempts.get(ids[0], 0) + 1
        if self.fail & set(ids) or (self.flaky & set(ids) and attempt == 1):
            return 503, []
        if self.bad & set(ids):
            return 400, []
        results = [{"index": i, "id": x, "email": email_of(x)} for i, x in enumerate(ids)]
        if ids[0] in self.faulty:
            if self.mode == "drop":
                del results[2]
            elif self.mode == "swap":
                results[1], results[2] = results[2], results[1]
            elif self.mode == "short":
                results.pop()
            elif self.mode == "duplicate":
                results[3] = dict(results[2])
        return 200, results

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class AlertHook:
    """A webhook receiver: keeps the JSON body of every POST."""

    def __init__(self) -> None:
        self.alerts: list[dict[str, Any]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                hook.alerts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts/token"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def take(self) -> list[dict[str, Any]]:
        """The alerts received so far (and forget them)."""
        taken, self.alerts = self.alerts, []
        return taken

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def svc() -> Iterator[LookupService]:
    service = LookupService()
    yield service
    service.close()


@pytest.fixture
def hook(monkeypatch: pytest.MonkeyPatch) -> Iterator[AlertHook]:
    receiver = AlertHook()
    monkeypatch.setenv("FILLGATE_ALERT_WEBHOOK", receiver.url)
    monkeypatch.delenv("FILLGATE_SENTRY_DSN", raising=False)
    yield receiver
    receiver.close()


@pytest.fixture
def enrich(tmp_path: Path) -> str:
    """The jobs module; returns the ``file.py`` part of a job spec."""
    path = tmp_path / "enrich_jobs.py"
    path.write_text(ENRICH_JOBS)
    return str(path)


# --- helpers -------------------------------------------------------------------------------------


def setup(db: TestDB, cli: CliRunner, n: int = N, with_email_every: int | None = None) -> Path:
    db.create_people(n, with_email_every=with_email_every or n + 1)
    cfg = db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0
    return cfg


def events(path: Path | str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def select(items: list[dict[str, Any]], event: str, *fields: str) -> list[dict[str, Any]]:
    """``jq -c 'select(.event == EVENT) | {FIELDS}'``."""
    return [{f: e[f] for f in fields} if fields else e for e in items if e["event"] == event]


def by_run(items: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The events of each run, in order (a ``run`` command writes a plan run then an apply run)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for e in items:
        out.setdefault(e["run_id"], []).append(e)
    return out


def emails(db: TestDB) -> dict[int, str | None]:
    return {int(i): e for i, e in db.rows("SELECT id, email FROM people ORDER BY id")}


def plan_lines(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    header, *body = (json.loads(line) for line in path.read_text().splitlines())
    return header, body


def show_json(cli: CliRunner, cfg: Path, run_id: str) -> dict[str, Any]:
    shown = run_cli(cli, cfg, "show", run_id, "--json")
    assert shown.exit_code == 0, shown.output
    return json.loads(shown.stdout)


def affected_ids(mode: str, faulty_calls: tuple[int, ...]) -> set[int]:
    return {first + pos for first in faulty_calls for pos in FAULTS[mode]}


def wait_for(what: str, check: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


# --- 1. a misbehaving lookup service never causes a wrong write ----------------------------------


def test_faulty_lookup_service_writes_nothing_wrong_and_alerts_once_per_bad_batch(
    db: TestDB, cli: CliRunner, svc: LookupService, hook: AlertHook, enrich: str
) -> None:
    cfg = setup(db, cli)
    job = f"{enrich}:EnrichEmail"
    svc.faulty = {6, 16}  # the 2nd and 4th call (and page) of every run
    expected_fp = fingerprint("enrich_jobs:EnrichEmail", "unexpected_index")
    for mode, hit in FAULTS.items():
        db.execute("UPDATE people SET email = NULL")
        svc.mode = mode
        bad = affected_ids(mode, (6, 16))
        where = f"mode {mode}"

        done = run_cli(cli, cfg, "run", job, "-p", f"url={svc.url}", "-o", f"{mode}.plan",
                       "--batch-size", "4", "--events", f"{mode}.jsonl", "--json")
        assert done.exit_code == (1 if bad else 0), (where, done.output)
        applied = json.loads(done.stdout)
        assert applied["counts"]["applied"] == N - len(bad), where

        # Zero wrong writes: every written value is its own row's; the rows hit are not written.
        stored = emails(db)
        assert {i for i, e in stored.items() if e is None} == bad, where
        assert all(e == email_of(i) for i, e in stored.items() if e is not None), where
        audited = db.rows("SELECT row_key, new_value FROM fillgate_changes WHERE run_id = :r",
                          {"r": applied["run_id"]})
        assert len(audited) == N - len(bad), where
        assert all(json.loads(new) == email_of(json.loads(key)[0]) for key, new in audited), where

        # The unexpected_index bucket: in the plan file, the ledger, show --json and the events.
        header, body = plan_lines(Path(f"{mode}.plan"))
        plan_id = header["plan_id"]
        assert header["counts"]["unexpected_index"] == len(bad), where
        unexpected = [line for line in body if line["kind"] == "unexpected_index"]
        assert sorted(line["key"][0] for line in unexpected) == sorted(bad), where
        assert not {line["key"][0] for line in body if line["kind"] == "change"} & bad, where
        assert show_json(cli, cfg, plan_id)["counts"]["unexpected_index"] == len(bad), where
        logged = db.rows("SELECT row_key, phase, error_type FROM fillgate_errors WHERE run_id = :r",
                         {"r": plan_id})
        assert sorted(json.loads(k)[0] for k, _, _ in logged) == sorted(bad), where
        assert {(p, t) for _, p, t in logged} <= {("lookup", "UnexpectedIndex")}, where
        runs = by_run(events(f"{mode}.jsonl"))
        plan_batches = select(runs[plan_id], "batch_done")
        assert [b["unexpected_index"] for b in plan_batches] == [0, len(hit), 0, len(hit)], where
        assert select(runs[plan_id], "run_finished")[0]["totals"]["unexpected_index"] == len(bad), where

        # Exactly one alert per affected batch (never one per row), with a stable fingerprint.
        alerts = hook.take()
        if not bad:
            assert alerts == [], where
            continue
        assert [(a["kind"], a["batch"], a["run_id"]) for a in alerts] == [
            ("unexpected_index", 2, plan_id), ("unexpected_index", 4, plan_id)], where
        assert {a["fingerprint"] for a in alerts} == {expected_fp}, where
        assert all(a["counts"]["unexpected_index"] == len(hit) for a in alerts), where
        assert alerts[0]["example"]["key"] == [6 + min(hit)], where
        assert alerts[0]["level"] == "error"

        # A second run misaligns again: same rows held back, same fingerprint.
        again = run_cli(cli, cfg, "plan", job, "-p", f"url={svc.url}", "--json")
        assert again.exit_code == 1, (where, again.output)
        assert json.loads(again.stdout)["counts"]["unexpected_index"] == len(bad), where
        second = hook.take()
        assert [a["batch"] for a in second] == [2, 4], where
        assert {a["fingerprint"] for a in second} == {expected_fp}, where
        assert second[0]["run_id"] != plan_id


def test_lookup_matched_by_key_ignores_order_and_holds_back_a_missing_result(
    db: TestDB, cli: CliRunner, svc: LookupService, hook: AlertHook, enrich: str
) -> None:
    cfg = setup(db, cli, n=10)
    svc.faulty = {1, 6}
    svc.mode = "swap"  # order does not matter when results are matched by "id"
    done = run_cli(cli, cfg, "run", f"{enrich}:EnrichEmailByKey", "-p", f"url={svc.url}", "-o", "k.plan")
    assert done.exit_code == 0, done.output
    assert emails(db) == {i: email_of(i) for i in range(1, 11)}
    assert hook.take() == []

    db.execute("UPDATE people SET email = NULL")
    svc.mode = "drop"  # the result of the 3rd id of each call is missing: only that row is held back
    done = run_cli(cli, cfg, "run", f"{enrich}:EnrichEmailByKey", "-p", f"url={svc.url}", "-o", "k2.plan")
    assert done.exit_code == 1, done.output
    assert emails(db) == {i: None if i in (3, 8) else email_of(i) for i in range(1, 11)}
    header, body = plan_lines(Path("k2.plan"))
    assert header["counts"]["unexpected_index"] == 2
    assert sorted(line["key"] for line in body if line["kind"] == "unexpected_index") == [[3], [8]]
    alerts = hook.take()
    assert [(a["kind"], a["batch"], a["counts"]["unexpected_index"]) for a in alerts] == [
        ("unexpected_index", 1, 1), ("unexpected_index", 2, 1)]


class SentryRelay:
    """Receives what the real sentry-sdk sends for a DSN pointing here: the events of its envelopes."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        relay = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                lines = body.split(b"\n")
                for header, payload in zip(lines[1::2], lines[2::2], strict=False):
                    if json.loads(header).get("type") == "event":
                        relay.events.append(json.loads(payload))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.dsn = f"http://public@127.0.0.1:{self.server.server_address[1]}/1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_sentry_dsn_gets_one_event_per_bad_batch_through_the_real_sdk(
    sqlite_db: TestDB, cli: CliRunner, svc: LookupService, enrich: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("sentry_sdk")
    relay = SentryRelay()
    monkeypatch.setenv("FILLGATE_SENTRY_DSN", relay.dsn)
    monkeypatch.delenv("FILLGATE_ALERT_WEBHOOK", raising=False)
    try:
        cfg = setup(sqlite_db, cli)
        svc.faulty, svc.mode = {6, 16}, "drop"
        planned = run_cli(cli, cfg, "plan", f"{enrich}:EnrichEmail", "-p", f"url={svc.url}", "--json")
        assert planned.exit_code == 1, planned.output
        run_id = json.loads(planned.stdout)["run_id"]
        # the sink's client is closed (its queue sent) when the command ends
        got = sorted(relay.events, key=lambda e: e["tags"]["batch"])
    finally:
        relay.close()
    assert [(e["tags"]["kind"], e["tags"]["batch"], e["tags"]["run_id"]) for e in got] == [
        ("unexpected_index", "2", run_id), ("unexpected_index", "4", run_id)]
    assert {tuple(e["fingerprint"]) for e in got} == {(fingerprint("enrich_jobs:EnrichEmail", "unexpected_index"),)}
    assert all(e["level"] == "error" and e["extra"]["counts"]["unexpected_index"] == 3 for e in got)
    assert len(got[1]["breadcrumbs"]["values"]) == 1  # the first alert, left as a breadcrumb


# --- 2. lookup failures: row errors, never a NULL write; transient errors are retried ------------


def test_failed_lookup_is_a_row_error_and_a_transient_one_is_retried(
    db: TestDB, cli: CliRunner, svc: LookupService, hook: AlertHook, enrich: str
) -> None:
    cfg = setup(db, cli, with_email_every=1)  # every person has a stored email old{i}@x.org
    svc.fail = {6}  # ids 6-10: 503 on every attempt (transient, retried twice, then a row error)
    svc.bad = {11}  # ids 11-15: 400 (not transient: one attempt, then a row error)
    svc.flaky = {16}  # ids 16-20: 503 once, then a good answer
    done = run_cli(cli, cfg, "run", f"{enrich}:ReconcileEmail", "-p", f"url={svc.url}", "-o", "r.plan",
                   "--events", "r.jsonl")
    assert done.exit_code == 1, done.output
    assert svc.attempts == {1: 1, 6: 3, 11: 1, 16: 2}

    failed = set(range(6, 16))
    assert emails(db) == {i: f"old{i}@x.org" if i in failed else email_of(i) for i in range(1, N + 1)}
    changed = {json.loads(k)[0] for (k,) in db.rows("SELECT row_key FROM fillgate_changes")}
    assert changed == set(range(1, N + 1)) - failed
    assert db.scalar("SELECT count(*) FROM fillgate_changes WHERE new_value IS NULL OR new_value = 'null'") == 0

    header, body = plan_lines(Path("r.plan"))
    plan_id = header["plan_id"]
    assert header["counts"]["errors"] == 10 and header["counts"]["unexpected_index"] == 0
    assert sorted(line["key"][0] for line in body if line["kind"] == "error") == sorted(failed)
    errors = db.rows("SELECT row_key, phase, error_type, message FROM fillgate_errors WHERE run_id = :r",
                     {"r": plan_id})
    assert {json.loads(k)[0]: (phase, kind) for k, phase, kind, _ in errors} == {
        **{i: ("lookup", "ServiceDown") for i in range(6, 11)},
        **{i: ("lookup", "BadRequest") for i in range(11, 16)},
    }
    assert all("HTTP" in message for *_, message in errors)
    groups = show_json(cli, cfg, plan_id)["error_groups"]
    assert sorted((g["error_type"], g["count"]) for g in groups) == [("BadRequest", 5), ("ServiceDown", 5)]

    # One alert per bad batch, of kind "errors"; none for the batch that only needed a retry.
    alerts = hook.take()
    assert [(a["kind"], a["batch"], a["counts"]["errors"]) for a in alerts] == [("errors", 2, 5), ("errors", 3, 5)]
    assert {a["fingerprint"] for a in alerts} == {fingerprint("enrich_jobs:ReconcileEmail", "errors")}
    plan_batches = select(by_run(events("r.jsonl"))[plan_id], "batch_done", "batch", "writes", "errors")
    assert plan_batches == [{"batch": 1, "writes": 5, "errors": 0}, {"batch": 2, "writes": 0, "errors": 5},
                            {"batch": 3, "writes": 0, "errors": 5}, {"batch": 4, "writes": 5, "errors": 0}]


# --- 3. run events: --events FILE and --events - -------------------------------------------------


def _check_fields(event: dict[str, Any]) -> None:
    assert list(event)[:2] == ["event", "ts"]
    assert event["ts"].endswith("Z")
    assert set(EVENT_FIELDS[event["event"]]) <= set(event), event


def test_events_file_follows_a_run_with_every_documented_field(
    db: TestDB, cli: CliRunner, svc: LookupService, enrich: str
) -> None:
    cfg = setup(db, cli, n=12)
    done = run_cli(cli, cfg, "run", f"{enrich}:EnrichEmail", "-p", f"url={svc.url}", "-o", "e.plan",
                   "--batch-size", "5", "--events", "events.jsonl")
    assert done.exit_code == 0, done.output
    items = events("events.jsonl")
    for event in items:
        _check_fields(event)
    assert [e["event"] for e in items] == [
        "run_started", "batch_done", "batch_done", "batch_done", "run_finished",  # the plan: pages of 5
        "apply_checked",  # the apply's guards passed (no approvals, rehearsal or canary asked for here)
        "run_started", "batch_done", "batch_done", "batch_done", "run_finished",  # the apply: batches of 5
    ]
    checked = items[5]
    assert (checked["approvals"], checked["rehearsal"], checked["canary"]) == ([], None, None)
    plan_id = plan_lines(Path("e.plan"))[0]["plan_id"]
    (plan_run, plan), (apply_run, apply) = by_run([e for e in items if e["event"] != "apply_checked"]).items()
    assert checked["run_id"] == apply_run
    assert plan_run == plan_id and apply_run != plan_id
    assert plan[0]["kind"] == "plan" and apply[0]["kind"] == "apply"
    for started in (plan[0], apply[0]):
        assert started["job"] == "enrich_jobs:EnrichEmail"
        assert (started["target"], started["environment"]) == ("staging", "staging")
    assert apply[0]["total_estimate"] == 12  # the apply knows its plan's change count
    assert plan[0]["total_estimate"] is None or isinstance(plan[0]["total_estimate"], int)

    # jq -c 'select(.event=="batch_done") | {batch, rows, writes, unexpected_index}'
    assert select(plan, "batch_done", "batch", "rows", "writes", "unexpected_index") == [
        {"batch": 1, "rows": 5, "writes": 5, "unexpected_index": 0},
        {"batch": 2, "rows": 5, "writes": 5, "unexpected_index": 0},
        {"batch": 3, "rows": 2, "writes": 2, "unexpected_index": 0},
    ]
    assert select(apply, "batch_done", "batch", "rows", "writes", "conflicts") == [
        {"batch": 1, "rows": 5, "writes": 5, "conflicts": 0},
        {"batch": 2, "rows": 5, "writes": 5, "conflicts": 0},
        {"batch": 3, "rows": 2, "writes": 2, "conflicts": 0},
    ]
    assert all(b["elapsed_ms"] >= 0 and b["held_ms"] == 0 for b in select(items, "batch_done"))

    finished = select(items, "run_finished")
    assert [f["status"] for f in finished] == ["planned", "succeeded"]
    assert finished[0]["totals"]["rows"] == 12 and finished[0]["totals"]["writes"] == 12
    assert finished[1]["totals"]["applied"] == 12
    assert all(f["duration_ms"] > 0 for f in finished)
    slowest = finished[0]["slowest"]
    assert len(slowest) == 10
    assert all(isinstance(s["key"], list) and len(s["key"]) == 1 and s["ms"] >= 0 for s in slowest)
    assert len({s["key"][0] for s in slowest}) == 10, "a row is listed once, with its lookup + compute time"
    assert [s["ms"] for s in slowest] == sorted((s["ms"] for s in slowest), reverse=True)
    assert finished[1]["slowest"] == []  # apply computes nothing


def test_events_to_stdout_are_pure_json_lines_and_people_read_stderr(
    db: TestDB, cli: CliRunner, svc: LookupService, enrich: str
) -> None:
    cfg = setup(db, cli, n=7)
    done = run_cli(cli, cfg, "run", f"{enrich}:EnrichEmail", "-p", f"url={svc.url}", "-o", "s.plan",
                   "--batch-size", "3", "--events", "-")
    assert done.exit_code == 0, done.output
    items = [json.loads(line) for line in done.stdout.splitlines()]  # every line is JSON
    assert [e["event"] for e in items].count("batch_done") == 2 + 3
    assert [e["status"] for e in select(items, "run_finished")] == ["planned", "succeeded"]
    assert "Plan " in done.stderr and "Apply run" in done.stderr and "succeeded" in done.stderr


# --- 4. fillgate show: anomalies, the first mismatch, the slowest rows ----------------------------


def test_show_prints_unexpected_index_first_mismatch_and_slowest_rows(
    db: TestDB, cli: CliRunner, svc: LookupService, hook: AlertHook, enrich: str
) -> None:
    cfg = setup(db, cli, n=10)
    svc.faulty, svc.mode = {6}, "swap"
    planned = run_cli(cli, cfg, "plan", f"{enrich}:EnrichEmail", "-p", f"url={svc.url}", "--json")
    assert planned.exit_code == 1, planned.output
    plan_id = json.loads(planned.stdout)["run_id"]
    assert len(hook.take()) == 1

    shown = show_json(cli, cfg, plan_id)
    assert shown["counts"]["unexpected_index"] == 2
    first = shown["details"]["first_mismatch"]
    assert (first["key"], first["expected"], first["got"]) == ([7], 1, 2)
    assert "position 1 has index 2" in first["message"]
    slowest = shown["details"]["slowest"]  # once per row (lookup + compute); 7 and 8 never got that far
    assert sorted(s["key"][0] for s in slowest) == [1, 2, 3, 4, 5, 6, 9, 10]
    assert [s["ms"] for s in slowest] == sorted((s["ms"] for s in slowest), reverse=True)

    human = run_cli(cli, cfg, "show", plan_id)
    assert human.exit_code == 0, human.output
    text = " ".join(human.stdout.split())
    assert "unexpected_index │ 2" in text
    assert "2 rows had an unexpected lookup index (never written); first: key 7: expected 1, got 2" in text
    assert "slowest rows (compute + lookup)" in text
    # 80 columns: the error groups do not fit a table with every field whole, so one block each
    assert "errors and conflicts by fingerprint" in text and "phase lookup" in text
    assert [(g["phase"], g["error_type"], g["count"]) for g in shown["error_groups"]] == [
        ("lookup", "UnexpectedIndex", 2)]


# --- 5. throttling: --hold-while, --max-hold, --rate ----------------------------------------------


def _planned(db: TestDB, cli: CliRunner, cfg: Path, jobs: str) -> None:
    db.execute("CREATE TABLE control_flag (hold INTEGER NOT NULL)")
    db.execute("INSERT INTO control_flag (hold) VALUES (1)")
    planned = run_cli(cli, cfg, "plan", f"{jobs}:FillEmail", "-o", "p.plan")
    assert planned.exit_code == 0, planned.output


def test_hold_while_holds_until_the_flag_clears(
    db: TestDB, cli: CliRunner, jobs_file: Path, hook: AlertHook
) -> None:
    cfg = setup(db, cli, n=9)
    _planned(db, cli, cfg, str(jobs_file))

    def release() -> None:
        wait_for("a run_held event", lambda: Path("h.jsonl").exists() and select(events("h.jsonl"), "run_held"))
        db.execute("UPDATE control_flag SET hold = 0")

    releaser = threading.Thread(target=release)
    releaser.start()
    done = run_cli(cli, cfg, "apply", "p.plan", "--batch-size", "4", "--events", "h.jsonl",
                   "--hold-while", "SELECT hold FROM control_flag")
    releaser.join()
    assert done.exit_code == 0, done.output
    assert db.scalar("SELECT count(*) FROM people WHERE email IS NULL") == 0
    items = events("h.jsonl")
    held = select(items, "run_held")
    assert held and all(h["reason"] == "SELECT hold FROM control_flag" and h["batch"] == 1 for h in held)
    batches = select(items, "batch_done")
    assert [b["writes"] for b in batches] == [4, 4, 1]
    assert batches[0]["held_ms"] >= 500  # polled at least once more after the hold began
    assert select(items, "run_finished")[0]["status"] == "succeeded"
    assert hook.take() == []


def test_max_hold_stops_the_run_and_keeps_committed_batches_audited(
    db: TestDB, cli: CliRunner, jobs_file: Path, hook: AlertHook
) -> None:
    cfg = setup(db, cli, n=9)
    _planned(db, cli, cfg, str(jobs_file))
    done = run_cli(cli, cfg, "apply", "p.plan", "--batch-size", "4", "--events", "m.jsonl",
                   "--hold-while", "SELECT hold FROM control_flag", "--max-hold", "1")
    assert done.exit_code == 3, done.output
    run_id, status, message = db.rows("SELECT run_id, status, message FROM fillgate_runs WHERE kind = 'apply'")[0]
    said = " ".join(done.stderr.split())
    assert "held for" in said and "longer than the maximum of 1s" in said
    assert f"Resume it once the database is healthy: fillgate resume {run_id}" in said
    assert status == "failed" and "held for" in message
    written = db.rows("SELECT id FROM people WHERE email IS NOT NULL ORDER BY id")
    assert written == [(1,), (2,), (3,), (4,)]  # the first batch, committed before the hold
    audited = db.rows("SELECT row_key FROM fillgate_changes WHERE run_id = :r ORDER BY row_key", {"r": run_id})
    assert [json.loads(k)[0] for (k,) in audited] == [1, 2, 3, 4]
    items = events("m.jsonl")
    assert select(items, "run_held") and select(items, "run_finished")[0]["status"] == "failed"
    alerts = hook.take()
    assert [(a["kind"], a["run_id"], a["batch"]) for a in alerts] == [("run_failed", run_id, None)]
    assert alerts[0]["fingerprint"] == fingerprint("jobs:FillEmail", "run_failed")

    db.execute("UPDATE control_flag SET hold = 0")  # healthy again: the run resumes where it stopped
    resumed = run_cli(cli, cfg, "resume", run_id, "--hold-while", "SELECT hold FROM control_flag")
    assert resumed.exit_code == 0, resumed.output
    assert db.scalar("SELECT count(*) FROM people WHERE email IS NULL") == 0
    assert db.scalar("SELECT count(*) FROM fillgate_changes WHERE run_id = :r", {"r": run_id}) == 9


def test_a_health_check_that_cannot_work_refuses_before_anything_is_written(
    db: TestDB, cli: CliRunner, jobs_file: Path
) -> None:
    cfg = setup(db, cli, n=5)
    planned = run_cli(cli, cfg, "plan", f"{jobs_file}:FillEmail", "-o", "p.plan")
    assert planned.exit_code == 0, planned.output
    refused = run_cli(cli, cfg, "apply", "p.plan", "--batch-size", "2",
                      "--hold-while", "SELECT hold FROM no_such_table")
    assert refused.exit_code == 2, refused.output
    assert "health check query 'SELECT hold FROM no_such_table' failed" in " ".join(refused.stderr.split())
    if db.backend != "postgresql":
        refused = run_cli(cli, cfg, "apply", "p.plan", "--batch-size", "2", "--max-replication-lag", "5")
        assert refused.exit_code == 2, refused.output
        said = " ".join(refused.stderr.split())
        assert ("only PostgreSQL has" if db.backend == "sqlite" else "list them under the target") in said
    assert db.scalar("SELECT count(*) FROM people WHERE email IS NOT NULL") == 0
    assert db.scalar("SELECT count(*) FROM fillgate_runs WHERE kind = 'apply'") == 0
    both = run_cli(cli, cfg, "apply", "p.plan", "--events", "-", "--json")
    assert both.exit_code == 2 and "both write to stdout" in both.stderr
    assert db.scalar("SELECT count(*) FROM fillgate_runs WHERE kind = 'apply'") == 0


def test_a_jobs_own_health_checks_hold_its_apply(sqlite_db: TestDB, cli: CliRunner) -> None:
    db = sqlite_db
    cfg = setup(db, cli, n=6)
    db.execute("CREATE TABLE control_flag (hold INTEGER NOT NULL)")
    db.execute("INSERT INTO control_flag (hold) VALUES (0)")
    Path("held_jobs.py").write_text(
        "from fillgate import FillMissing, Job\n"
        "from fillgate.throttle import SQLCheck\n\n\n"
        "class FillEmail(Job):\n"
        "    table = 'people'\n"
        "    columns = {'email': FillMissing()}\n"
        "    source = 'SELECT id, name, email FROM people'\n"
        "    health_checks = [SQLCheck('SELECT hold FROM control_flag')]\n\n"
        "    def compute(self, row, ctx):\n"
        "        return {'email': row['name'].lower() + '@example.com'}\n"
    )
    planned = run_cli(cli, cfg, "plan", "held_jobs.py:FillEmail", "-o", "p.plan")
    assert planned.exit_code == 0, planned.output
    db.execute("UPDATE control_flag SET hold = 1")
    done = run_cli(cli, cfg, "apply", "p.plan", "--batch-size", "3", "--max-hold", "0")
    assert done.exit_code == 3, done.output
    assert db.scalar("SELECT count(*) FROM people WHERE email IS NOT NULL") == 3


def test_rate_and_pause_slow_a_run_measurably(db: TestDB, cli: CliRunner, jobs_file: Path) -> None:
    cfg = setup(db, cli, n=10)
    planned = run_cli(cli, cfg, "plan", f"{jobs_file}:FillEmail", "-o", "p.plan")
    assert planned.exit_code == 0, planned.output
    started = time.perf_counter()
    done = run_cli(cli, cfg, "apply", "p.plan", "--batch-size", "5", "--rate", "20", "--events", "r.jsonl")
    took = time.perf_counter() - started
    assert done.exit_code == 0, done.output
    assert took >= 10 / 20 * 0.9  # 10 rows at 20 rows/s
    items = events("r.jsonl")
    assert select(items, "run_finished")[0]["duration_ms"] >= 450
    batches = select(items, "batch_done")
    assert len(batches) == 2
    assert sum(b["elapsed_ms"] + b["held_ms"] for b in batches) >= 450  # paced time is accounted for
    assert db.scalar("SELECT count(*) FROM people WHERE email IS NULL") == 0

    db.execute("UPDATE people SET email = NULL")
    done = run_cli(cli, cfg, "run", f"{jobs_file}:FillEmail", "-o", "q.plan", "--batch-size", "4",
                   "--pause-between-batches", "100", "--events", "q.jsonl")
    assert done.exit_code == 0, done.output
    batches = select(events("q.jsonl"), "batch_done")
    assert len(batches) == 1 + 3 and all(b["held_ms"] >= 95 for b in batches)  # the plan's page, 3 batches


# --- 6. the progress bar -------------------------------------------------------------------------


def test_progress_bar_only_on_a_terminal_and_never_with_json(
    db: TestDB, cli: CliRunner, svc: LookupService, enrich: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fillgate.cli
    import fillgate.report

    cfg = setup(db, cli, n=6)
    args = ("run", f"{enrich}:EnrichEmail", "-p", f"url={svc.url}", "--batch-size", "2")
    made: list[RichProgress] = []

    class Recorded(RichProgress):
        def __init__(self, console: Console) -> None:
            super().__init__(console)
            made.append(self)

    monkeypatch.setattr(fillgate.report, "RichProgress", Recorded)  # the CLI takes it from there when it runs
    # CliRunner's output is not a terminal: no bar.
    done = run_cli(cli, cfg, *args, "-o", "a.plan")
    assert done.exit_code == 0, done.output
    assert made == []
    assert "plan enrich_jobs:EnrichEmail" not in done.output and "apply enrich_jobs" not in done.output
    assert "\x1b[" not in done.output and "\r" not in done.output

    # stderr on a terminal: a bar for the plan and the apply, drawn on stderr only.
    terminal = io.StringIO()
    monkeypatch.setattr(fillgate.cli, "err", Console(file=terminal, force_terminal=True, width=100))
    db.execute("UPDATE people SET email = NULL")
    done = run_cli(cli, cfg, *args, "-o", "b.plan")
    assert done.exit_code == 0, done.output
    assert len(made) == 1 and made[0]._bar is None  # one bar, stopped at the end
    drawn = terminal.getvalue()
    assert "plan enrich_jobs:EnrichEmail" in drawn and "apply enrich_jobs:EnrichEmail" in drawn
    assert any(ch in drawn for ch in BAR)
    assert "plan enrich_jobs" not in done.stdout

    # --json: never a bar, even on a terminal.
    db.execute("UPDATE people SET email = NULL")
    done = run_cli(cli, cfg, *args, "-o", "c.plan", "--json")
    assert done.exit_code == 0, done.output
    assert len(made) == 1
    json.loads(done.stdout)


class Healthy:
    """A check that holds for ``n`` polls."""

    def __init__(self, n: int) -> None:
        self.n = n

    def check(self, conn: Connection) -> str | None:
        self.n -= 1
        return "replication lag 12.3s > 5s" if self.n >= 0 else None


class _Conn:
    def rollback(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_rich_progress_on_a_terminal_shows_the_bar_the_count_and_why_a_run_is_held() -> None:
    buffer = io.StringIO()
    console = Console(force_terminal=True, file=buffer, width=120, color_system=None)
    progress = RichProgress(console)
    seen_while_held: list[str] = []

    def nap(seconds: float) -> None:  # the throttle's sleep while held: draw the bar, look at it
        assert progress._bar is not None
        progress._bar.refresh()
        seen_while_held.append(buffer.getvalue())

    stream = io.StringIO()
    monitor = Monitor(events=EventWriter(stream), alerter=Alerter([]), progress=progress)
    monitor.run_started("R1", "apply", "jobs:FillEmail", "staging", "staging", 10,
                        throttle=Throttle(checks=[Healthy(2)], poll_s=0.01, sleep=nap))
    assert console.is_terminal
    monitor.batch_done({"rows": 4, "writes": 4}, 4, lambda: _Conn())  # type: ignore[arg-type]
    monitor.batch_done({"rows": 6, "writes": 6}, 10, lambda: _Conn())  # type: ignore[arg-type]
    assert progress._bar is not None
    progress._bar.refresh()
    final = buffer.getvalue()
    monitor.run_finished("succeeded", {"applied": 10})
    assert progress._bar is None
    assert any(ch in final for ch in BAR)
    assert "apply jobs:FillEmail" in final and "4/10" in final and "10/10" in final
    assert len(seen_while_held) == 2  # two polls while held, then healthy
    assert all("held: replication lag 12.3s > 5s" in s for s in seen_while_held)
    assert "held:" not in final[len(seen_while_held[-1]):]  # the note goes once the run goes on
    held = [json.loads(line) for line in stream.getvalue().splitlines() if '"run_held"' in line]
    assert [(h["reason"], h["batch"]) for h in held] == [("replication lag 12.3s > 5s", 1)] * 2
