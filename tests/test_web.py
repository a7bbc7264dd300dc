"""The web dashboard without a browser (Starlette's TestClient) against real databases:
token and host checks, CSRF, read-only, escaping, masked URLs, paging, plan review, revert
guards, /metrics; and the ledger queries the dashboard added (batch timeline, paged runs,
recorded actions) on every backend."""

from __future__ import annotations

import html
import json
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette")

from starlette.testclient import TestClient
from typer.testing import CliRunner

from fillgate import Limits, apply_plan, connect, init_target, load_job, make_plan
from fillgate.ledger import Run, new_run_id, utcnow

from conftest import JOBS, TestDB, dashboard_client, run_cli

SCRIPT = "<script>alert(1)</script>"
CSRF = re.compile(r'name="csrf" value="([0-9a-f]+)"')


def _csrf(client: TestClient, url: str) -> str:
    page = client.get(url)
    assert page.status_code == 200, page.text
    found = CSRF.search(page.text)
    assert found, page.text
    return found.group(1)


def _world(db: TestDB, cli: CliRunner, jobs_file: Path) -> dict[str, Any]:
    """20 people (odd ones without email, one named <script>), an applied FillEmail plan, and
    a FillKind plan saved to a file with two disagreements."""
    db.create_people(20)
    db.execute("UPDATE people SET name = :n WHERE id = 3", {"n": SCRIPT})
    db.execute("UPDATE people SET kind = 'weird' WHERE id IN (4, 7)")
    cfg = db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0
    planned = run_cli(cli, cfg, "plan", f"{jobs_file}:FillEmail", "-o", "email.plan", "--json")
    applied = run_cli(cli, cfg, "apply", "email.plan", "--json")
    assert applied.exit_code == 0, applied.output
    kinds = run_cli(cli, cfg, "plan", f"{jobs_file}:FillKind", "-o", "kind.plan", "--json")
    return {"db": db, "cfg": cfg, "plan": json.loads(planned.stdout), "apply": json.loads(applied.stdout),
            "kinds": json.loads(kinds.stdout)}


@pytest.fixture
def world(db: TestDB, cli: CliRunner, jobs_file: Path) -> dict[str, Any]:
    """The world on every backend: for pages and actions that read or write the database."""
    return _world(db, cli, jobs_file)


@pytest.fixture
def sqlite_world(sqlite_db: TestDB, cli: CliRunner, jobs_file: Path) -> dict[str, Any]:
    """The world on SQLite: for what does not depend on the backend (tokens, CSRF, plan files)."""
    return _world(sqlite_db, cli, jobs_file)


def test_pages_show_runs_with_full_ids_and_escape_values(world: dict[str, Any], tmp_path: Path) -> None:
    client, board = dashboard_client(world["cfg"], tmp_path)
    apply_id = world["apply"]["run_id"]
    runs = client.get("/t/staging/runs")
    assert runs.status_code == 200
    assert f">{apply_id}</a>" in runs.text and f">{world['plan']['run_id']}</a>" in runs.text
    assert "Runs 1\N{EN DASH}4 of 4" in runs.text

    history = client.get("/t/staging/history", params={"table": "people", "key": "3"})
    assert history.status_code == 200
    assert "&lt;script&gt;alert(1)&lt;/script&gt;@example.com" in history.text
    assert SCRIPT not in history.text
    assert apply_id in history.text

    plan_run = world["plan"]["run_id"]
    client.get(f"/t/staging/plans/{plan_run}")
    board.plans.wait()
    plan = client.get(f"/t/staging/plans/{plan_run}")
    assert plan.status_code == 200, plan.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;@example.com" in plan.text
    assert SCRIPT not in plan.text
    assert "Apply exactly this plan" not in plan.text  # it was applied: the page says by which run
    assert f"Applied by run <a class=\"id\" href=\"/t/staging/runs/{apply_id}\">{apply_id}</a>" in plan.text


def test_plan_review_filters_pages_and_finds_keys(sqlite_world: dict[str, Any], tmp_path: Path) -> None:
    client, board = dashboard_client(sqlite_world["cfg"], tmp_path)
    run_id = sqlite_world["kinds"]["run_id"]
    assert "Checking the plan file" in client.get(f"/t/staging/plans/{run_id}").text
    board.plans.wait()
    page = client.get(f"/t/staging/plans/{run_id}", params={"kind": "disagreement"})
    assert page.status_code == 200
    assert page.text.count('<tr class="k-disagreement">') == 2
    assert '<tr class="k-change">' not in page.text
    assert "weird" in page.text
    everything = client.get(f"/t/staging/plans/{run_id}")
    assert everything.text.count('<tr class="k-change">') == 18
    assert "fillgate --config" in everything.text and "--max-changes 18" in everything.text
    found = client.get(f"/t/staging/plans/{run_id}", params={"key": "7"})
    assert found.text.count('<tr class="k-') == 1 and "weird" in found.text
    second = client.get(f"/t/staging/plans/{run_id}", params={"page": "2"})
    assert "page 2 of 1" not in second.text and "<tr class=\"k-" not in second.text  # past the end: empty


