"""The production workflow, on every backend: four-eyes approvals (fillgate approve, a
target's ``approvals``), rehearsal on another target (``rehearse_on``,
``rehearsal_tolerance``, ``--skip-rehearsal``), canary applies (``--canary N``, the job's
``verify``, ``--verify-sql``) resumed exactly once, and the Markdown report of ``show``.

Staging is the test database; live is a second database on the same server. Every refusal is
checked to write nothing: the user's table and every ledger table of both databases are the
same before and after."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from markdown_it import MarkdownIt
from typer.testing import CliRunner

from fillgate.canary import canary_positions
from fillgate.config import parse_url
from fillgate.database import dispose_all

from conftest import TestDB, current_apply, fillgate_subprocess, kill_when, run_cli, second_database

N = 20  # people; every second one lacks an email, so FillEmail plans 10 changes
LEDGER_TABLES = ("fillgate_runs", "fillgate_changes", "fillgate_errors", "fillgate_batches", "fillgate_actions",
                 "fillgate_approvals", "fillgate_meta")

VERIFYING_JOBS = '''
from fillgate import Job, FillMissing


class FillEmailChecked(Job):
    table = "people"
    key = ("id",)
    columns = {"email": FillMissing()}
    source = "SELECT id, name, email FROM people"
    seen = []

    def compute(self, row, ctx):
        return {"email": row["name"].lower() + "@example.com"}

    def verify(self, ctx, changed_keys):
        FillEmailChecked.seen.append(list(changed_keys))
        bad = ctx.execute("SELECT count(*) AS n FROM people WHERE email LIKE '%@example.com' AND id > 15")
        return f"{bad[0]['n']} rows past id 15 changed" if bad[0]["n"] else None
'''


class World:
    """Staging (the test database) and live (a second one), both with ``people``."""

    def __init__(self, db: TestDB, cli: CliRunner, live: dict[str, Any]) -> None:
        self.db, self.cli = db, cli
        self.live_url = second_database(db, "live")
        self.live = TestDB(db.backend, self.live_url, sa.create_engine(parse_url(self.live_url, "test")),
                           db.tmp_path)
        for side in (db, self.live):
            side.create_people(N)
        self.cfg = db.config({"staging": {}, "live": {"url": self.live_url, "environment": "live",
                                                      "max_changes": 100, **live}})
        assert self.run("init", "--target", "staging").exit_code == 0
        assert self.run("init", "--target", "live", "--confirm", "live").exit_code == 0

    def run(self, *args: str, operator: str = "alice") -> Any:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("FILLGATE_OPERATOR", operator)
            return run_cli(self.cli, self.cfg, *args)

    def snapshot(self) -> list[Any]:
        """Every row of ``people`` and of every ledger table, of both databases."""
        out = []
        for side in (self.db, self.live):
            out.append(side.rows("SELECT * FROM people ORDER BY id"))
            for table in LEDGER_TABLES:
                out.append(sorted(map(repr, side.rows(f"SELECT * FROM {table}"))))
        return out

    def plan(self, job: str, target: str, out: str, *params: str, operator: str = "alice") -> Path:
        result = self.run("plan", job, "--target", target, "-o", out, *params, operator=operator)
        assert result.exit_code == 0, result.output
        return Path(out).resolve()

    def refused(self, *args: str, operator: str = "alice", code: int = 3) -> str:
        """Run a command that must be refused with ``code``, writing nothing; its message."""
        before = self.snapshot()
        result = self.run(*args, operator=operator)
        assert result.exit_code == code, result.output
        assert self.snapshot() == before, "a refusal wrote something"
        return " ".join(result.stderr.split())

    def close(self) -> None:
        self.live.engine.dispose()
        dispose_all()


@pytest.fixture
def world(db: TestDB, cli: CliRunner, jobs_file: Path, request: pytest.FixtureRequest) -> Any:
    live = getattr(request, "param", {"approvals": 1})
    w = World(db, cli, live)
    w.jobs = jobs_file  # type: ignore[attr-defined]
    yield w
    w.close()


def fill_email(w: Any) -> str:
    return f"{w.jobs}:FillEmail"


# --- four-eyes approvals -----------------------------------------------------------------------


def test_apply_needs_approvals_from_other_operators_and_refusals_write_nothing(world: Any) -> None:
    plan = world.plan(fill_email(world), "live", "live.plan")
    message = world.refused("apply", str(plan), "--confirm", "live")
    assert "needs 1 approval of plan" in message and "it has 0: none" in message
    assert f"fillgate approve {plan}" in message

    assert world.run("approve", str(plan), "--comment", "mine").exit_code == 0  # the author's own approval
    message = world.refused("apply", str(plan), "--confirm", "live")
    assert "your own approval does not count" in message and "(alice)" in message
    # approving twice is refused and records nothing
    assert "already approved" in world.refused("approve", str(plan))

    approved = world.run("approve", str(plan), "--comment", "10 fills | looks right", "--json", operator="bob")
    assert approved.exit_code == 0, approved.output
    data = json.loads(approved.stdout)
    assert [a["operator"] for a in data["approvals"]] == ["alice", "bob"] and data["needed"] == 1

    events = world.db.tmp_path / "events.jsonl"
    applied = world.run("apply", str(plan), "--confirm", "live", "--events", str(events))
    assert applied.exit_code == 0, applied.output
    assert world.live.scalar("SELECT count(*) FROM people WHERE email LIKE '%@example.com'") == N // 2
    assert world.db.scalar("SELECT count(*) FROM people WHERE email LIKE '%@example.com'") == 0
    (checked,) = [json.loads(line) for line in events.read_text().splitlines()
                  if json.loads(line)["event"] == "apply_checked"]
    assert [a["operator"] for a in checked["approvals"]] == ["bob"]
    assert checked["approvals"][0]["comment"] == "10 fills | looks right"

    apply_id = world.live.scalar("SELECT run_id FROM fillgate_runs WHERE kind = 'apply'")
    shown = json.loads(world.run("show", apply_id, "--target", "live", "--json").stdout)
    assert [a["operator"] for a in shown["approvals"]] == ["alice", "bob"]
    assert [a["operator"] for a in shown["args"]["approvals"]] == ["bob"]
    text = world.run("show", apply_id, "--target", "live").stdout
    assert "approvals" in text and "bob" in text
    # the plan was applied: approving it now is refused
    assert "already applied" in world.refused("approve", str(plan), operator="carol")


def test_an_approval_is_of_one_exact_plan_file(world: Any) -> None:
    plan = world.plan(fill_email(world), "live", "live.plan")
    assert world.run("approve", str(plan), operator="bob").exit_code == 0
    # a new plan of the same job is another file: bob's approval does not carry over
    second = world.plan(fill_email(world), "live", "second.plan")
    assert "it has 0: none" in world.refused("apply", str(second), "--confirm", "live")
    # a modified file is refused before anything is recorded
    lines = plan.read_text().splitlines(keepends=True)
    tampered = world.db.tmp_path / "tampered.plan"
    tampered.write_text("".join(lines[:-1]))
    world.refused("approve", str(tampered), operator="carol", code=2)


def test_run_on_a_target_needing_approvals_is_refused_before_planning(world: Any) -> None:
    message = world.refused("run", fill_email(world), "--target", "live", "--confirm", "live")
    assert "needs 1 approval of a plan" in message and "fillgate approve FILE" in message
    pipeline = world.db.tmp_path / "pipeline.py"
    pipeline.write_text(f"import sys\nsys.path.insert(0, {str(world.jobs.parent)!r})\n"
                        "from jobs import FillEmail, FillKind\nfrom fillgate import Pipeline\n\n\n"
                        "class Both(Pipeline):\n    stages = [FillEmail, FillKind]\n")
    message = world.refused("run", f"{pipeline}:Both", "--target", "live", "--confirm", "live")
    assert "so a pipeline run (plan and apply in one go) cannot write to it" in message


# --- rehearsal ---------------------------------------------------------------------------------


REHEARSED = {"rehearse_on": "staging", "rehearsal_tolerance": 0.2}


@pytest.mark.parametrize("world", [REHEARSED], indirect=True)
def test_apply_needs_the_same_job_applied_on_the_rehearsal_target(world: Any) -> None:
    job = f"{world.jobs}:OverwriteEmail"
    plan = world.plan(job, "live", "live.plan", "--param", "domain=new.org")
    message = world.refused("apply", str(plan), "--confirm", "live")
    assert "applied successfully on its rehearsal target 'staging' first" in message
    assert "It has no succeeded apply of" in message
    assert f"Rehearse it with: fillgate run {world.jobs}:OverwriteEmail --target staging --param domain=new.org;" \
        in message
    # `run` is refused before it plans anything
    world.refused("run", job, "--target", "live", "--confirm", "live", "--param", "domain=new.org")

    # a rehearsal with other parameters does not count
    other = world.run("run", job, "--target", "staging", "--param", "domain=other.org")
    assert other.exit_code == 0, other.output
    message = world.refused("apply", str(plan), "--confirm", "live")
    assert "differ:" in message and "other.org" in message

    rehearsal = world.run("run", job, "--target", "staging", "--param", "domain=new.org")
    assert rehearsal.exit_code == 0, rehearsal.output
    applied = world.run("apply", str(plan), "--confirm", "live")
    assert applied.exit_code == 0, applied.output
    args = json.loads(world.live.scalar("SELECT args FROM fillgate_runs WHERE kind = 'apply'"))
    staging_apply = world.db.scalar("SELECT run_id FROM fillgate_runs WHERE kind = 'apply' ORDER BY run_id DESC")
    assert args["rehearsal"]["run_id"] == staging_apply and args["rehearsal"]["target"] == "staging"
    assert args["rehearsal"]["differences"]["writes"] == [N, N]


@pytest.mark.parametrize("world", [REHEARSED], indirect=True)
def test_counts_beyond_the_tolerance_are_refused_and_skip_needs_confirm(world: Any) -> None:
    job = fill_email(world)
    assert world.run("run", job, "--target", "staging").exit_code == 0  # 10 fills on staging
    world.live.execute("UPDATE people SET email = NULL WHERE id <= 6")  # live lacks 3 more: 13 fills
    plan = world.plan(job, "live", "live.plan")
    message = world.refused("apply", str(plan), "--confirm", "live")
    assert "by more than rehearsal_tolerance 0.2: writes 13 vs 10" in message
    # --skip-rehearsal needs the environment typed out
    world.refused("apply", str(plan), "--skip-rehearsal")
    world.refused("apply", str(plan), "--skip-rehearsal", "--confirm", "staging")
    applied = world.run("apply", str(plan), "--skip-rehearsal", "--confirm", "live")
    assert applied.exit_code == 0, applied.output
    args = json.loads(world.live.scalar("SELECT args FROM fillgate_runs WHERE kind = 'apply'"))
    assert args["rehearsal"] == {"target": "staging", "skipped": True}


def test_rehearse_on_must_name_another_declared_target(sqlite_db: TestDB, cli: CliRunner) -> None:
    for live, expected in (({"rehearse_on": "nowhere"}, "is not a declared target"),
                           ({"rehearse_on": "live"}, "names the target itself"),
                           ({"rehearsal_tolerance": 0.1}, "without rehearse_on")):
        cfg = sqlite_db.config({"staging": {}, "live": live})
        result = run_cli(cli, cfg, "runs", "--target", "staging")
        assert result.exit_code == 2 and expected in result.stderr, result.stderr


# --- canary ------------------------------------------------------------------------------------


def test_canary_positions_are_strided_over_the_plan() -> None:
    assert canary_positions(10, 3) == [0, 3, 6]
    assert canary_positions(10, 1) == [0]
    assert canary_positions(5, 4) == [0, 1, 2, 3]
    assert canary_positions(1000, 10) == list(range(0, 1000, 100))


@pytest.mark.parametrize("world", [{}], indirect=True)
def test_canary_pauses_verifies_and_resume_applies_the_rest_exactly_once(world: Any) -> None:
    plan = world.plan(fill_email(world), "live", "live.plan")
    events = world.db.tmp_path / "events.jsonl"
    result = world.run("apply", str(plan), "--confirm", "live", "--canary", "3", "--batch-size", "2",
                       "--verify-sql", "SELECT id FROM people WHERE email LIKE '%@@%'", "--events", str(events))
    assert result.exit_code == 0, result.output
    assert "verified; the run is paused" in result.stdout
    run_id, status, checkpoint = world.live.rows(
        "SELECT run_id, status, checkpoint FROM fillgate_runs WHERE kind = 'apply'")[0]
    assert (status, checkpoint) == ("paused", 3)
    # the plan's changes are ids 1, 3, ..., 19: the canary is changes 0, 3 and 6 of them
    assert world.live.rows("SELECT id FROM people WHERE email LIKE '%@example.com' ORDER BY id") == [(1,), (7,), (13,)]
    paused = [json.loads(line) for line in events.read_text().splitlines()
              if json.loads(line)["event"] == "canary_paused"]
    assert paused == [{**paused[0], "run_id": run_id, "done": 3, "total": 10, "verified": True, "problems": None}]

    resumed = world.run("resume", run_id, "--target", "live", "--confirm", "live", "--batch-size", "4")
    assert resumed.exit_code == 0, resumed.output
    assert world.live.scalar("SELECT status FROM fillgate_runs WHERE run_id = :r", {"r": run_id}) == "succeeded"
    keys = [k for (k,) in world.live.rows("SELECT row_key FROM fillgate_changes WHERE run_id = :r ORDER BY id",
                                          {"r": run_id})]
    assert sorted(keys) == sorted(f"[{i}]" for i in range(1, N, 2)) and len(keys) == len(set(keys))
    assert keys[:3] == ["[1]", "[7]", "[13]"]
    assert world.run("verify", run_id, "--target", "live").exit_code == 0


@pytest.mark.parametrize("world", [{}], indirect=True)
def test_a_canary_stopped_early_still_pauses_at_its_end(world: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = world.plan(fill_email(world), "live", "live.plan")
    import fillgate.applier as applier

    stops = iter(["stop requested by the test"])
    monkeypatch.setattr(applier, "stop_requested", lambda: next(stops, None))
    first = world.run("apply", str(plan), "--confirm", "live", "--canary", "4", "--batch-size", "3")
    assert first.exit_code == 130, first.output  # stopped after its first batch: 3 of the 4
    run_id, status, checkpoint = world.live.rows(
        "SELECT run_id, status, checkpoint FROM fillgate_runs WHERE kind = 'apply'")[0]
    assert (status, checkpoint) == ("paused", 3)
    again = world.run("resume", run_id, "--target", "live", "--confirm", "live")
    assert again.exit_code == 0 and "canary of 4 of 10" in again.stdout, again.output
    assert world.live.scalar("SELECT checkpoint FROM fillgate_runs WHERE run_id = :r", {"r": run_id}) == 4
    assert world.run("resume", run_id, "--target", "live", "--confirm", "live").exit_code == 0
    keys = [k for (k,) in world.live.rows("SELECT row_key FROM fillgate_changes WHERE run_id = :r", {"r": run_id})]
    assert len(keys) == 10 == len(set(keys))


@pytest.mark.parametrize("world", [{}], indirect=True)
def test_a_failed_canary_verification_leaves_the_run_paused_and_says_how_to_undo(world: Any) -> None:
    jobs = world.db.tmp_path / "checked.py"
    jobs.write_text(VERIFYING_JOBS)
    plan = world.plan(f"{jobs}:FillEmailChecked", "live", "live.plan")
    # the canary: changes 0, 2, 4, 6 and 8 of the plan's ids 1, 3, ..., 19: 1, 5, 9, 13, 17
    result = world.run("apply", str(plan), "--confirm", "live", "--canary", "5")
    assert result.exit_code == 4, result.output
    run_id = world.live.scalar("SELECT run_id FROM fillgate_runs WHERE kind = 'apply'")
    message = " ".join(result.stderr.split())
    assert "verification failed: checked:FillEmailChecked.verify: 1 rows past id 15 changed" in message
    assert f"fillgate cancel {run_id} --target live && fillgate revert {run_id} --target live --confirm live" in message
    status, args = world.live.rows("SELECT status, args FROM fillgate_runs WHERE run_id = :r", {"r": run_id})[0]
    assert status == "paused" and json.loads(args)["canary"]["verified"] is False
    assert world.run("cancel", run_id, "--target", "live").exit_code == 0
    assert world.run("revert", run_id, "--target", "live", "--confirm", "live").exit_code == 0
    assert world.live.scalar("SELECT count(*) FROM people WHERE email LIKE '%@example.com'") == 0


@pytest.mark.parametrize("world", [{}], indirect=True)
def test_resume_verifies_a_canary_its_process_never_verified(world: Any) -> None:
    plan = world.plan(fill_email(world), "live", "live.plan")
    assert world.run("apply", str(plan), "--confirm", "live", "--canary", "3").exit_code == 0
    run_id, args = world.live.rows("SELECT run_id, args FROM fillgate_runs WHERE kind = 'apply'")[0]

    def died_before_verifying(verify_sql: str) -> None:  # as if killed between the pause and the check
        canary = {"changes": 3, "verify_sql": verify_sql}
        world.live.execute("UPDATE fillgate_runs SET args = :a WHERE run_id = :r",
                           {"a": json.dumps({**json.loads(args), "canary": canary}), "r": run_id})

    died_before_verifying("SELECT id FROM people WHERE email = 'person1@example.com'")  # the canary wrote it
    before = world.live.rows("SELECT * FROM people ORDER BY id")
    failed = world.run("resume", run_id, "--target", "live", "--confirm", "live")
    assert failed.exit_code == 4 and "verification failed" in failed.stderr, failed.output
    assert world.live.rows("SELECT status, checkpoint FROM fillgate_runs WHERE run_id = :r", {"r": run_id}) \
        == [("paused", 3)]
    assert world.live.rows("SELECT * FROM people ORDER BY id") == before
    died_before_verifying("SELECT id FROM people WHERE 1 = 0")
    done = world.run("resume", run_id, "--target", "live", "--confirm", "live")
    assert done.exit_code == 0, done.output
    assert world.live.scalar("SELECT count(*) FROM people WHERE email LIKE '%@example.com'") == N // 2


@pytest.mark.parametrize("world", [{}], indirect=True)
def test_canary_usage_errors_write_nothing(world: Any) -> None:
    plan = world.plan(fill_email(world), "live", "live.plan")
    world.refused("apply", str(plan), "--confirm", "live", "--canary", "10", code=2)
    world.refused("apply", str(plan), "--confirm", "live", "--verify-sql", "SELECT 1", code=2)


# --- the Markdown report -------------------------------------------------------------------------


def _render(text: str) -> tuple[str, list[str]]:
    """The HTML of ``text`` as GitHub-flavoured Markdown, and the token types it parsed to."""
    md = MarkdownIt("commonmark").enable("table")
    return md.render(text), [t.type for t in md.parse(text)]


def test_markdown_report_of_a_plan_file_and_of_its_apply(world: Any) -> None:
    world.live.execute("UPDATE people SET name = 'A|B' WHERE id = 1")  # a cell holding a pipe
    plan = world.plan(fill_email(world), "live", "live.plan")
    assert world.run("approve", str(plan), "--comment", "ok\nsecond line", operator="bob").exit_code == 0

    shown = world.run("show", str(plan), "--format", "markdown")
    assert shown.exit_code == 0, shown.output
    html, tokens = _render(shown.stdout)
    plan_id = world.live.scalar("SELECT run_id FROM fillgate_runs WHERE kind = 'plan'")
    assert f"<h1>fillgate plan run <code>{plan_id}</code>: planned</h1>" in html
    assert tokens.count("table_open") >= 4  # summary, counts, diff, approvals
    assert "<td>a|b@example.com</td>" in html  # the pipe stayed in its cell
    assert "<td>ok<br>second line</td>" in html
    assert f"fillgate apply {plan} --max-changes 10 --confirm live" in html

    assert world.run("apply", str(plan), "--confirm", "live").exit_code == 0
    apply_id = world.live.scalar("SELECT run_id FROM fillgate_runs WHERE kind = 'apply'")
    report = world.run("show", apply_id, "--target", "live", "--format", "markdown")
    html, _ = _render(report.stdout)
    assert f"<code>{apply_id}</code>" in html and f"<code>{plan_id}</code>" in html
    assert "First 10 of 10 changes written (from the audit log)" in html
    assert f"fillgate revert {apply_id} --target live --confirm live" in html
    # --format json is --json
    as_json = world.run("show", apply_id, "--target", "live", "--format", "json")
    assert json.loads(as_json.stdout)["run_id"] == apply_id
    assert world.run("show", apply_id, "--target", "live", "--format", "html").exit_code == 2
    assert world.run("show", apply_id, "--target", "live", "--format", "markdown", "--json").exit_code == 2


def test_an_unreadable_rehearsal_target_refuses_and_writes_nothing(sqlite_db: TestDB, cli: CliRunner,
                                                                   jobs_file: Path) -> None:
    sqlite_db.create_people(N)
    cfg = sqlite_db.config({"staging": {"url": "${FILLGATE_TEST_UNSET_STAGING_URL}"},
                            "live": {"environment": "live", "max_changes": 100, "rehearse_on": "staging"}})
    assert run_cli(cli, cfg, "init", "--target", "live", "--confirm", "live").exit_code == 0
    assert run_cli(cli, cfg, "plan", f"{jobs_file}:FillEmail", "--target", "live", "-o", "live.plan").exit_code == 0
    before = [sqlite_db.rows(f"SELECT * FROM {t}") for t in ("people", *LEDGER_TABLES)]
    result = run_cli(cli, cfg, "apply", "live.plan", "--confirm", "live")
    assert result.exit_code == 3, result.output
    message = " ".join(result.stderr.split())
    assert "is rehearsed on 'staging', whose ledger cannot be read" in message
    assert "FILLGATE_TEST_UNSET_STAGING_URL" in message and "Nothing was written" in message
    assert [sqlite_db.rows(f"SELECT * FROM {t}") for t in ("people", *LEDGER_TABLES)] == before


@pytest.mark.slow
def test_a_canary_killed_anywhere_resumes_exactly_once(db: TestDB, cli: CliRunner, jobs_file: Path) -> None:
    """kill -9 inside the canary, then inside the rest: every change is written once, the
    canary first, and the run still paused after its canary."""
    rows = 400
    db.create_people(rows)
    cfg = db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0
    assert run_cli(cli, cfg, "plan", f"{jobs_file}:FillEmail", "-o", "fill.plan").exit_code == 0
    pace = ("--batch-size", "5", "--pause-between-batches", "20")
    rng = random.Random(7)

    def at_least(n: int) -> Any:
        return lambda: (current_apply(db) or ("", "", 0))[2] >= n

    proc = fillgate_subprocess(["--config", str(cfg), "apply", "fill.plan", "--canary", "40", *pace], cwd=db.tmp_path)
    kill_when(proc, at_least(10), rng)
    run_id, _, checkpoint = current_apply(db)  # type: ignore[misc]
    assert checkpoint < 40, "the kill came after the canary; slow the apply down"
    for _ in range(100):  # a killed SQLite process's lock row is taken over once its pid is gone
        resumed = run_cli(cli, cfg, "resume", run_id)
        if resumed.exit_code != 3:
            break
        time.sleep(0.1)
    assert resumed.exit_code == 0 and "canary of 40 of 200" in resumed.stdout, resumed.output
    assert current_apply(db)[1:] == ("paused", 40)  # type: ignore[index]

    proc = fillgate_subprocess(["--config", str(cfg), "resume", run_id, *pace], cwd=db.tmp_path)
    kill_when(proc, at_least(60), rng)
    for _ in range(100):
        done = run_cli(cli, cfg, "resume", run_id)
        if done.exit_code != 3:
            break
        time.sleep(0.1)
    assert done.exit_code == 0, done.output
    assert current_apply(db)[1:] == ("succeeded", 200)  # type: ignore[index]
    keys = [k for (k,) in db.rows("SELECT row_key FROM fillgate_changes WHERE run_id = :r ORDER BY id", {"r": run_id})]
    assert len(keys) == 200 == len(set(keys))
    canary = {f"[{2 * p + 1}]" for p in canary_positions(200, 40)}  # the plan's changes are ids 1, 3, 5, ...
    assert set(keys[:40]) == canary
    assert db.scalar("SELECT count(*) FROM people WHERE email LIKE '%@example.com'") == 200
    assert run_cli(cli, cfg, "verify", run_id).exit_code == 0
