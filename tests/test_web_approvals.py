"""The dashboard's side of four-eyes approval, on every backend: a plan page shows the
approvals and an Approve button (CSRF like every action, hidden and refused read-only), which
records the approval as ``fillgate approve`` does; the run page shows them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette")

from typer.testing import CliRunner

from conftest import TestDB, dashboard_client, run_cli

CSRF = re.compile(r'name="csrf" value="([0-9a-f]+)"')


def _approvals(db: TestDB) -> list[tuple[Any, ...]]:
    return db.rows("SELECT operator, via, comment FROM fillgate_approvals ORDER BY id")


def test_approve_from_the_plan_page(db: TestDB, cli: CliRunner, jobs_file: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    db.create_people(20)
    cfg = db.config({"staging": {"approvals": 1}})
    assert run_cli(cli, cfg, "init").exit_code == 0
    monkeypatch.setenv("FILLGATE_OPERATOR", "alice")
    planned = json.loads(run_cli(cli, cfg, "plan", f"{jobs_file}:FillEmail", "-o", "email.plan", "--json").stdout)
    plan_id = planned["run_id"]

    monkeypatch.setenv("FILLGATE_OPERATOR", "bob")  # the dashboard's server runs as bob
    client, board = dashboard_client(cfg, tmp_path)
    url = f"/t/staging/plans/{plan_id}"
    client.get(url)
    board.plans.wait()
    page = client.get(url)
    assert page.status_code == 200, page.text
    assert "needs 1 approval of this exact file" in page.text and "No approvals yet." in page.text
    assert f'action="/t/staging/plans/{plan_id}/approve"' in page.text
    token = CSRF.search(page.text).group(1)  # type: ignore[union-attr]

    action = f"{url}/approve"
    assert client.post(action, data={"comment": "x"}).status_code == 403  # no CSRF token
    assert client.post(action, data={"csrf": "0" * 64}).status_code == 403
    ro, _ = dashboard_client(cfg, tmp_path, read_only=True)
    assert f'{plan_id}/approve"' not in ro.get(url).text
    refused = ro.post(action, data={"csrf": token})
    assert refused.status_code == 403 and "read-only" in refused.text
    assert _approvals(db) == []

    done = client.post(action, data={"csrf": token, "comment": "<b>10 fills</b>"}, follow_redirects=False)
    assert done.status_code == 303 and done.headers["location"] == f"{url}?done=approved"
    ((operator, via, comment),) = _approvals(db)
    assert operator == "bob" and via.startswith("bob via web (") and comment == "<b>10 fills</b>"
    shown = client.get(f"{url}?done=approved")
    assert "Your approval of this plan file is recorded." in shown.text
    assert "&lt;b&gt;10 fills&lt;/b&gt;" in shown.text and "<b>10 fills</b>" not in shown.text

    again = client.post(action, data={"csrf": token})  # the same operator: refused, nothing recorded
    assert again.status_code == 409 and "already approved" in again.text
    assert len(_approvals(db)) == 1

    monkeypatch.setenv("FILLGATE_OPERATOR", "alice")  # alice applies with bob's approval
    applied = run_cli(cli, cfg, "apply", "email.plan", "--json")
    assert applied.exit_code == 0, applied.output
    run_page = client.get(f"/t/staging/runs/{json.loads(applied.stdout)['run_id']}")
    assert "Approvals of the plan" in run_page.text and "bob via web (" in run_page.text
    assert f'{plan_id}/approve"' not in client.get(url).text  # applied: no button any more


def test_the_run_page_shows_a_canary_and_its_verification(sqlite_db: TestDB, cli: CliRunner, jobs_file: Path,
                                                          tmp_path: Path) -> None:
    sqlite_db.create_people(20)
    cfg = sqlite_db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0
    assert run_cli(cli, cfg, "plan", f"{jobs_file}:FillEmail", "-o", "email.plan").exit_code == 0
    applied = run_cli(cli, cfg, "apply", "email.plan", "--canary", "2", "--json")
    assert applied.exit_code == 0, applied.output
    run_id = json.loads(applied.stdout)["run_id"]
    client, _ = dashboard_client(cfg, tmp_path)
    page = client.get(f"/t/staging/runs/{run_id}")
    assert page.status_code == 200
    assert "<dt>canary</dt><dd class=\"wrap\">2 changes spread over the plan; verification passed</dd>" in page.text
    assert f'action="/t/staging/runs/{run_id}/resume"' in page.text