def test_a_damaged_plan_file_is_refused(sqlite_world: dict[str, Any], tmp_path: Path) -> None:
    client, board = dashboard_client(sqlite_world["cfg"], tmp_path)
    path = sqlite_world["db"].tmp_path / "kind.plan"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]))  # truncated
    client.get("/plan", params={"path": str(path)})
    board.plans.wait()
    page = client.get("/plan", params={"path": str(path)})
    assert page.status_code == 409
    assert "does not match its header" in page.text and "truncated" in page.text
    missing = client.get("/plan", params={"path": str(tmp_path / "nope.plan")})
    assert missing.status_code == 409 and "cannot read plan file" in missing.text


def test_token_required_off_loopback(sqlite_world: dict[str, Any], tmp_path: Path) -> None:
    client, _ = dashboard_client(sqlite_world["cfg"], tmp_path, token="s3cret-token", loopback=False)
    for url in ("/", "/t/staging/runs", "/metrics"):
        denied = client.get(url)
        assert denied.status_code == 401, url
        assert "staging" not in denied.text or url == "/"  # no data without the token
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
    # a browser: ?token= sets a cookie and takes the token out of the address bar
    first = client.get("/t/staging/runs", params={"token": "s3cret-token"}, follow_redirects=False)
    assert first.status_code == 303 and first.headers["location"] == "/t/staging/runs"
    assert client.get("/t/staging/runs").status_code == 200


def test_foreign_host_refused_on_loopback(sqlite_world: dict[str, Any], tmp_path: Path) -> None:
    client, _ = dashboard_client(sqlite_world["cfg"], tmp_path)
    assert client.get("/", headers={"Host": "evil.example"}).status_code == 400
    assert client.get("/", headers={"Host": "localhost:8642"}).status_code == 200


def test_actions_need_csrf_and_read_only_refuses(sqlite_world: dict[str, Any], tmp_path: Path) -> None:
    db = sqlite_world["db"]
    apply_id = sqlite_world["apply"]["run_id"]
    client, _ = dashboard_client(sqlite_world["cfg"], tmp_path)
    page = f"/t/staging/runs/{apply_id}/revert"
    no_token = client.post(page, data={})
    assert no_token.status_code == 403 and "CSRF" in no_token.text
    wrong = client.post(page, data={"csrf": "0" * 64})
    assert wrong.status_code == 403
    not_ascii = client.post(page, data={"csrf": "\N{LATIN SMALL LETTER E WITH ACUTE}" * 64})
    assert not_ascii.status_code == 403 and "CSRF" in not_ascii.text
    assert db.scalar("SELECT count(*) FROM fillgate_runs WHERE kind = 'revert'") == 0
    assert db.scalar("SELECT count(*) FROM people WHERE email IS NOT NULL") == 20

    ro, _ = dashboard_client(sqlite_world["cfg"], tmp_path, read_only=True)
    run_page = ro.get(f"/t/staging/runs/{apply_id}")
    assert run_page.status_code == 200 and "Revert…" not in run_page.text and 'name="csrf"' not in run_page.text
    token = CSRF.search(client.get(page).text).group(1)  # type: ignore[union-attr]
    refused = ro.post(page, data={"csrf": token})
    assert refused.status_code == 403 and "read-only" in refused.text
    assert db.scalar("SELECT count(*) FROM fillgate_runs WHERE kind = 'revert'") == 0


def test_revert_on_a_protected_target_needs_the_environment_name(
    db: TestDB, cli: CliRunner, jobs_file: Path, tmp_path: Path,
) -> None:
    db.create_people(10)
    cfg = db.config({"live": {"environment": "live", "protected": True, "max_changes": 100}})
    assert run_cli(cli, cfg, "init", "--confirm", "live").exit_code == 0
    assert run_cli(cli, cfg, "plan", f"{jobs_file}:FillEmail", "-o", "p.plan").exit_code == 0
    applied = run_cli(cli, cfg, "apply", "p.plan", "--confirm", "live", "--json")
    apply_id = json.loads(applied.stdout)["run_id"]
    assert db.scalar("SELECT count(*) FROM people WHERE email IS NULL") == 0
    client, board = dashboard_client(cfg, tmp_path)
    url = f"/t/live/runs/{apply_id}/revert"
    preview = client.get(url)
    assert "5</strong> of 5 fields would be restored" in preview.text
    token = CSRF.search(preview.text).group(1)  # type: ignore[union-attr]
    refused = client.post(url, data={"csrf": token, "confirm": "staging"})
    assert refused.status_code == 409
    assert "protected environment &#39;live&#39;" in refused.text and "Nothing was written" in refused.text
    assert db.scalar("SELECT count(*) FROM people WHERE email IS NULL") == 0
    assert db.scalar("SELECT count(*) FROM fillgate_runs WHERE kind = 'revert'") == 0
    done = client.post(url, data={"csrf": token, "confirm": "live"}, follow_redirects=False)
    assert done.status_code == 303, done.text
    board.runner.join()
    revert_id = done.headers["location"].split("/runs/")[1].split("?")[0]
    assert db.scalar("SELECT count(*) FROM people WHERE email IS NULL") == 5
    assert db.rows("SELECT kind, status, operator FROM fillgate_runs WHERE run_id = :r", {"r": revert_id})[0][:2] == (
        "revert", "succeeded")
    operator = db.scalar("SELECT operator FROM fillgate_runs WHERE run_id = :r", {"r": revert_id})
    assert "via web (" in operator
    actions = db.rows("SELECT action, outcome FROM fillgate_actions WHERE run_id = :r ORDER BY id", {"r": apply_id})
    assert [a for a, _ in actions] == ["revert", "revert"]
    assert actions[0][1].startswith("refused:") and revert_id in actions[1][1]
    shown = client.get(f"/t/live/runs/{revert_id}")
    assert "succeeded" in shown.text and "Batch timeline" in shown.text


