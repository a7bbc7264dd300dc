"""The dashboard in a real browser (Debian's chromium, driven by Playwright), against a real
``fillgate serve`` process and real runs: what a person sees and does.

Run them alone with ``pytest -m e2e``; ``.ci/run`` installs chromium when it is missing. One
server serves the whole module: two SQLite targets, ``staging`` and the protected ``live``.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("playwright")
pytest.importorskip("starlette")

import sqlalchemy as sa
from playwright.sync_api import Browser, BrowserType, Page, Playwright, expect, sync_playwright
from typer.testing import CliRunner

from conftest import JOBS, SRC, fillgate_subprocess, run_cli

pytestmark = pytest.mark.e2e

CHROMIUM = os.environ.get("FILLGATE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
PEOPLE = 300
SERVER_WORK_MS = 60_000  # the longest wait for a page that the server computes (a loaded machine is slow)
RUN_DONE_MS = 120_000  # the longest wait for a run started from the dashboard to finish

if not Path(CHROMIUM).exists():
    pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium; .ci/run does)", allow_module_level=True)


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict[str, Any]) -> dict[str, Any]:
    """Debian's chromium: Playwright cannot download its own browsers here."""
    return {**browser_type_launch_args, "executable_path": CHROMIUM, "args": CHROMIUM_ARGS}


# pytest-playwright starts Playwright once per session. While its sync API is started, the
# main thread has a running asyncio loop, so every later test of the same pytest-xdist worker
# that calls asyncio.run() would fail. These overrides keep Playwright (and the browser) to
# this module: it is stopped, and the loop with it, when the module is done.


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    pw = sync_playwright().start()
    yield pw
    pw.stop()


@pytest.fixture(scope="module")
def browser_type(playwright: Playwright, browser_name: str) -> BrowserType:
    return getattr(playwright, browser_name)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def launch_browser(browser_type_launch_args: dict[str, Any], browser_type: BrowserType) -> Callable[..., Browser]:
    return lambda **kwargs: browser_type.launch(**{**browser_type_launch_args, **kwargs})


@pytest.fixture(scope="module")
def browser(launch_browser: Callable[..., Browser]) -> Iterator[Browser]:
    launched = launch_browser()
    yield launched
    launched.close()


@pytest.fixture(scope="module")
def browser_context_args() -> dict[str, Any]:
    return {"viewport": {"width": 1280, "height": 900}}


