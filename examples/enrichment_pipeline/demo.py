"""Example 1, end to end: a staged enrichment pipeline aimed at the wrong environment.

    python examples/enrichment_pipeline/demo.py [--url DATABASE_URL]

Two databases, "staging" and "live" (default: two SQLite files in a temporary folder; with
``--url postgresql://.../NAME`` or ``mysql://.../NAME`` the databases NAME_staging and
NAME_live are dropped and created there), both seeded with the same 40 people (staging is a
copy of live).

1. BEFORE: the QA sweep (``before.py``) is run against staging. Its nested enrichment
   endpoint has ``X-Target: live`` hard-coded, so the eight stages write into live; staging
   is untouched and the sweep reports success.
2. live is restored. WITH fillgate (``jobs.py``): ``fillgate run ...:EnrichPeople --target
   staging`` runs the eight stages on staging (a table of counts per stage); person 13's
   crash is one row error of stage ``enrich.link-work``, recorded with the person's key,
   while everyone else carries on. ``fillgate show`` lists it.
3. Run again: zero changes.
4. The incident's stage, kept as ``EnrichPeopleViaRoleEndpoint``: refused with exit 3 before
   it writes anything, naming the stage; live is untouched.
5. ``fillgate lint`` finds the hard-coded target (and URLs, and connections) in before.py.

Every fillgate step is the real command, run as a subprocess, with its real output.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

import before  # noqa: E402  (the example's own modules, next to this file)
import enrichment_world as world  # noqa: E402

JOBS = "examples/enrichment_pipeline/jobs.py"
BEFORE = "examples/enrichment_pipeline/before.py"


def _step(console: Console, number: int, title: str) -> None:
    console.print()
    console.print(Panel(f"[bold]{title}[/]", title=f"step {number}", title_align="left"))


def databases(url: str | None, workdir: Path) -> dict[str, str]:
    """The staging and live URLs: two SQLite files, or NAME_staging / NAME_live beside --url."""
    if url is None:
        return {env: f"sqlite:///{workdir / f'{env}.db'}" for env in ("staging", "live")}  # fillgate: allow
    base = sa.make_url(world.driver_url(url))
    if base.get_backend_name() == "sqlite":
        stem = Path(base.database or "enrichment.db")
        return {env: f"sqlite:///{stem.with_name(f'{stem.stem}_{env}.db')}" for env in ("staging", "live")}
    out = {}
    server = base.set(database="postgres" if base.get_backend_name() == "postgresql" else "information_schema")
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")  # fillgate: allow  (the demo is the operator)
    with admin.connect() as conn:
        for env in ("staging", "live"):
            name = f"{base.database}_{env}"
            if base.get_backend_name() == "postgresql":
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
            else:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
                conn.exec_driver_sql(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
            out[env] = url.rsplit("/", 1)[0] + "/" + name
    admin.dispose()
    return out


def _counts_table(title: str, rows: dict[str, dict[str, int]]) -> Table:
    t = Table(title=title, title_justify="left")
    t.add_column("database")
    names = ("full_name", "bio", "skills", "best_current_role", "complete", "links")
    for name in names:
        t.add_column(name, justify="right")
    for label, counts in rows.items():
        t.add_row(label, *(str(counts[n]) for n in names))
    return t


class CLI:
    """Runs ``fillgate ...`` as a user would, and prints the command and its output."""

    def __init__(self, console: Console, config: Path, workdir: Path) -> None:
        self.console, self.config, self.workdir = console, config, workdir

    def __call__(self, *args: str, show: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        shown = " ".join(a.replace(str(REPO) + "/", "") for a in args)
        env = {**os.environ, "COLUMNS": str(self.console.width), "PYTHONPATH": str(REPO / "src")}
        done = subprocess.run([sys.executable, "-m", "fillgate.cli", "--config", str(self.config), *args],
                              cwd=cwd or self.workdir, env=env, capture_output=True, text=True, timeout=300)
        if show:
            self.console.print(f"[dim]$ fillgate {shown}[/]")
            for text in (done.stdout, done.stderr):
                if text.strip():
                    self.console.out(text.rstrip(), highlight=False)
            self.console.print(f"[dim](exit {done.returncode})[/]")
        return done


def run(console: Console, url: str | None = None) -> int:
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="fillgate-enrich-"))
    urls = databases(url, workdir)
    os.environ["STAGING_DATABASE_URL"], os.environ["LIVE_DATABASE_URL"] = urls["staging"], urls["live"]
    staging = sa.create_engine(world.driver_url(urls["staging"]))  # fillgate: allow
    live = sa.create_engine(world.driver_url(urls["live"]))  # fillgate: allow
    checks: dict[str, bool] = {}
    console.print("[bold]Example 1: a staged enrichment pipeline aimed at the wrong environment.[/]")
    console.print(f"staging: {sa.make_url(urls['staging']).render_as_string()}\n"
                  f"live:    {sa.make_url(urls['live']).render_as_string()}")

    # --- 1. the incident --------------------------------------------------------------------
    _step(console, 1, "BEFORE: the QA sweep on staging; its nested endpoint has X-Target: live hard-coded")
    world.seed(staging)
    world.seed(live)
    seeded = world.fingerprint(live)
    console.print(f"Seeded both databases with the same {world.N_PEOPLE} people (staging is a copy of live).")
    console.print(f"[dim]$ STAGING_DATABASE_URL=... LIVE_DATABASE_URL=... python {BEFORE} --target staging[/]")
    report = before.qa_sweep("staging")
    for person_id, error in report["errors"]:
        console.print(f"  person {person_id}: {error}  [dim](logged; the whole person was skipped)[/]")
    console.print(_counts_table("what the sweep changed", {
        "staging (the target)": world.counts(staging), "live (production)": world.counts(live)}))
    checks["before wrote into live"] = world.fingerprint(live) != seeded and world.counts(live)["links"] > 0
    checks["before left staging untouched"] = world.counts(staging)["links"] == 0
    console.print(f"[bold red]The sweep said 'QA sweep on staging', and wrote {report['fields']} fields and "
                  f"{report['links']} link rows into LIVE.[/] Staging is untouched; no plan, no audit, no revert.")

    # --- 2. fillgate -------------------------------------------------------------------------
    _step(console, 2, "Restore live. WITH fillgate: the same eight stages as a Pipeline, on staging")
    world.seed(live)
    live_before = world.fingerprint(live)
    config = workdir / "fillgate.toml"
    config.write_text('[targets.staging]\nurl = "${STAGING_DATABASE_URL}"\n\n'
                      '[targets.live]\nurl = "${LIVE_DATABASE_URL}"\nprotected = true\n')
    console.print(f"[dim]{config}:[/]")
    console.out(config.read_text().rstrip(), highlight=False)
    cli = CLI(console, config, workdir)
    cli("init", "--target", "staging")
    first = cli("run", str(REPO / JOBS) + ":EnrichPeople", "--target", "staging")
    pipeline_run = next(line.split("fillgate show ")[1].strip() for line in first.stdout.splitlines()
                        if "fillgate show " in line)
    after_first = world.counts(staging)
    console.print(_counts_table("after the pipeline", {"staging": after_first, "live": world.counts(live)}))
    checks["pipeline enriched staging"] = after_first["complete"] == world.N_PEOPLE - 1
    checks["pipeline: exit 1 (one row error)"] = first.returncode == 1

    _step(console, 3, f"Person {world.CRASH_PERSON}'s crash: one row error of one stage; the others carried on")
    cli("show", pipeline_run, "--target", "staging")
    crashed = world.person(staging, world.CRASH_PERSON)
    neighbour = world.person(staging, world.CRASH_PERSON + 1)
    console.print(f"person {world.CRASH_PERSON}: {crashed}  [dim](their work links were not written, so not "
                  "complete; their other stages ran)[/]")
    console.print(f"person {world.CRASH_PERSON + 1}: {neighbour}")
    groups = json.loads(cli("show", pipeline_run, "--target", "staging", "--json", show=False).stdout)["error_groups"]
    checks["crash recorded with stage and person key"] = [(g["job"], g["example_key"]) for g in groups] == [
        ("enrich.link-work", f"[{world.CRASH_PERSON}]")]
    checks["crashed person not completed, others are"] = (crashed["enrichment_status"] is None
                                                          and neighbour["enrichment_status"] == "complete")

    _step(console, 4, "Run it again: every stage is additive and idempotent")
    with staging.connect() as conn:
        audit = conn.execute(sa.text("SELECT count(*) FROM fillgate_changes")).scalar_one()
    cli("run", str(REPO / JOBS) + ":EnrichPeople", "--target", "staging")
    with staging.connect() as conn:
        audit_again = conn.execute(sa.text("SELECT count(*) FROM fillgate_changes")).scalar_one()
    console.print(f"audit rows before: {audit}, after: {audit_again}; staging unchanged: "
                  f"{world.counts(staging) == after_first}")
    checks["second run changes nothing"] = audit == audit_again and world.counts(staging) == after_first

    _step(console, 5, "The incident's stage, kept as a variant: stage 8 asks the 'role endpoint' on live")
    staged = world.fingerprint(staging)
    refused = cli("run", str(REPO / JOBS) + ":EnrichPeopleViaRoleEndpoint", "--target", "staging")
    same_live = world.fingerprint(live) == live_before
    console.print(f"live untouched: {same_live}; staging untouched: {world.fingerprint(staging) == staged}")
    checks["buggy stage refused with exit 3, naming it"] = (
        refused.returncode == 3 and "stage enrich.complete-via-role-endpoint" in " ".join(refused.stderr.split()))
    checks["live untouched by fillgate"] = same_live

    _step(console, 6, "fillgate lint finds the hard-coded target in the before version, without running it")
    lint = cli("lint", BEFORE, cwd=REPO)
    checks["lint finds the X-Target: live header (exit 1)"] = lint.returncode == 1 and "X-Target: live" in lint.stdout

    console.print()
    for name, ok in checks.items():
        console.print(f"{'[green]✓[/]' if ok else '[bold red]✗[/]'} {name}")
    good = all(checks.values())
    console.print(f"\n[{'green' if good else 'red'}]Done in {time.perf_counter() - started:.1f}s.[/] "
                  f"Work folder: {workdir}")
    staging.dispose()
    live.dispose()
    return 0 if good else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Example 1: a staged enrichment pipeline aimed at the wrong "
                                     "environment, without and with fillgate.")
    parser.add_argument("--url", help="a PostgreSQL/MariaDB URL whose server gets NAME_staging and NAME_live "
                        "(default: two SQLite files in a temporary folder)")
    args = parser.parse_args(argv)
    return run(Console(highlight=False, width=None if sys.stdout.isatty() else 130), args.url)


if __name__ == "__main__":
    sys.exit(main())