def test_targets_show_refused_and_unreachable_without_passwords(
    sqlite_db: TestDB, cli: CliRunner, tmp_path: Path,
) -> None:
    db = sqlite_db
    good = db.config({"staging": {}})
    assert run_cli(cli, good, "init").exit_code == 0
    cfg = db.config({
        "staging": {},
        "claims_live": {"url": db.url, "environment": "live"},
        "gone": {"url": "postgresql://app:hunter2-secret@127.0.0.1:1/nowhere"},
    }, name="many.toml")
    client, _ = dashboard_client(cfg, tmp_path)
    page = client.get("/")
    assert page.status_code == 200
    assert "hunter2-secret" not in page.text and "***" in page.text
    section = page.text.split('data-target="claims_live"')[1].split("</section>")[0]
    assert "refused" in section and "stamped &#39;staging&#39;" in section
    gone = page.text.split('data-target="gone"')[1].split("</section>")[0]
    assert "unreachable" in gone and "cannot connect" in gone
    runs = client.get("/t/claims_live/runs")
    assert runs.status_code == 409 and "refused" in runs.text
    unreachable = client.get("/t/gone/runs")
    assert unreachable.status_code == 503
    assert "hunter2-secret" not in unreachable.text and "Traceback" not in unreachable.text


def test_metrics(world: dict[str, Any], tmp_path: Path) -> None:
    client, _ = dashboard_client(world["cfg"], tmp_path)
    text = client.get("/metrics").text
    job = next(r["job"] for r in [world["plan"]])
    assert f'fillgate_changes_applied_total{{job="{job}",target="staging"}} 10.0' in text
    assert f'fillgate_rows_scanned_total{{job="{job}",target="staging"}} 20.0' in text
    assert f'fillgate_unexpected_index_total{{job="{job}",target="staging"}} 0.0' in text
    assert 'fillgate_target_up{target="staging"} 1.0' in text
    assert f'fillgate_runs{{job="{job}",kind="apply",status="succeeded",target="staging"}} 1.0' in text


def test_runs_are_paged_and_filtered(sqlite_db: TestDB, cli: CliRunner, tmp_path: Path) -> None:
    db = sqlite_db
    cfg = db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0
    ledger = connect(db.target()).ledger
    ids = []
    for i in range(120):
        run = Run(run_id=new_run_id(), kind="plan" if i % 3 else "apply", target="staging", environment="staging",
                  operator="me", status="planned" if i % 3 else "succeeded", job=f"job{i % 2}", created_at=utcnow())
        ledger.create_run(run)
        ids.append(run.run_id)
    client, _ = dashboard_client(cfg, tmp_path)
    first = client.get("/t/staging/runs")
    assert "Runs 1\N{EN DASH}50 of 121" in first.text and ids[-1] in first.text and ids[0] not in first.text
    last = client.get("/t/staging/runs", params={"page": "3"})
    assert "Runs 101\N{EN DASH}121 of 121" in last.text and ids[0] in last.text
    assert last.text.count('class="run-row"') == 21
    applies = client.get("/t/staging/runs", params={"kind": "apply", "job": "job0"})
    assert "of 20," in applies.text and applies.text.count('class="run-row"') == 20
    bad = client.get("/t/staging/runs", params={"status": "bogus"})
    assert bad.status_code == 400 and "unknown run status" in bad.text


# --- ledger queries added for the dashboard, on every backend --------------------------------