class World:
    """Two SQLite databases with people, their config, and a running dashboard."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cfg = root / "fillgate.toml"
        self.urls = {name: f"sqlite:///{root / (name + '.db')}" for name in ("staging", "live")}
        self.cfg.write_text(
            f'[targets.staging]\nurl = "{self.urls["staging"]}"\n\n'
            f'[targets.live]\nurl = "{self.urls["live"]}"\nenvironment = "live"\nprotected = true\nmax_changes = 1000\n'
        )
        (root / "jobs.py").write_text(JOBS)
        self.base = ""
        self.server: subprocess.Popen[str] | None = None

    def engine(self, name: str) -> sa.Engine:
        return sa.create_engine(self.urls[name])

    def sql(self, name: str, statement: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        engine = self.engine(name)
        with engine.begin() as conn:
            result = conn.execute(sa.text(statement), params or {})
            rows = [tuple(r) for r in result] if result.returns_rows else []
        engine.dispose()
        return rows

    def cli(self, *args: str) -> Any:
        result = run_cli(CliRunner(), self.cfg, *args)
        assert result.exit_code in (0, 1), result.output
        return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_until_up(proc: subprocess.Popen[str], url: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"fillgate serve exited: {proc.communicate()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("fillgate serve did not answer within 60s")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("e2e")
    w = World(root)
    for name in ("staging", "live"):
        w.sql(name, "CREATE TABLE people (id INTEGER NOT NULL PRIMARY KEY, name VARCHAR(100) NOT NULL, "
                    "email VARCHAR(200), kind VARCHAR(20))")
        w.sql(name, "INSERT INTO people (id, name, email, kind) VALUES (:id, :name, NULL, :kind)",
              [{"id": i, "name": f"Person{i}", "kind": "weird" if i in (4, 9) else None}  # type: ignore[arg-type]
               for i in range(1, PEOPLE + 1)])
    old = os.getcwd()
    os.chdir(root)
    try:
        w.cli("init", "--target", "staging")
        w.cli("init", "--target", "live", "--confirm", "live")
    finally:
        os.chdir(old)
    port = _free_port()
    w.base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(SRC), "FILLGATE_OPERATOR": "e2e-server"}
    w.server = subprocess.Popen(
        [sys.executable, "-m", "fillgate", "--config", str(w.cfg), "serve", "--port", str(port),
         "--cache-dir", str(root / "cache")],
        cwd=root, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        _wait_until_up(w.server, w.base + "/")
        yield w
    finally:
        w.server.terminate()
        _out, err = w.server.communicate(timeout=60)
        assert "Traceback" not in err, err


def _plan(world: World, target: str, job: str, name: str) -> dict[str, Any]:
    os.chdir(world.root)
    result = world.cli("plan", f"{world.root / 'jobs.py'}:{job}", "--target", target, "-o", name, "--json")
    return json.loads(result.stdout)


def test_runs_list_live_progress_and_pause(world: World, page: Page) -> None:
    planned = _plan(world, "staging", "FillEmail", "email.plan")
    apply = fillgate_subprocess(["--config", str(world.cfg), "apply", "email.plan", "--target", "staging",
                                 "--batch-size", "5", "--pause-between-batches", "250", "--json"], cwd=world.root)
    try:
        deadline = time.monotonic() + 30
        rows: list[tuple[Any, ...]] = []
        while not rows and time.monotonic() < deadline:
            rows = world.sql("staging", "SELECT run_id FROM fillgate_runs WHERE kind = 'apply'")
            time.sleep(0.05)
        assert rows, "the apply run did not start"
        apply_id = rows[0][0]

        page.goto(f"{world.base}/t/staging/runs")
        expect(page.locator("table.runs")).to_contain_text(apply_id)  # the full id, not cut
        expect(page.locator("table.runs")).to_contain_text(planned["run_id"])
        expect(page.locator(f"#run-{apply_id}")).to_contain_text("running")

        page.goto(f"{world.base}/t/staging/runs/{apply_id}")
        done = page.get_by_test_id("progress-done")
        expect(done).to_be_visible()
        first = done.inner_text()
        expect(done).not_to_have_text(first, timeout=20000)  # it moves without a reload
        expect(page.locator("#throughput canvas")).to_be_attached(timeout=20000)
        page.get_by_role("button", name="Pause").click()
        expect(page.locator(".notice")).to_contain_text("Pause requested")
        out, err = apply.communicate(timeout=120)
    finally:
        if apply.poll() is None:
            apply.kill()
    result = json.loads(out)
    assert result["status"] == "paused", (out, err)
    status, checkpoint, total = world.sql(
        "staging", "SELECT status, checkpoint, total FROM fillgate_runs WHERE run_id = :r", {"r": apply_id})[0]
    assert status == "paused" and 0 < checkpoint < total
    expect(page.locator("h1 .badge")).to_have_text("paused", timeout=20000)  # the page noticed by itself
    expect(page.locator("main")).to_contain_text("Actions taken from the dashboard")
    # finish it from the CLI, for the tests after this one
    os.chdir(world.root)
    world.cli("resume", apply_id, "--target", "staging")
    assert world.sql("staging", "SELECT count(*) FROM people WHERE email IS NULL")[0][0] == 0


def test_plan_page_filters_to_disagreements(world: World, page: Page) -> None:
    planned = _plan(world, "staging", "FillKind", "kind.plan")
    page.goto(f"{world.base}/t/staging/plans/{planned['run_id']}")
    table = page.locator("table.plan-lines")
    expect(table).to_be_visible(timeout=30000)  # verified and indexed, then shown without a reload
    expect(page.locator("section.card").filter(has_text="Apply exactly this plan")).to_contain_text(
        "--max-changes 298")
    page.locator("select[name=kind]").select_option("disagreement")
    page.get_by_role("button", name="Show").click()
    expect(page.locator("table.plan-lines tbody tr")).to_have_count(2)
    expect(table.locator("tbody")).to_contain_text("weird")
    kinds = page.locator("table.plan-lines tbody .kind").all_inner_texts()
    assert kinds == ["disagreement", "disagreement"]
    expect(page.locator("p.summary").last).to_contain_text("Lines 1\N{EN DASH}2 of 2")


def _applied_email(world: World) -> str:
    """The run that filled staging's emails (the pause test's; this worker may not have run it:
    pytest-xdist spreads a module's tests over workers, each with its own world)."""
    done = world.sql("staging", "SELECT run_id FROM fillgate_runs WHERE kind = 'apply' AND status = 'succeeded'")
    if done:
        return str(done[0][0])
    _plan(world, "staging", "FillEmail", "email-history.plan")
    return str(json.loads(world.cli("apply", "email-history.plan", "--target", "staging", "--json").stdout)["run_id"])


