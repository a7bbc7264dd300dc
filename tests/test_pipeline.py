"""Pipelines: stages run in order on one target under the pipeline's run id.

A later stage sees what earlier stages wrote; every stage sees ``ctx.run_id`` == the pipeline
run and the same target; a crash for one person is a row error of that stage (named in
``fillgate show``) while everyone else carries on; a second run changes nothing; a stage that
reaches for another database is refused (exit 3) before anything of it is written, naming the
stage; ``fillgate revert PIPELINE_RUN`` undoes the stages last first; ``fillgate plan
PIPELINE`` writes nothing.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fillgate.values import encode_key

from conftest import TestDB, run_cli

PEOPLE = 120

JOBS = '''
import json
import os

import sqlalchemy

from fillgate import FillMissing, Job, Pipeline


def seen(stage, ctx):
    """Record what a stage's ctx looked like (once per stage and page)."""
    with open(os.environ["PIPELINE_SEEN"], "a") as out:
        out.write(json.dumps({"stage": stage, "run_id": ctx.run_id, "target": ctx.target.name,
                              "environment": ctx.environment, "stage_run_id": ctx.stage_run_id}) + "\\n")


class FillEmail(Job):
    table = "people"
    columns = {"email": FillMissing()}
    source = "SELECT id, name, email FROM people"
    page_size = 50

    def compute_batch(self, rows, ctx):
        seen("email", ctx)
        out = []
        for row in rows:
            if row["name"] == "boom":
                out.append(RuntimeError(f"no mailbox for person {row['id']}"))
            else:
                out.append({"email": row["name"].lower() + "@example.com"})
        return out


class FillKind(Job):
    """Needs FillEmail's writes: the kind is the email's domain."""
    table = "people"
    columns = {"kind": FillMissing()}
    source = "SELECT id, email, kind FROM people"
    page_size = 50

    def compute_batch(self, rows, ctx):
        seen("kind", ctx)
        return [{"kind": row["email"].split("@")[1]} if row["email"] else None for row in rows]


class TagPeople(Job):
    """Needs FillKind's writes; inserts one (person_id, tag) link per person."""
    table = "person_tags"
    writes = "insert"
    key = ("person_id", "tag")
    source_key = ("id",)
    columns = {}
    source = "SELECT id, kind FROM people"
    page_size = 50

    def compute_batch(self, rows, ctx):
        seen("tag", ctx)
        # a lookup on the run's own target: sees what the earlier stages wrote
        ctx.execute("SELECT count(*) AS n FROM people WHERE kind IS NOT NULL")
        return [{"person_id": row["id"], "tag": row["kind"]} if row["kind"] else None for row in rows]


class Enrich(Pipeline):
    stages = [FillEmail, FillKind, TagPeople]


class OpenLive(Job):
    """The incident: a nested stage asks for the live target by name (for person 75 only)."""
    table = "people"
    columns = {"kind": FillMissing()}
    source = "SELECT id, kind FROM people"
    page_size = 50

    def compute(self, row, ctx):
        if row["id"] == 75:
            ctx.open_target("live")
        return {"kind": "staged"}


class HardCodedEngine(Job):
    """The same bug spelled as a hard-coded URL; it even swallows the error."""
    table = "people"
    columns = {"kind": FillMissing()}
    source = "SELECT id, kind FROM people"
    page_size = 50

    def compute(self, row, ctx):
        if row["id"] == 75:
            try:
                with sqlalchemy.create_engine(os.environ["PIPELINE_LIVE_URL"]).begin() as live:
                    live.execute(sqlalchemy.text("UPDATE people SET kind = 'pwned'"))
            except Exception:
                pass
        return {"kind": "staged"}


class ReachesLive(Pipeline):
    stages = [FillEmail, OpenLive, TagPeople]


class ReachesLiveByURL(Pipeline):
    stages = [FillEmail, HardCodedEngine, TagPeople]
