"""Example 1 (examples/enrichment_pipeline): a staged enrichment pipeline aimed at the wrong
environment, without and with fillgate.

First the incident: the QA sweep (before.py) is run against staging, and its nested endpoint,
whose target is hard-coded to live, writes all eight stages into live. Then the same stages as
a fillgate Pipeline (jobs.py) on staging: staging is enriched, live untouched; person 13's
crash is one row error of stage enrich.link-work under the person's key; a second run changes
nothing; the incident's stage is refused (exit 3) naming the stage; revert restores staging;
``fillgate lint`` finds the hard-coded target in before.py.

Staging is the test database (every backend); live is a second database, a SQLite file.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from conftest import TestDB, load_module, run_cli

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "enrichment_pipeline"


def _load(name: str) -> ModuleType:
    """An example module by path, under a name no other test module uses."""
    return load_module(EXAMPLE / f"{name}.py", f"enrichment_pipeline_{name}")


# the example's shared module, under the name its jobs.py and before.py import it by, without
# putting the example folder (its generic before.py, jobs.py) on sys.path
world = load_module(EXAMPLE / "enrichment_world.py", "enrichment_world", shared=True)


before = _load("before")

PIPELINE = f"{EXAMPLE / 'jobs.py'}:EnrichPeople"
BUGGY = f"{EXAMPLE / 'jobs.py'}:EnrichPeopleViaRoleEndpoint"
STAGES = ["enrich.fill-profile", "enrich.link-education", "enrich.link-work", "enrich.link-certifications",
          "enrich.link-projects", "enrich.link-honors", "enrich.link-volunteering", "enrich.complete"]
CRASH = world.CRASH_PERSON


@pytest.fixture
def live(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'live.db'}")
    world.seed(engine)
    monkeypatch.setenv("LIVE_DATABASE_URL", f"sqlite:///{tmp_path / 'live.db'}")
    yield engine
    engine.dispose()


def _run(cfg: Path, spec: str, expect: int) -> dict[str, Any]:
    result = run_cli(CliRunner(), cfg, "run", spec, "--target", "staging", "--json")
    assert result.exit_code == expect, result.output
    return json.loads(result.stdout)


def _audit(db: TestDB) -> int:
    return db.scalar("SELECT count(*) FROM fillgate_changes")


def test_the_sweep_on_staging_wrote_live_and_fillgate_keeps_every_stage_on_staging(
    db: TestDB, live: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.seed(db.engine)
    seeded = world.fingerprint(db.engine)
    assert seeded == world.fingerprint(live)  # staging is a copy of live

    # --- without fillgate: "QA sweep on staging" enriches live ------------------------------
    monkeypatch.setenv("STAGING_DATABASE_URL", db.url)
    report = before.qa_sweep("staging", quiet=True)
    assert report["target"] == "staging" and report["people"] == world.N_PEOPLE - 1
    assert report["links"] == 246 and report["fields"] == 169  # ... it believes it did this to staging
    assert world.fingerprint(db.engine) == seeded  # but staging is untouched
    damaged = world.counts(live)
    assert damaged == {"people": 40, "full_name": 39, "bio": 35, "skills": 39, "best_current_role": 39,
                       "complete": 39, "links": 246}  # and live got every stage
    assert report["errors"] == [(CRASH, "AttributeError: 'NoneType' object has no attribute 'casefold'")]

    # --- with fillgate ----------------------------------------------------------------------
    world.seed(live)  # restore live from its backup
    live_seeded = world.fingerprint(live)
    cfg = db.config({"staging": {}, "live": {"url": f"sqlite:///{tmp_path / 'live.db'}", "protected": True}})
    assert run_cli(CliRunner(), cfg, "init", "--target", "staging").exit_code == 0

    first = _run(cfg, PIPELINE, expect=1)  # 1: one person's row error
    assert [s["stage"] for s in first["stages"]] == STAGES
    assert [s["plan"]["counts"]["writes"] for s in first["stages"]] == [94, 57, 71, 42, 37, 20, 23, 78]
    assert [s["plan"]["counts"]["errors"] for s in first["stages"]] == [0, 0, 1, 0, 0, 0, 0, 0]
    assert [s["apply"]["counts"]["applied"] for s in first["stages"]] == [94, 57, 71, 42, 37, 20, 23, 78]
    enriched = world.counts(db.engine)
    assert enriched == {"people": 40, "full_name": 40, "bio": 36, "skills": 40, "best_current_role": 39,
                        "complete": 39, "links": 250}
    assert world.fingerprint(live) == live_seeded  # live never reached
    ledger = db.rows("SELECT DISTINCT target FROM fillgate_runs WHERE kind IN ('pipeline', 'plan', 'apply')")
    assert ledger == [("staging",)]

    # person 13's crash: one row error of one stage, under the person's key; the rest carried on
    show = run_cli(CliRunner(), cfg, "show", first["run_id"], "--target", "staging", "--json")
    (group,) = json.loads(show.stdout)["error_groups"]
    assert (group["job"], group["example_key"], group["error_type"]) == ("enrich.link-work", f"[{CRASH}]",
                                                                          "AttributeError")
    crashed, neighbour = world.person(db.engine, CRASH), world.person(db.engine, CRASH + 1)
    assert crashed["full_name"] is not None and crashed["links"] > 0  # their other stages ran
    assert crashed["enrichment_status"] is None and crashed["best_current_role"] is None
    assert db.scalar("SELECT count(*) FROM work_companies l JOIN work w ON w.id = l.work_id "
                     "WHERE w.person_id = :p", {"p": CRASH}) == 0  # their work links: not written
    assert neighbour["enrichment_status"] == "complete"

    # the link rows are audited inserts, one per row, under each stage's own apply run
    links = db.scalar("SELECT count(*) FROM fillgate_changes WHERE op = 'insert'")
    assert links == enriched["links"]

    # a second run changes nothing
    audit = _audit(db)
    second = _run(cfg, PIPELINE, expect=1)  # person 13 still errs, still unwritten
    assert [s["plan"]["counts"]["writes"] for s in second["stages"]] == [0] * 8
    assert _audit(db) == audit and world.counts(db.engine) == enriched

    # the incident's stage: refused before it writes anything, naming the stage
    staged = world.fingerprint(db.engine)
    refused = run_cli(CliRunner(), cfg, "run", BUGGY, "--target", "staging")
    assert refused.exit_code == 3, refused.output
    message = " ".join(refused.stderr.split())
    assert "stage enrich.complete-via-role-endpoint of pipeline run" in message
    assert "tried to open target 'live' while running against 'staging'" in message
    assert world.fingerprint(db.engine) == staged and world.fingerprint(live) == live_seeded
    assert _audit(db) == audit
    failed = db.rows("SELECT status FROM fillgate_runs WHERE kind = 'pipeline' AND job = "
                     "'enrich-people-via-role-endpoint'")
    assert failed == [("failed",)]

    # and the first run can be undone, stage by stage, last stage first
    reverted = run_cli(CliRunner(), cfg, "revert", first["run_id"], "--target", "staging")
    assert reverted.exit_code == 0, reverted.output
    assert world.fingerprint(db.engine) == seeded


def test_lint_finds_the_hard_coded_target_in_the_before_version(cli: CliRunner) -> None:
    result = run_cli(cli, None, "lint", str(EXAMPLE / "before.py"))
    assert result.exit_code == 1, result.output
    header = next(n for n, line in enumerate((EXAMPLE / "before.py").read_text().splitlines(), start=1)
                  if line.startswith("ENRICH_HEADERS"))
    assert f"before.py:{header}:" in result.stdout and "FG004" in result.stdout and "X-Target: live" in result.stdout
    assert "FG005 sqlalchemy.create_engine()" in result.stdout  # the endpoint's own engine
    # jobs.py: only the deliberately buggy variant's header line
    jobs = run_cli(cli, None, "lint", str(EXAMPLE / "jobs.py"), "--json")
    findings = json.loads(jobs.stdout)["findings"]
    assert jobs.exit_code == 1
    assert [(f["code"], f["found"]) for f in findings] == [("FG004", "X-Target: live")]
    assert (EXAMPLE / "jobs.py").read_text().splitlines()[findings[0]["line"] - 1].startswith("ROLE_ENDPOINT_HEADERS")