def test_batch_timeline_and_paged_runs(db: TestDB, jobs_file: Path) -> None:
    db.create_people(23, with_email_every=100)
    target = db.target()
    init_target(target)
    conn = connect(target)
    job = load_job(f"{jobs_file}:FillEmail")
    planned = make_plan(conn, job, out=db.tmp_path / "p.plan")
    applied = apply_plan(conn, planned.path, Limits(batch_size=5))
    ledger = conn.ledger
    batches = ledger.batches(applied.run.run_id)
    assert [(b["batch"], b["rows"], b["writes"], b["done"]) for b in batches] == [
        (1, 5, 5, 5), (2, 5, 5, 10), (3, 5, 5, 15), (4, 5, 5, 20), (5, 3, 3, 23)]
    assert all(b["held_ms"] == 0 and b["hold_reason"] is None for b in batches)
    assert ledger.batch_summary(applied.run.run_id)["batches"] == 5
    plan_batches = ledger.batches(planned.run.run_id)
    assert sum(b["rows"] for b in plan_batches) == 23 and plan_batches[-1]["done"] == 23
    runs, total = ledger.page_runs(0, 2)
    assert total == 3 and [r.kind for r in runs] == ["apply", "plan"]
    runs, total = ledger.page_runs(2, 2)
    assert [r.kind for r in runs] == ["init"]
    assert ledger.page_runs(0, 10, kind="plan")[1] == 1
    assert ledger.job_names() == [planned.run.job]
    ledger.record_action(applied.run.run_id, "pause", "me via web", "run is now succeeded")
    assert [(a["action"], a["operator"]) for a in ledger.actions(applied.run.run_id)] == [("pause", "me via web")]
    totals = {(t["kind"], t["status"]): t for t in ledger.run_totals()}
    assert totals["apply", "succeeded"]["counts"]["applied"] == 23
    assert ledger.active_locks() == []


def test_held_batches_record_their_hold(sqlite_db: TestDB, jobs_file: Path) -> None:
    db = sqlite_db
    db.create_people(10, with_email_every=100)
    target = db.target()
    init_target(target)
    conn = connect(target)
    said: list[str] = []

    class HoldOnce:
        """Holds the run once (after its first batch), then says healthy."""

        def check(self, _conn: Any) -> str | None:
            said.append("checked")
            return "the test holds once" if len(said) == 1 else None

    planned = make_plan(conn, load_job(f"{jobs_file}:FillEmail"), out=db.tmp_path / "p.plan")
    applied = apply_plan(conn, planned.path, Limits(batch_size=5, checks=[HoldOnce()]))
    batches = conn.ledger.batches(applied.run.run_id)
    assert [b["hold_reason"] for b in batches] == [None, "the test holds once"]
    assert batches[0]["held_ms"] == 0 and batches[1]["held_ms"] > 0
    assert conn.ledger.batch_summary(applied.run.run_id)["holds"] == 1


def test_serve_without_the_extra_names_it(sqlite_db: TestDB, cli: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "starlette" else real(name, *a))
    result = run_cli(cli, sqlite_db.config(), "serve")
    assert result.exit_code == 2
    assert "pip install 'fillgate[web]'" in result.stderr and "Traceback" not in result.output


def test_serve_off_loopback_needs_a_token(sqlite_db: TestDB, cli: CliRunner, tmp_path: Path) -> None:
    result = run_cli(cli, sqlite_db.config(), "serve", "--host", "0.0.0.0")
    assert result.exit_code == 2 and "needs a token" in result.stderr
    empty = tmp_path / "token"
    empty.write_text("\n")
    result = run_cli(cli, sqlite_db.config(), "serve", "--host", "0.0.0.0", "--token-file", str(empty))
    assert result.exit_code == 2 and "is empty" in result.stderr


def test_resume_and_cancel_from_the_web(db: TestDB, cli: CliRunner, jobs_file: Path, tmp_path: Path) -> None:
    from fillgate import control_run
    from fillgate.monitor import Monitor

    db.create_people(20, with_email_every=100)
    cfg = db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0
    conn = connect(db.target())
    planned = make_plan(conn, load_job(f"{jobs_file}:FillEmail"), out=db.tmp_path / "p.plan")

    class PauseAfterFirst(Monitor):
        def batch_done(self, counts: Any, done: int, engine: Any, examples: Any = None) -> None:
            super().batch_done(counts, done, engine, examples)
            if done == 5:
                control_run(conn, self._run_id, "pause")

    paused = apply_plan(conn, planned.path, Limits(batch_size=5), PauseAfterFirst())
    run_id = paused.run.run_id
    assert db.rows("SELECT status, checkpoint FROM fillgate_runs WHERE run_id = :r", {"r": run_id}) == [("paused", 10)]
    client, board = dashboard_client(cfg, tmp_path)
    page = client.get(f"/t/staging/runs/{run_id}")
    assert "Resume</button>" in page.text and "Pause</button>" not in page.text
    token = CSRF.search(page.text).group(1)  # type: ignore[union-attr]
    resumed = client.post(f"/t/staging/runs/{run_id}/resume", data={"csrf": token}, follow_redirects=False)
    assert resumed.status_code == 303 and resumed.headers["location"].endswith(f"/runs/{run_id}?done=resumed")
    board.runner.join()
    assert db.rows("SELECT status, checkpoint FROM fillgate_runs WHERE run_id = :r", {"r": run_id}) == [
        ("succeeded", 20)]
    assert db.scalar("SELECT count(*) FROM people WHERE email IS NULL") == 0
    assert db.scalar("SELECT count(*) FROM fillgate_changes WHERE run_id = :r", {"r": run_id}) == 20
    cancel = client.post(f"/t/staging/runs/{run_id}/cancel", data={"csrf": token})
    assert cancel.status_code == 400 and "has status succeeded" in cancel.text
    actions = db.rows("SELECT action, outcome FROM fillgate_actions WHERE run_id = :r ORDER BY id", {"r": run_id})
    assert [a for a, _ in actions] == ["resume", "cancel"] and actions[1][1].startswith("refused:")


