"""Example 2, "Stale agent classifications" (examples/stale_classifications/).

First the failure the way the original team hit it (the plain scripts of ``before.py``), then
fillgate stopping it: the Promote matrix, exact reconcile flips, the --max-changes gate, the
audit log and history, and a re-probe that never writes NULL over a good value.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from fillgate import Failed, Job, Limits, apply_plan, connect, init_target, load_job, make_plan
from fillgate.policy import Decision

from conftest import TestDB, load_module, run_cli

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "stale_classifications"
JOBS = str(EXAMPLE / "jobs.py")


def _load(name: str, file: str) -> ModuleType:
    """Load an example module under a unique name (other examples have a before.py too)."""
    return load_module(EXAMPLE / file, name, shared=True)


world = _load("stale_agents", "stale_agents.py")
before = _load("stale_before", "before.py")
TRUTH = {a.id: a.true_type for a in world.generate()[1]}
FAILING = sorted((*world.TIMEOUT_IDS, world.DNS_ID, world.HTTP_ERROR_ID))


@pytest.fixture(scope="module")
def probe_base() -> Iterator[str]:
    with world.probe_server() as base:
        yield base


def _plan_lines(path: str | Path) -> list[dict[str, Any]]:
    lines = Path(path).read_text().splitlines()
    return [json.loads(line) for line in lines[1:]]


# --- the Promote matrix, against the database --------------------------------------------------

FAIL = Failed("probe timed out")
# stored value x proposed value -> (decision, value stored afterwards)
MATRIX = [
    (None, "buying", Decision.WRITE, "buying"),
    (None, "sales", Decision.WRITE, "sales"),
    (None, "unknown", Decision.WRITE, "unknown"),
    (None, None, Decision.UNCHANGED, None),
    (None, FAIL, Decision.SKIPPED, None),
    ("unknown", "buying", Decision.WRITE, "buying"),
    ("unknown", "sales", Decision.WRITE, "sales"),
    ("unknown", "unknown", Decision.UNCHANGED, "unknown"),
    ("unknown", None, Decision.SKIPPED, "unknown"),
    ("unknown", FAIL, Decision.SKIPPED, "unknown"),
    ("buying", "buying", Decision.UNCHANGED, "buying"),
    ("buying", "sales", Decision.DISAGREEMENT, "buying"),
    ("buying", "unknown", Decision.PRESERVED, "buying"),
    ("buying", None, Decision.PRESERVED, "buying"),
    ("buying", FAIL, Decision.PRESERVED, "buying"),
    ("sales", "sales", Decision.UNCHANGED, "sales"),
    ("sales", "buying", Decision.DISAGREEMENT, "sales"),
    ("sales", "unknown", Decision.PRESERVED, "sales"),
    ("sales", None, Decision.PRESERVED, "sales"),
    ("sales", FAIL, Decision.PRESERVED, "sales"),
]
LINE_KIND = {Decision.WRITE: "change", Decision.DISAGREEMENT: "disagreement", Decision.PRESERVED: "preserved"}
COUNT = {Decision.WRITE: "writes", Decision.UNCHANGED: "unchanged", Decision.SKIPPED: "skipped",
         Decision.DISAGREEMENT: "disagreements", Decision.PRESERVED: "preserved"}


def test_the_crawler_policy_pins_the_full_promote_matrix(db: TestDB) -> None:
    crawler = load_job(f"{JOBS}:CrawlerUpdate")
    policy = crawler.policies()["agent_type"]
    assert repr(policy) == "Promote(unknown=['unknown'])"
    proposals = {i: new for i, (_, new, _, _) in enumerate(MATRIX, start=1)}

    class Matrix(Job):
        name = "promote-matrix"
        table = "agents"
        key = ("id",)
        columns = {"agent_type": policy}
        source = "SELECT id, agent_type FROM agents"

        def compute(self, row: Any, ctx: Any) -> dict[str, Any]:
            return {"agent_type": proposals[row["id"]]}

    for ddl in world.SCHEMA:
        db.execute(ddl)
    db.execute("INSERT INTO members (id, name, country, joined_on) VALUES (1, 'Matrix Ltd', 'GB', '2020-01-01')")
    db.execute(
        "INSERT INTO agents (id, member_id, name, agent_type, capabilities, probe_url, registered_on) "
        "VALUES (:id, 1, :name, :t, '{}', 'http://127.0.0.1:9/x', '2020-01-01')",
        [{"id": i, "name": f"agent {i}", "t": stored} for i, (stored, _, _, _) in enumerate(MATRIX, start=1)],
    )
    init_target(db.target())
    conn = connect(db.target())
    plan = make_plan(conn, Matrix, out=db.tmp_path / "matrix.plan")

    kinds = {line["key"][0]: line["kind"] for line in _plan_lines(plan.path)}
    expected_counts = dict.fromkeys(COUNT.values(), 0)
    for i, (stored, new, decision, _) in enumerate(MATRIX, start=1):
        assert policy.decide(stored, new) is decision, (stored, new)
        assert kinds.get(i) == LINE_KIND.get(decision), (stored, new, decision)
        expected_counts[COUNT[decision]] += 1
    assert {k: plan.counts[k] for k in expected_counts} == expected_counts
    assert plan.counts["rows"] == len(MATRIX)

    apply_plan(conn, plan.path, Limits(max_changes=len(MATRIX)))
    stored_now = world.agent_types(db.engine)
    assert [stored_now[i] for i in range(1, len(MATRIX) + 1)] == [final for *_, final in MATRIX]
    audit = db.rows("SELECT row_key, old_value, new_value FROM fillgate_changes ORDER BY id")
    assert audit == [
        (f"[{i}]", json.dumps(stored), json.dumps(new))
        for i, (stored, new, decision, _) in enumerate(MATRIX, start=1) if decision is Decision.WRITE
    ]


# --- without fillgate: the incident ------------------------------------------------------------


def test_without_fillgate_stale_types_stay_wrong_and_failed_probes_write_null(
    db: TestDB, probe_base: str
) -> None:
    world.seed(db.engine, probe_base)
    assert before.crawler_update(db.engine) == len(world.NULL_IDS)
    assert before.crawler_update(db.engine) == 0  # however often it runs ...
    types = world.agent_types(db.engine)
    assert {i: types[i] for i in world.MISTYPED} == {17: "sales", 83: "buying"}  # ... these stay wrong
    assert all(types[i] == "unknown" for i in world.UNKNOWN_IDS)  # ... and these stay unknown

    result = before.naive_reprobe(db.engine)
    types = world.agent_types(db.engine)
    assert sorted(i for i, t in types.items() if t is None) == FAILING  # good types wiped to NULL
    assert types[world.FLAKY_ID] != TRUTH[world.FLAKY_ID]  # flipped on one flaky probe
    assert {(i, old) for i, old, new in result["changed"] if new is None} == {(i, TRUTH[i]) for i in FAILING}
    assert db.scalar("SELECT count(*) FROM agents WHERE agent_type IS NULL") == len(FAILING)


# --- with fillgate -------------------------------------------------------------------------------


def test_with_fillgate_exact_flips_gate_audit_and_history(db: TestDB, cli: Any) -> None:
    world.seed(db.engine, "http://probes.test")
    config = db.config()
    assert run_cli(cli, config, "init").exit_code == 0

    # The crawler: promote NULL/unknown, list the two disagreements, flip nothing known.
    crawl = run_cli(cli, config, "plan", f"{JOBS}:CrawlerUpdate", "-o", "crawler.plan", "--json")
    assert crawl.exit_code == 0, crawl.output
    counts = json.loads(crawl.stdout)["counts"]
    assert (counts["writes"], counts["disagreements"], counts["preserved"]) == (20, 2, 3)
    lines = _plan_lines(db.tmp_path / "crawler.plan")
    assert sorted(line["key"][0] for line in lines if line["kind"] == "change") == sorted(
        world.NULL_IDS + world.UNKNOWN_IDS)
    assert [(line["key"], line["old"], line["new"]) for line in lines if line["kind"] == "disagreement"] == [
        ([17], "sales", "buying"), ([83], "buying", "sales")]
    assert run_cli(cli, config, "apply", "crawler.plan", "--max-changes", "25").exit_code == 0
    types = world.agent_types(db.engine)
    assert {types[17], types[83]} == {"sales", "buying"} and types[17] == "sales"  # not flipped
    assert None not in types.values()

    # A reconcile with a bad rule would flip > 25 agents: refused, exit 3, nothing written.
    snapshot, audit_rows = world.agent_types(db.engine), db.scalar("SELECT count(*) FROM fillgate_changes")
    gate = run_cli(cli, config, "run", f"{JOBS}:ReconcileAgentTypes", "--param", "rule=name",
                   "--max-changes", "25", "-o", "bad/")
    assert gate.exit_code == 3, gate.output
    assert "more than --max-changes 25" in gate.stderr and "Nothing was written" in gate.stderr
    planned_bad = json.loads(run_cli(cli, config, "runs", "--kind", "plan", "-n", "1", "--json").stdout)[0]
    assert planned_bad["counts"]["writes"] > 25
    assert world.agent_types(db.engine) == snapshot
    assert db.scalar("SELECT count(*) FROM fillgate_changes") == audit_rows

    # The reconcile backfill: exactly the two mis-typed agents.
    rec = run_cli(cli, config, "plan", f"{JOBS}:ReconcileAgentTypes", "-o", "reconcile.plan", "--json")
    assert rec.exit_code == 0, rec.output
    changes = [(line["key"], line["old"], line["new"])
               for line in _plan_lines(db.tmp_path / "reconcile.plan") if line["kind"] == "change"]
    assert changes == [([17], "sales", "buying"), ([83], "buying", "sales")]
    applied = run_cli(cli, config, "apply", "reconcile.plan", "--max-changes", "25", "--json")
    assert applied.exit_code == 0, applied.output
    run_id = json.loads(applied.stdout)["run_id"]
    types = world.agent_types(db.engine)
    assert all(types[i] == TRUTH[i] for i in types)

    # The audit log: which run flipped what, from what, with its source.
    assert db.rows(
        "SELECT table_name, row_key, column_name, op, old_value, new_value, source FROM fillgate_changes "
        "WHERE run_id = :r ORDER BY id", {"r": run_id}
    ) == [
        ("agents", "[17]", "agent_type", "update", '"sales"', '"buying"', "reconcile-agent-types"),
        ("agents", "[83]", "agent_type", "update", '"buying"', '"sales"', "reconcile-agent-types"),
    ]

    # History: when did agent 17 flip, and from what?
    history = run_cli(cli, config, "history", "agents", "17", "--json")
    assert history.exit_code == 0
    (entry,) = json.loads(history.stdout)
    assert (entry["run_id"], entry["kind"], entry["source"], entry["column_name"], entry["old_value"],
            entry["new_value"]) == (run_id, "apply", "reconcile-agent-types", "agent_type", "sales", "buying")
    assert entry["changed_at"]
    text = run_cli(cli, config, "history", "agents", "17").stdout
    assert "apply" in text and "sales" in text and "buying" in text
    assert "No recorded changes" in run_cli(cli, config, "history", "agents", "18").stdout


def test_reprobe_preserves_types_when_probes_fail_and_reports_slowest_agents(
    db: TestDB, cli: Any, probe_base: str
) -> None:
    world.seed(db.engine, probe_base)
    config = db.config()
    assert run_cli(cli, config, "init").exit_code == 0
    stored = world.agent_types(db.engine)

    result = run_cli(cli, config, "run", f"{JOBS}:ReprobeAgentTypes", "--max-changes", "25", "-o", "plans/",
                     "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["counts"]["applied"] == len(world.NULL_IDS) + len(world.UNKNOWN_IDS)

    types = world.agent_types(db.engine)
    assert None not in types.values()  # no NULL written, anywhere
    assert {i: types[i] for i in FAILING} == {i: stored[i] for i in FAILING}  # preserved
    assert types[world.FLAKY_ID] == stored[world.FLAKY_ID]  # one probe never flips a known type
    assert {types[17], types[83]} == {"sales", "buying"} and types[17] == "sales"  # disagreements only
    assert all(types[i] == TRUTH[i] for i in world.NULL_IDS + world.UNKNOWN_IDS)
    assert db.scalar("SELECT count(*) FROM fillgate_changes WHERE new_value = 'null'") == 0

    plan_run = json.loads(run_cli(cli, config, "runs", "--kind", "plan", "--json").stdout)[0]
    lines = _plan_lines(plan_run["plan_path"])
    preserved = {line["key"][0]: line["reason"] for line in lines if line["kind"] == "preserved"}
    assert preserved == {
        **{i: "probe timed out after 200 ms" for i in world.TIMEOUT_IDS},
        world.DNS_ID: f"probe DNS failed: agent-{world.DNS_ID}.invalid",
        world.HTTP_ERROR_ID: "probe HTTP 503",
    }
    assert sorted(line["key"][0] for line in lines if line["kind"] == "disagreement") == [17, 83, world.FLAKY_ID]

    # Per-agent timing: the slowest agents are in the run report.
    shown = run_cli(cli, config, "show", plan_run["run_id"], "--json")
    slowest = json.loads(shown.stdout)["details"]["slowest"]
    assert {item["key"][0] for item in slowest[:3]} == set(world.TIMEOUT_IDS)
    assert all(item["ms"] >= 190 for item in slowest[:3])
    assert set(world.SLOW) <= {item["key"][0] for item in slowest}
    text = run_cli(cli, config, "show", plan_run["run_id"]).stdout
    assert "slowest" in text and str(world.TIMEOUT_IDS[0]) in text


def test_the_demo_runs_with_one_command(tmp_path: Path) -> None:
    """The README's command, as is (a new SQLite file); the jobs are tested on every backend above."""
    env = {**os.environ, "COLUMNS": "120", "FILLGATE_OPERATOR": "demo@test"}
    done = subprocess.run([sys.executable, str(EXAMPLE / "demo.py")], capture_output=True, text=True, env=env,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for expected in (
        "crawler pass 1: typed 12 agents", "crawler pass 2: typed 0 agents",
        "probed 300 agents, changed 16",
        "refused: plan", "more than --max-changes 25. Nothing was written.", "(exit 3)",
        "agents unchanged, audit log unchanged: True",
        "applied 2, conflicts 0", "reconcile-agent-types",
        "probe timed out after 200 ms", "probe DNS failed: agent-119.invalid",
        "slowest rows", "Agents whose type differs from the truth: none",
    ):
        assert expected in out, expected