'''


@pytest.fixture
def seen_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "seen.jsonl"
    monkeypatch.setenv("PIPELINE_SEEN", str(path))
    return path


@pytest.fixture
def live_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Another database (the "live" one) that no stage may reach."""
    path = tmp_path / "live.db"
    with sqlite3.connect(path) as live:
        live.execute("CREATE TABLE people (id INTEGER PRIMARY KEY, kind TEXT)")
        live.execute("INSERT INTO people VALUES (1, 'real'), (2, 'real')")
    monkeypatch.setenv("PIPELINE_LIVE_URL", f"sqlite:///{path}")
    return path


def _setup(db: TestDB, tmp_path: Path, live_db: Path | None = None) -> Path:
    db.create_people(PEOPLE, with_email_every=3)
    db.execute("CREATE TABLE person_tags (person_id INTEGER NOT NULL, tag VARCHAR(64) NOT NULL, "
               "CONSTRAINT uq_person_tag UNIQUE (person_id, tag))")
    (tmp_path / "pipeline_jobs.py").write_text(JOBS)
    targets: dict[str, dict[str, Any]] = {"staging": {}}
    if live_db is not None:
        targets["live"] = {"url": f"sqlite:///{live_db}"}
    cfg = db.config(targets)
    assert run_cli(CliRunner(), cfg, "init", "--target", "staging").exit_code == 0
    return cfg


def _spec(tmp_path: Path, name: str = "Enrich") -> str:
    return f"{tmp_path / 'pipeline_jobs.py'}:{name}"


def _people(db: TestDB) -> list[tuple[Any, ...]]:
    return db.rows("SELECT id, name, email, kind FROM people ORDER BY id")


def _tags(db: TestDB) -> list[tuple[Any, ...]]:
    return db.rows("SELECT person_id, tag FROM person_tags ORDER BY person_id, tag")


def _run(cfg: Path, spec: str, *args: str, expect: int = 0) -> dict[str, Any]:
    result = run_cli(CliRunner(), cfg, "run", spec, "--target", "staging", "--json", *args)
    assert result.exit_code == expect, result.output
    return json.loads(result.stdout)


def _expected_email(i: int) -> str:
    return f"old{i}@x.org" if i % 3 == 0 else f"person{i}@example.com"


def test_stages_run_in_order_on_one_target_under_the_pipeline_run_id(
    db: TestDB, tmp_path: Path, seen_file: Path
) -> None:
    cfg = _setup(db, tmp_path)
    result = _run(cfg, _spec(tmp_path))
    run_id = result["run_id"]
    assert result["status"] == "succeeded"
    assert [s["stage"] for s in result["stages"]] == [
        "pipeline_jobs:FillEmail", "pipeline_jobs:FillKind", "pipeline_jobs:TagPeople"]
    fills = PEOPLE - PEOPLE // 3
    assert [s["plan"]["counts"]["writes"] for s in result["stages"]] == [fills, PEOPLE, PEOPLE]
    assert [s["apply"]["counts"]["applied"] for s in result["stages"]] == [fills, PEOPLE, PEOPLE]

    # later stages saw what earlier ones wrote: kind comes from the email stage 1 filled
    for i, _name, email, kind in _people(db):
        assert email == _expected_email(i)
        assert kind == email.split("@")[1]
    assert _tags(db) == [(i, _expected_email(i).split("@")[1]) for i in range(1, PEOPLE + 1)]

    # every stage saw the pipeline's run id and the same target; its own plan run is a child
    seen = [json.loads(line) for line in seen_file.read_text().splitlines()]
    assert [s["stage"] for s in seen] == ["email"] * 3 + ["kind"] * 3 + ["tag"] * 3  # in order, 3 pages each
    assert {(s["run_id"], s["target"], s["environment"]) for s in seen} == {(run_id, "staging", "staging")}
    plan_runs = {s["stage_run_id"] for s in seen}
    assert len(plan_runs) == 3
    parents = db.rows("SELECT run_id, parent_run_id, kind FROM fillgate_runs WHERE run_id IN ("
                      + ", ".join(f"'{r}'" for r in plan_runs) + ")")
    assert {(p, k) for _, p, k in parents} == {(run_id, "plan")}
    pipeline_run = db.rows("SELECT kind, status, target FROM fillgate_runs WHERE run_id = :r", {"r": run_id})
    assert pipeline_run == [("pipeline", "succeeded", "staging")]

    # a second run changes nothing
    table_before, audit_before = (_people(db), _tags(db)), db.scalar("SELECT count(*) FROM fillgate_changes")
    again = _run(cfg, _spec(tmp_path))
    assert [s["plan"]["counts"]["writes"] for s in again["stages"]] == [0, 0, 0]
    assert all(s["apply"] is None for s in again["stages"])
    assert again["counts"]["writes"] == again["counts"].get("applied", 0) == 0
    assert (_people(db), _tags(db)) == table_before
    assert db.scalar("SELECT count(*) FROM fillgate_changes") == audit_before


def test_a_crash_for_one_person_is_logged_with_the_stage_and_key_and_others_carry_on(
    db: TestDB, tmp_path: Path, seen_file: Path
) -> None:
    cfg = _setup(db, tmp_path)
    db.execute("UPDATE people SET name = 'boom' WHERE id = 41")
    result = _run(cfg, _spec(tmp_path), expect=1)
    assert result["stages"][0]["plan"]["counts"]["errors"] == 1
    assert [s["apply"]["counts"]["applied"] for s in result["stages"]] == [PEOPLE - PEOPLE // 3 - 1,
                                                                           PEOPLE - 1, PEOPLE - 1]
    people = {row[0]: row for row in _people(db)}
    assert people[41] == (41, "boom", None, None)  # that person's writes did not happen ...
    assert people[40][2:] == ("person40@example.com", "example.com")  # ... everyone else's did
    assert people[42][2:] == ("old42@x.org", "x.org")
    assert 41 not in {p for p, _ in _tags(db)} and len(_tags(db)) == PEOPLE - 1

    show = run_cli(CliRunner(), cfg, "show", result["run_id"], "--target", "staging", "--json")
    assert show.exit_code == 0, show.output
    (group,) = json.loads(show.stdout)["error_groups"]
    assert group["job"] == "pipeline_jobs:FillEmail"
    assert group["example_key"] == encode_key([41])
    assert (group["error_type"], group["count"]) == ("RuntimeError", 1)
    assert group["example_message"] == "no mailbox for person 41"
    human = run_cli(CliRunner(), cfg, "show", result["run_id"], "--target", "staging")
    assert human.exit_code == 0 and "errors and conflicts by fingerprint" in human.stdout

    # the second run changes nothing (person 41 still errs, and is still not written)
    audit = db.scalar("SELECT count(*) FROM fillgate_changes")
    again = _run(cfg, _spec(tmp_path), expect=1)
    assert again["counts"]["writes"] == 0 and again["counts"]["errors"] == 1
    assert db.scalar("SELECT count(*) FROM fillgate_changes") == audit


@pytest.mark.parametrize("pipeline, how", [
    ("ReachesLive", "tried to open target 'live'"),
    ("ReachesLiveByURL", "tried to open a database other than its target 'staging'"),
])
def test_a_stage_that_reaches_another_database_is_refused_before_it_writes(
    db: TestDB, tmp_path: Path, seen_file: Path, live_db: Path, pipeline: str, how: str
) -> None:
    cfg = _setup(db, tmp_path, live_db)
    result = run_cli(CliRunner(), cfg, "run", _spec(tmp_path, pipeline), "--target", "staging")
    assert result.exit_code == 3, result.output
    stage = "OpenLive" if pipeline == "ReachesLive" else "HardCodedEngine"
    message = " ".join(result.stderr.split())
    assert f"stage pipeline_jobs:{stage} of pipeline run" in message
    assert how in message
    # the stage before it ran; nothing of the refused stage (nor the one after) was written
    assert {kind for *_, kind in _people(db)} == {None}
    assert [email for _, _, email, _ in _people(db)] == [_expected_email(i) for i in range(1, PEOPLE + 1)]
    assert _tags(db) == []
    with sqlite3.connect(live_db) as live:
        assert live.execute("SELECT id, kind FROM people ORDER BY id").fetchall() == [(1, "real"), (2, "real")]
    ((status, run_message),) = db.rows(
        "SELECT status, message FROM fillgate_runs WHERE kind = 'pipeline'")
    assert status == "failed" and f"stage pipeline_jobs:{stage}" in run_message
    applied = db.rows("SELECT job FROM fillgate_runs WHERE kind = 'apply'")
    assert applied == [("pipeline_jobs:FillEmail",)]


def test_revert_of_a_pipeline_run_undoes_every_stage_last_first(db: TestDB, tmp_path: Path, seen_file: Path) -> None:
    cfg = _setup(db, tmp_path)
    original = (_people(db), _tags(db))
    result = _run(cfg, _spec(tmp_path))
    applies = [s["apply"]["run_id"] for s in result["stages"]]

    reverted = run_cli(CliRunner(), cfg, "revert", result["run_id"], "--target", "staging")
    assert reverted.exit_code == 0, reverted.output
    assert (_people(db), _tags(db)) == original
    reverts = db.rows("SELECT parent_run_id, status FROM fillgate_runs WHERE kind = 'revert' ORDER BY run_id")
    assert reverts == [(a, "succeeded") for a in reversed(applies)]  # TagPeople, FillKind, FillEmail
    ops = db.rows("SELECT DISTINCT c.op FROM fillgate_changes c JOIN fillgate_runs r ON r.run_id = c.run_id "
                  "WHERE r.kind = 'revert' AND c.table_name = 'person_tags'")
    assert ops == [("delete",)]


def test_a_conflict_in_any_stage_revert_makes_the_pipeline_revert_exit_1(
    db: TestDB, tmp_path: Path, seen_file: Path
) -> None:
    cfg = _setup(db, tmp_path)
    result = _run(cfg, _spec(tmp_path))
    db.execute("UPDATE person_tags SET tag = 'hand-made' WHERE person_id = 7")  # TagPeople's revert conflicts
    reverted = run_cli(CliRunner(), cfg, "revert", result["run_id"], "--target", "staging", "--json")
    assert reverted.exit_code == 1, reverted.output
    assert _tags(db) == [(7, "hand-made")]
    # --json reports every stage's revert, last stage first; only TagPeople's had the conflict
    reverts = json.loads(reverted.stdout)["reverts"]
    assert [r["counts"]["conflicts"] for r in reverts] == [1] + [0] * (len(reverts) - 1)


def test_plan_of_a_pipeline_writes_nothing(db: TestDB, tmp_path: Path, seen_file: Path) -> None:
    cfg = _setup(db, tmp_path)
    original = (_people(db), _tags(db))
    result = run_cli(CliRunner(), cfg, "plan", _spec(tmp_path), "--target", "staging", "--json")
    assert result.exit_code == 0, result.output
    planned = json.loads(result.stdout)
    assert planned["status"] == "planned"
    # every stage planned against the current data: FillKind and TagPeople see only what is stored
    assert [s["plan"]["counts"]["writes"] for s in planned["stages"]] == [PEOPLE - PEOPLE // 3, PEOPLE // 3,
                                                                          0]
    assert all(s["apply"] is None for s in planned["stages"])
    assert (_people(db), _tags(db)) == original
    assert db.scalar("SELECT count(*) FROM fillgate_changes") == 0
    kinds = {k for (k,) in db.rows("SELECT DISTINCT kind FROM fillgate_runs")}
    assert kinds == {"init", "pipeline", "plan"}
    human = run_cli(CliRunner(), cfg, "plan", _spec(tmp_path), "--target", "staging")
    assert human.exit_code == 0 and "pipeline" in human.stdout
    assert (_people(db), _tags(db)) == original