# --- the same library calls as the CLI ---------------------------------------------------------


ALERT = re.compile(r'<p class="refusal" role="alert">(.*?)</p>', re.S)


@pytest.mark.parametrize("asked", [
    {"table": "nosuch", "key": "3"},
    {"table": "people", "key": "3", "column": "nosuch"},
    {"table": "people", "key": "3,4"},
    {"table": "people", "key": "[1"},
])
def test_history_page_says_the_cli_usage_error(world: dict[str, Any], tmp_path: Path, cli: CliRunner,
                                              asked: dict[str, str]) -> None:
    """A table, column or key that makes no sense gets the words of ``fillgate history`` (not
    "no recorded changes"), above the form that still holds what was typed."""
    client, _ = dashboard_client(world["cfg"], tmp_path)
    page = client.get("/t/staging/history", params=asked)
    argv = ["history", asked["table"], asked["key"], *(["--column", asked["column"]] if "column" in asked else [])]
    said = run_cli(cli, world["cfg"], *argv, "--json")
    assert said.exit_code == 2, said.output
    assert page.status_code == 400, page.text
    shown = ALERT.search(page.text)
    assert shown, page.text
    assert html.unescape(shown.group(1)) == json.loads(said.stdout)["error"]["message"]
    assert "No recorded changes" not in page.text and 'class="history"' not in page.text
    assert f'name="key" value="{html.escape(asked["key"])}"' in page.text


def test_history_page_counts_every_change_and_shows_the_first(world: dict[str, Any], tmp_path: Path) -> None:
    from fillgate.web import data

    client, board = dashboard_client(world["cfg"], tmp_path)
    assert "1 change to people 3, oldest first" in client.get(
        "/t/staging/history", params={"table": "people", "key": "3"}).text
    db = world["db"]
    db.execute("UPDATE people SET email = NULL WHERE id = 3")
    revert = f"/t/staging/runs/{world['apply']['run_id']}/revert"
    assert client.post(revert, data={"csrf": _csrf(client, revert)}, follow_redirects=False).status_code == 303
    board.runner.join()  # person 3 was a conflict, the others went back
    assert db.scalar("SELECT count(*) FROM people WHERE email IS NULL") == 10
    original = data.HISTORY_LIMIT
    try:
        data.HISTORY_LIMIT = 1
        page = client.get("/t/staging/history", params={"table": "people", "key": "5"})
    finally:
        data.HISTORY_LIMIT = original
    assert "2 changes to people 5 (the first 1 shown), oldest first" in page.text
    assert page.text.count("<tr><td>") == 1


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_running_run_whose_process_is_gone_shows_as_interrupted_everywhere(
    world: dict[str, Any], tmp_path: Path,
) -> None:
    """``runs.interrupted``: the runs list, the run's page, the targets page and the runs it
    is related to all say interrupted, not running."""
    db = world["db"]
    ledger = connect(db.target()).ledger
    apply_id = world["apply"]["run_id"]
    gone = Run(run_id=new_run_id(), kind="revert", target="staging", environment="staging", operator="me",
               status="running", job="x", parent_run_id=apply_id, host=socket.gethostname(), pid=_dead_pid(),
               created_at=utcnow(), heartbeat_at=utcnow())
    ledger.create_run(gone)
    client, _ = dashboard_client(world["cfg"], tmp_path)
    interrupted = f'<span class="badge s-interrupted" title="its process (pid {gone.pid} on {gone.host}) is gone">'
    for url in ("/", "/t/staging/runs", f"/t/staging/runs/{gone.run_id}", f"/t/staging/runs/{apply_id}"):
        page = client.get(url)
        assert page.status_code == 200, url
        assert interrupted in page.text, url
        assert 'class="badge s-running"' not in page.text, url


JOBS_PIPELINE = JOBS + '''

from fillgate import Pipeline


class EmailThenKind(Pipeline):
    stages = [FillEmail, FillKind]
'''


