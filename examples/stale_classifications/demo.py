"""Example 2, end to end: stale agent classifications, without and with fillgate.

    python examples/stale_classifications/demo.py [--url DATABASE_URL]

1. Seeds a registry of 300 agents of 75 members (default: a new SQLite file in a temporary
   folder; ``--url`` (re)creates the ``members`` and ``agents`` tables of that database) and
   starts the agents' probe endpoints on a free localhost port.
2. Runs the original scripts (``before.py``): the crawler leaves the two mis-typed agents
   wrong however often it runs; the naive re-probe flips an agent on one flaky probe and
   writes NULL over five good types whose probe timed out or failed.
3. Re-seeds and does it with fillgate (``jobs.py``): the crawler's plan lists the two
   disagreements without flipping them; a reconcile with a bad rule is refused by
   ``--max-changes 25``; the real reconcile flips exactly the two agents, audited with its
   source; ``history`` says when agent 17 flipped and from what; the re-probe keeps every
   type whose probe failed, and ``show`` lists the slowest agents.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import before  # noqa: E402  (the example's own modules, next to this file)
import stale_agents as world  # noqa: E402
from jobs import CrawlerUpdate, ReconcileAgentTypes, ReprobeAgentTypes  # noqa: E402

from fillgate import GuardRefused, Limits, Target, apply_plan, connect, init_target, make_plan, report, row_history  # noqa: E402

JOBS = "examples/stale_classifications/jobs.py"


def _step(console: Console, number: int, title: str, command: str | None = None) -> None:
    console.print()
    body = f"[bold]{title}[/]" + (f"\n[dim]$ {command}[/]" if command else "")
    console.print(Panel(body, title=f"step {number}", title_align="left"))


def _type_counts(engine: sa.Engine) -> str:
    types = world.agent_types(engine).values()
    return ", ".join(f"{name} {sum(1 for t in types if t == value)}"
                     for name, value in (("buying", "buying"), ("sales", "sales"), ("unknown", "unknown"),
                                         ("NULL", None)))


def _agents_table(engine: sa.Engine, ids: list[int], title: str, expected: dict[int, str | None]) -> Table:
    stored = world.agent_types(engine)
    with engine.connect() as conn:
        names = dict(conn.execute(sa.text("SELECT id, name FROM agents")).all())
    t = Table(title=title, title_justify="left")
    for col in ("agent", "name", "stored type", "should be"):
        t.add_column(col)
    for agent_id in ids:
        ok = stored[agent_id] == expected[agent_id]
        style = "green" if ok else "bold red"
        t.add_row(str(agent_id), names[agent_id], f"[{style}]{stored[agent_id] or 'NULL'}[/]", str(expected[agent_id]))
    return t


def _audit_table(engine: sa.Engine, run_id: str) -> Table:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT c.row_key, c.column_name, c.old_value, c.new_value, c.source, c.changed_at, "
                    "r.operator FROM fillgate_changes c JOIN fillgate_runs r ON r.run_id = c.run_id "
                    "WHERE c.run_id = :run ORDER BY c.id"),
            {"run": run_id},
        ).all()
    t = Table(title=f"fillgate_changes of run {run_id} (table agents)", title_justify="left")
    for col in ("key", "column", "old", "new", "source", "changed at (UTC)", "operator"):
        t.add_column(col, no_wrap=True)
    for key, column, old, new, source, changed_at, operator in rows:
        t.add_row(key, column, str(json.loads(old)), str(json.loads(new)), source, str(changed_at)[:19], operator)
    return t


def run(console: Console, url: str | None = None) -> None:
    started = time.perf_counter()
    # The demo is the operator, not a job: it names its database and seeds it directly.
    if url is None:
        folder = Path(tempfile.mkdtemp(prefix="fillgate-stale-"))
        url = f"sqlite:///{folder / 'registry.db'}"  # fillgate: allow
    target = Target.from_url("demo", url)  # fillgate: allow
    engine = sa.create_engine(target.url)  # fillgate: allow
    truth = {a.id: a.true_type for a in world.generate()[1]}
    mistyped = sorted(world.MISTYPED)
    failing = sorted((*world.TIMEOUT_IDS, world.DNS_ID, world.HTTP_ERROR_ID))
    console.print(f"[bold]Example 2: stale agent classifications[/] on {target.safe_url}")

    with world.probe_server() as probe_base:
        _step(console, 1, "Seed the registry; start the agents' probe endpoints on " + probe_base)
        world.seed(engine, probe_base)
        console.print(f"{world.N_AGENTS} agents of {world.N_MEMBERS} members. Stored types: {_type_counts(engine)}.")

        # --- before: the incident ---------------------------------------------------------
        _step(console, 2, "Before: the crawler writes a type only where it is missing",
              "python examples/stale_classifications/before.py crawler --url ...")
        for attempt in (1, 2):
            console.print(f"crawler pass {attempt}: typed {before.crawler_update(engine)} agents")
        console.print(_agents_table(engine, mistyped, "the two mis-typed agents after two passes", truth))
        console.print(f"Stored types now: {_type_counts(engine)}: the 'unknown' ones and the wrong ones "
                      "stay that way forever.")

        _step(console, 3, "Before: the naive re-probe overwrites on one probe, and NULL when a probe fails",
              "python examples/stale_classifications/before.py reprobe --url ...")
        result = before.naive_reprobe(engine)
        console.print(f"probed {result['probed']} agents, changed {len(result['changed'])}, with no "
                      "dry run, no limit and no record of what it changed.")
        console.print(_agents_table(engine, [*mistyped, world.FLAKY_ID, *failing],
                                    "fixed two, then broke six", truth))
        console.print(f"Stored types now: {_type_counts(engine)}.")

        # --- with fillgate ------------------------------------------------------------------
        _step(console, 4, "With fillgate: re-seed, create the ledger and stamp the database 'demo'",
              "fillgate init --target demo")
        world.seed(engine, probe_base)
        report.print_init(console, init_target(target))
        conn = connect(target)
        plans = Path(tempfile.mkdtemp(prefix="fillgate-stale-plans-"))

        _step(console, 5, "The crawler's update rule: Promote(unknown=['unknown']); disagreements are "
              "listed, never flipped", f"fillgate plan {JOBS}:CrawlerUpdate --target demo -o crawler.plan")
        crawler = make_plan(conn, CrawlerUpdate, out=plans / "crawler.plan")
        report.print_plan(console, crawler, sample=3)
        console.print(f"[dim]$ fillgate apply {crawler.path} --max-changes 25[/]")
        report.print_apply(console, apply_plan(conn, crawler.path, Limits(max_changes=25)))

        _step(console, 6, "A reconcile with a bad rule would flip far more than two agents: the gate refuses it",
              f"fillgate run {JOBS}:ReconcileAgentTypes --param rule=name --target demo --max-changes 25")
        audit_before = _count(engine, "fillgate_changes")
        types_before = world.agent_types(engine)
        bad = make_plan(conn, ReconcileAgentTypes, {"rule": "name"}, out=plans / "reconcile-name.plan")
        console.print(f"plan {bad.header.plan_id}: {bad.header.changes} flips")
        try:
            apply_plan(conn, bad.path, Limits(max_changes=25))
        except GuardRefused as exc:
            console.print(f"[bold red]refused:[/] {exc} (exit {exc.exit_code})")
        unchanged = world.agent_types(engine) == types_before and _count(engine, "fillgate_changes") == audit_before
        console.print(f"agents unchanged, audit log unchanged: {unchanged}")

        _step(console, 7, "The reconcile backfill: Overwrite from the capability snapshot, exactly the "
              "expected flips", f"fillgate plan {JOBS}:ReconcileAgentTypes --target demo -o reconcile.plan")
        reconcile = make_plan(conn, ReconcileAgentTypes, out=plans / "reconcile.plan")
        report.print_plan(console, reconcile, sample=5)
        console.print(f"[dim]$ fillgate apply {reconcile.path} --max-changes 25[/]")
        applied = apply_plan(conn, reconcile.path, Limits(max_changes=25))
        report.print_apply(console, applied)

        _step(console, 8, "The audit log: who flipped what, when, and by which job",
              f"SELECT * FROM fillgate_changes WHERE run_id = '{applied.run.run_id}'")
        console.print(_audit_table(engine, applied.run.run_id))

        _step(console, 9, "When did agent 17 flip, and from what?", "fillgate history agents 17 --target demo")
        report.print_history(console, "agents", "17", row_history(conn, "agents", "17"))

        _step(console, 10, "The re-probe, with a 200 ms timeout: a failed probe keeps the stored type",
              f"fillgate run {JOBS}:ReprobeAgentTypes --target demo --max-changes 25")
        reprobe = make_plan(conn, ReprobeAgentTypes, out=plans / "reprobe.plan")
        report.print_plan(console, reprobe, sample=3)
        report.print_apply(console, apply_plan(conn, reprobe.path, Limits(max_changes=25)))

        _step(console, 11, "Per-agent timing: the slowest agents of the re-probe",
              f"fillgate show {reprobe.run.run_id} --target demo")
        report.print_show(console, conn.ledger.get_run(reprobe.run.run_id), [])

    final = world.agent_types(engine)
    wrong = sorted(i for i, t in final.items() if t != truth[i])
    console.print(
        f"\nStored types now: {_type_counts(engine)}. Agents whose type differs from the truth: "
        f"{wrong or 'none'}" + (f" (agent {world.FLAKY_ID}'s probe is the flaky one; its disagreement is "
                                "in the plan for review)" if wrong == [] else "")
    )
    console.print(f"[green]Done in {time.perf_counter() - started:.1f}s.[/] Database: {target.safe_url}")
    engine.dispose()


def _count(engine: sa.Engine, table: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one())


def main() -> None:
    parser = argparse.ArgumentParser(description="Example 2: stale agent classifications, without and with fillgate.")
    parser.add_argument("--url", help="database URL (default: a new SQLite file in a temporary folder)")
    args = parser.parse_args()
    run(Console(highlight=False), args.url)


if __name__ == "__main__":
    main()