def test_history_shows_the_change_of_a_row(world: World, page: Page) -> None:
    applied = _applied_email(world)
    page.goto(f"{world.base}/t/staging/history")
    page.locator("input[name=table]").fill("people")
    page.locator("input[name=key]").fill("17")
    page.get_by_role("button", name="Show").click()
    rows = page.locator("table.history tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text(applied)
    expect(rows.first.locator("td.old")).to_have_text("NULL")
    expect(rows.first.locator("td.new")).to_have_text("person17@example.com")
    rows.first.get_by_role("link", name=applied).click()
    expect(page.locator("h1")).to_contain_text(applied)


def test_revert_on_a_protected_target_needs_the_environment_name(world: World, page: Page) -> None:
    """Every wait here is for the server's work (a preview, a refusal, a revert run), which a
    loaded machine slows down: each waits up to a minute or two, and the revert's outcome is
    then read from its run, so a failure says what happened to it."""
    _plan(world, "live", "FillEmail", "live.plan")
    os.chdir(world.root)
    applied = json.loads(world.cli("apply", "live.plan", "--target", "live", "--confirm", "live", "--json").stdout)
    assert world.sql("live", "SELECT count(*) FROM people WHERE email IS NULL")[0][0] == 0
    page.goto(f"{world.base}/t/live/runs/{applied['run_id']}")
    page.get_by_role("link", name="Revert…").click()
    expect(page.locator("p.summary").first).to_contain_text(f"{PEOPLE} of {PEOPLE} fields would be restored",
                                                            timeout=SERVER_WORK_MS)
    page.get_by_role("button", name=re.compile("Revert run")).click()
    expect(page.get_by_role("alert")).to_contain_text("protected environment 'live'", timeout=SERVER_WORK_MS)
    assert world.sql("live", "SELECT count(*) FROM people WHERE email IS NULL")[0][0] == 0
    assert world.sql("live", "SELECT count(*) FROM fillgate_runs WHERE kind = 'revert'")[0][0] == 0
    page.get_by_test_id("confirm").fill("live")
    page.get_by_role("button", name=re.compile("Revert run")).click()
    expect(page).to_have_url(re.compile(r"/t/live/runs/\w+\?done=reverting$"), timeout=SERVER_WORK_MS)
    revert_id = page.url.split("/runs/")[1].split("?")[0]
    expect(page.locator("h1")).to_contain_text(f"Revert run {revert_id}")
    expect(page.locator("h1 .badge")).not_to_have_text("running", timeout=RUN_DONE_MS)  # the page noticed the end
    status, message, operator = world.sql(
        "live", "SELECT status, message, operator FROM fillgate_runs WHERE run_id = :r", {"r": revert_id})[0]
    assert (status, message) == ("succeeded", None)
    expect(page.locator("h1 .badge")).to_have_text("succeeded")
    assert world.sql("live", "SELECT count(*) FROM people WHERE email IS NULL")[0][0] == PEOPLE
    assert operator.startswith("e2e-server via web (127.0.0.1")


def test_pages_that_fail_say_why(world: World, page: Page) -> None:
    page.goto(f"{world.base}/t/staging/runs/NOSUCHRUN")
    expect(page.locator("h1")).to_have_text("Not found")
    expect(page.locator(".message")).to_contain_text("no run 'NOSUCHRUN'")
    page.goto(f"{world.base}/plan?path={world.root / 'missing.plan'}")
    expect(page.locator(".message")).to_contain_text("cannot read plan file")