def test_a_pipeline_run_is_reverted_stage_by_stage_last_first(db: TestDB, cli: CliRunner,
                                                              tmp_path: Path) -> None:
    """``commands.revert`` from the web: one revert run per stage the pipeline applied, last
    stage first, in the server; the page shows one preview per stage first."""
    db.create_people(12)
    spec = db.tmp_path / "pipe.py"
    spec.write_text(JOBS_PIPELINE)
    cfg = db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0
    before = db.rows("SELECT id, email, kind FROM people ORDER BY id")
    ran = run_cli(cli, cfg, "run", f"{spec}:EmailThenKind", "--json")
    assert ran.exit_code == 0, ran.output
    pipeline_id = json.loads(ran.stdout)["run_id"]
    applies = [s["apply"]["run_id"] for s in json.loads(ran.stdout)["stages"]]
    assert len(applies) == 2 and db.rows("SELECT id, email, kind FROM people ORDER BY id") != before

    client, board = dashboard_client(cfg, tmp_path)
    assert "Revert…" in client.get(f"/t/staging/runs/{pipeline_id}").text
    url = f"/t/staging/runs/{pipeline_id}/revert"
    preview = client.get(url)
    assert preview.status_code == 200, preview.text
    assert preview.text.index(applies[1]) < preview.text.index(applies[0])  # last stage first
    assert "6</strong> of 6 fields would be restored" in preview.text  # FillEmail: the odd half had no email
    assert "12</strong> of 12 fields would be restored" in preview.text  # FillKind: every kind
    done = client.post(url, data={"csrf": CSRF.search(preview.text).group(1)},  # type: ignore[union-attr]
                       follow_redirects=False)
    assert done.status_code == 303, done.text
    board.runner.join()
    reverts = db.rows("SELECT run_id, parent_run_id, status FROM fillgate_runs WHERE kind = 'revert' ORDER BY run_id")
    assert [(parent, status) for _, parent, status in reverts] == [(a, "succeeded") for a in reversed(applies)]
    assert done.headers["location"] == f"/t/staging/runs/{reverts[0][0]}?done=reverting-stages"
    assert db.rows("SELECT id, email, kind FROM people ORDER BY id") == before
    actions = db.rows("SELECT action, outcome FROM fillgate_actions WHERE run_id = :r", {"r": pipeline_id})
    assert actions == [("revert", f"started in the dashboard's server as run {reverts[0][0]}")]
    shown = client.get(done.headers["location"])
    assert "The revert of the pipeline&#39;s last applied stage started" in shown.text


def test_plan_page_refuses_a_long_key_unless_it_is_json(sqlite_world: dict[str, Any], tmp_path: Path) -> None:
    """Each numeric part of a typed key doubles the encodings looked up: past 12 parts the key
    must be a JSON list (as for ``fillgate history``), so no request can make the server
    build millions of them."""
    client, board = dashboard_client(sqlite_world["cfg"], tmp_path)
    run_id = sqlite_world["kinds"]["run_id"]
    client.get(f"/t/staging/plans/{run_id}")
    board.plans.wait()
    long_key = ",".join(str(i) for i in range(1, 31))
    refused = client.get(f"/t/staging/plans/{run_id}", params={"key": long_key})
    assert refused.status_code == 400 and "as a JSON list" in refused.text
    as_json = client.get(f"/t/staging/plans/{run_id}", params={"key": json.dumps(list(range(1, 31)))})
    assert as_json.status_code == 200 and "about key" in as_json.text


def test_a_stopping_server_pauses_the_runs_it_started(db: TestDB, cli: CliRunner, jobs_file: Path) -> None:
    """``Runner.stop_all`` (the server's shutdown): a run it started pauses after its current
    batch, resumable, and the stop request does not outlive the shutdown."""
    from fillgate import interrupts
    from fillgate.web.data import Runner

    db.create_people(20, with_email_every=100)
    assert run_cli(cli, db.config(), "init").exit_code == 0
    conn = connect(db.target())
    planned = make_plan(conn, load_job(f"{jobs_file}:FillEmail"), out=db.tmp_path / "p.plan")
    runner = Runner()
    started: list[str] = []
    run_id = runner.start(conn, lambda monitor: apply_plan(conn, planned.path, Limits(batch_size=1, pause_ms=500),
                                                           monitor), "me", started.append, pytest.fail)
    assert started == [run_id] and runner.active() == [run_id]
    runner.stop_all()
    assert runner.active() == [] and interrupts.stop_requested() is None
    status, checkpoint, message = db.rows(
        "SELECT status, checkpoint, message FROM fillgate_runs WHERE run_id = :r", {"r": run_id})[0]
    assert status == "paused" and 0 < checkpoint < 20 and "the dashboard's server is stopping" in message
    assert db.scalar("SELECT count(*) FROM fillgate_changes WHERE run_id = :r", {"r": run_id}) == checkpoint


def test_the_request_that_starts_a_revert_does_not_race_its_first_batch(sqlite_world: dict[str, Any],
                                                                         tmp_path: Path) -> None:
    """On SQLite a write from another connection between a batch's first read and its first
    write fails that batch at once ("database is locked"). The revert's first batch is held
    in that window here (for one second, as the request that started it returns): nothing of
    the request writes then, and the revert succeeds."""
    import sqlite3
    import threading
    import time

    from sqlalchemy import event

    db = sqlite_world["db"]
    client, board = dashboard_client(sqlite_world["cfg"], tmp_path)
    held: list[str] = []

    def hold_the_first_update(dbapi_conn: Any, _record: Any) -> None:
        def authorize(action: int, table: str | None, *_: Any) -> int:
            if (action == sqlite3.SQLITE_UPDATE and table == "people" and not held
                    and threading.current_thread().name == "fillgate-web-run"):
                held.append(table)
                time.sleep(1)
            return sqlite3.SQLITE_OK
        dbapi_conn.set_authorizer(authorize)

    engine = board.connect("staging").engine
    event.listen(engine, "connect", hold_the_first_update)
    engine.dispose()
    revert = f"/t/staging/runs/{sqlite_world['apply']['run_id']}/revert"
    done = client.post(revert, data={"csrf": _csrf(client, revert)}, follow_redirects=False)
    assert done.status_code == 303, done.text
    board.runner.join()
    revert_id = done.headers["location"].split("/runs/")[1].split("?")[0]
    assert held == ["people"]
    assert db.rows("SELECT status, message FROM fillgate_runs WHERE run_id = :r", {"r": revert_id}) == [
        ("succeeded", None)]
    assert db.scalar("SELECT count(*) FROM people WHERE email IS NOT NULL") == 10
    actions = db.rows("SELECT action, outcome FROM fillgate_actions WHERE run_id = :r",
                      {"r": sqlite_world["apply"]["run_id"]})
    assert actions == [("revert", f"started in the dashboard's server as run {revert_id}")]


def test_no_query_makes_a_page_fail(sqlite_world: dict[str, Any], tmp_path: Path) -> None:
    """Whatever is typed into a page's address (page numbers, filters, keys, tables), the
    answer is the page or a page that says what was wrong: never a server error."""
    from hypothesis import HealthCheck, example, given, settings
    from hypothesis import strategies as st

    client, board = dashboard_client(sqlite_world["cfg"], tmp_path)
    plan_url = f"/t/staging/plans/{sqlite_world['kinds']['run_id']}"
    client.get(plan_url)
    board.plans.wait()
    typed = st.one_of(st.text(max_size=40), st.integers().map(str), st.sampled_from(
        ["", "0", "-1", "1e3", "9" * 30, "[1]", "[", "[[]]", '["a", 1]', "people", "email", "apply", "change"]))
    pages = {"/t/staging/runs": ("page", "kind", "status", "job"), "/t/staging/history": ("table", "key", "column"),
             plan_url: ("page", "kind", "column", "key"), "/plan": ("path", "page", "kind", "key")}

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(url=st.sampled_from(sorted(pages)), values=st.lists(typed, min_size=4, max_size=4))
    @example(url="/t/staging/runs", values=["9" * 30, "", "", ""])  # past the database's integers
    @example(url=plan_url, values=["9" * 30, "", "", ""])
    @example(url="/t/staging/history", values=["\x00", "1", "\x00", ""])
    @example(url="/plan", values=["a\x00b", "", "", ""])  # was a server error (ValueError: embedded null byte)
    @example(url="/plan", values=["/dev/zero", "", "", ""])  # was read without end in a server thread
    def check(url: str, values: list[str]) -> None:
        params = {name: value for name, value in zip(pages[url], values, strict=False) if value}
        if url.endswith("/history"):
            params.setdefault("table", "people")
        page = client.get(url, params=params)
        if url == "/plan" and params.get("path"):  # a file that is not there, or not a plan: refused (409)
            board.plans.wait()
            page = client.get(url, params=params)
            assert page.status_code in (400, 409), (url, params, page.text)
        assert page.status_code in (200, 400) or url == "/plan", (url, params, page.text)
        assert "Traceback" not in page.text

    check()


def test_a_target_whose_url_uses_an_unset_variable_is_unavailable_and_the_others_are_served(
    sqlite_db: TestDB, cli: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    db = sqlite_db
    monkeypatch.delenv("FILLGATE_TRUST_UNSET_PW", raising=False)
    cfg = db.config({
        "staging": {},
        "live": {"url": "postgresql://app:${FILLGATE_TRUST_UNSET_PW}@127.0.0.1/live?password=hunter2-secret"},
    })
    assert run_cli(cli, cfg, "init", "--target", "staging").exit_code == 0
    served: dict[str, Any] = {}

    def fake_run(app: Any, **options: Any) -> None:
        served.update(options, app=app)

    import uvicorn

    monkeypatch.setattr(uvicorn, "run", fake_run)
    started = run_cli(cli, cfg, "serve", "--cache-dir", str(tmp_path / "cache"))
    assert started.exit_code == 0, started.output
    assert "serving staging, live" in started.stdout and served["app"] is not None

    client, _ = dashboard_client(cfg, tmp_path)
    page = client.get("/")
    assert page.status_code == 200
    live = page.text.split('data-target="live"')[1].split("</section>")[0]
    assert "unavailable" in live and "FILLGATE_TRUST_UNSET_PW is not set" in live
    assert "hunter2-secret" not in page.text and "password=***" in live
    assert client.get("/t/staging/runs").status_code == 200
    refused = client.get("/t/live/runs")
    assert refused.status_code == 503 and "FILLGATE_TRUST_UNSET_PW is not set" in refused.text
    assert "hunter2-secret" not in refused.text and "Traceback" not in refused.text
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and 'fillgate_target_up{target="live"} 0' in metrics.text


def test_plan_page_shows_values_policies_and_counts_as_the_cli_does(db: TestDB, tmp_path: Path) -> None:
    """Values as ``fillgate plan`` prints them (report.format_value: never a Python repr such as
    Decimal('1.50') or datetime.datetime(...)), whole; policies and counts in words."""
    import datetime as dt
    import decimal

    from fillgate import Job, Overwrite, Promote
    from fillgate.report import format_value

    long_text = "x" * 500 + "END"
    db.execute("CREATE TABLE things (id INTEGER NOT NULL PRIMARY KEY, price NUMERIC(10, 2), at TIMESTAMP NULL, "
               "name VARCHAR(1000))")
    db.execute("INSERT INTO things (id) VALUES (1), (2), (3)")
    names = {1: "42", 2: "", 3: long_text}

    class Typed(Job):
        name = "tests:Typed"
        table = "things"
        key = ("id",)
        columns = {"price": Promote(unknown=[decimal.Decimal("1.5"), "n/a"]), "at": Overwrite(), "name": Overwrite()}
        source = "SELECT * FROM things"

        def compute(self, row: Any, ctx: Any) -> dict[str, Any]:
            return {"price": decimal.Decimal("1.50"), "at": dt.datetime(2013, 1, 1, 5, 17), "name": names[row["id"]]}

    target = db.target()
    init_target(target)
    result = make_plan(connect(target), Typed, out=tmp_path / "typed.plan")
    assert result.header.changes == 9, result.counts
    cfg = db.config()
    client, board = dashboard_client(cfg, tmp_path)
    url = f"/t/staging/plans/{result.run.run_id}"
    client.get(url)
    board.plans.wait()
    page = client.get(url)
    assert page.status_code == 200, page.text
    text = html.unescape(page.text)
    for repr_mark in ("Decimal(", "datetime.datetime(", "{'policy'", "\\u"):
        assert repr_mark not in text
    shown = {line["column"]: line["new"] for line in result.samples["change"]}
    assert f'<td class="new"><span class="val">{format_value(shown["price"])}</span>' in text
    assert format_value(shown["price"]) in ("1.50", "1.5")
    assert '<td class="new"><span class="val">2013-01-01 05:17:00</span>' in text
    assert "<span class=\"val\">'42'</span>" in text and "<span class=\"val\">''</span>" in text
    assert long_text in text  # whole
    assert "price: promote (unknown: 1.5, n/a)" in text and "at: overwrite" in text
    assert "<th>rows scanned</th>" in text and "<th>row errors</th>" in text and "unexpected_index</th>" not in text


def test_a_refused_action_says_it_was_recorded_and_a_missing_run_gets_no_record(world: dict[str, Any],
                                                                               tmp_path: Path) -> None:
    """A refused pause, cancel, resume or revert is recorded among the run's actions (who asked for
    what): the page now says so. A run that does not exist got an action row too (any id typed into
    the address); now it gets a 404 and nothing is written."""
    db = world["db"]
    apply_id = world["apply"]["run_id"]
    client, _ = dashboard_client(world["cfg"], tmp_path)
    token = _csrf(client, f"/t/staging/runs/{apply_id}/revert")
    before = db.scalar("SELECT count(*) FROM fillgate_actions")
    paused = client.post(f"/t/staging/runs/{apply_id}/pause", data={"csrf": token})
    assert paused.status_code == 400 and "only running or paused runs can be paused" in paused.text
    assert "recorded among the run&#39;s actions" in paused.text
    assert db.scalar("SELECT count(*) FROM fillgate_actions") == before + 1
    for action in ("pause", "cancel", "resume", "revert"):
        missing = client.post(f"/t/staging/runs/{'Z' * 300}/{action}", data={"csrf": token})
        assert missing.status_code == 404, (action, missing.text)
    assert db.scalar("SELECT count(*) FROM fillgate_actions") == before + 1
