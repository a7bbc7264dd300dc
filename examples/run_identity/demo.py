"""Example 3, end to end: run identity and persistence, without and with fillgate.

    python examples/run_identity/demo.py [--url DATABASE_URL]

Seeds ``articles`` and ``digests`` (UNIQUE (run_timestamp, topic)) in a new SQLite file in a
temporary folder (``--url``: that database's two tables are replaced), then:

1. BEFORE (``before.py``): the scheduler process runs the digest twice, with news arriving
   in between. The run id was taken once per process, so the second run deletes and replaces
   the first run's digests. A hidden ``sqlite3.connect()`` wrote ``summary_cache.db`` into the
   working folder, whatever ``DATABASE_URL`` said. The late-article path's ``ON CONFLICT
   (topic)`` names no constraint: it fails (SQLite and PostgreSQL say so, mid-run).
2. WITH fillgate (``jobs.py``): two ``fillgate plan`` processes started at the same moment get
   distinct ULID run ids; applied, each run's digests and audit rows are its own, and running
   again in one process gets yet another id. The job with a hidden ``create_engine`` is refused
   (exit 3); ``fillgate lint`` finds the hidden ``sqlite3.connect`` and ``create_engine`` in
   ``buggy_jobs.py`` and nothing in ``jobs.py``; the job whose conflict key is ``(topic)`` is an
   error before anything runs (exit 2), while ``(run_timestamp, topic)`` works.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
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

import digest_world as world  # noqa: E402  (the example's own modules, next to this file)
from jobs import WriteDigests  # noqa: E402

from fillgate import Target, connect, make_plan  # noqa: E402

JOBS = "examples/run_identity/jobs.py"
BUGGY = "examples/run_identity/buggy_jobs.py"


def _step(console: Console, number: int, title: str) -> None:
    console.print()
    console.print(Panel(f"[bold]{title}[/]", title=f"step {number}", title_align="left"))


def _digests_table(engine: sa.Engine, title: str) -> Table:
    t = Table(title=title, title_justify="left")
    for col in ("run_timestamp", "topic", "articles"):
        t.add_column(col)
    for run, topic, count in world.digest_rows(engine):
        t.add_row(run, topic, str(count))
    return t


def _sqlite_tables(path: Path) -> list[str]:
    if not path.exists():
        return []
    with sqlite3.connect(path) as conn:
        return [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]


class CLI:
    """Runs ``fillgate ...`` as a user would, and prints the command and its output."""

    def __init__(self, console: Console, workdir: Path, url: str) -> None:
        self.console, self.workdir = console, workdir
        self.env = {**os.environ, "DATABASE_URL": url, "COLUMNS": str(console.width),
                    "PYTHONPATH": str(REPO / "src")}

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "fillgate.cli", *args], cwd=self.workdir, env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def show(self, args: Sequence[str], out: str, err: str, code: int) -> None:
        self.console.print(f"[dim]$ fillgate {' '.join(a.replace(str(REPO) + '/', '') for a in args)}[/]")
        for text in (out, err):
            if text.strip():
                self.console.out(text.rstrip(), highlight=False)
        self.console.print(f"[dim](exit {code})[/]")

    def __call__(self, *args: str, cwd: Path | None = None, show: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([sys.executable, "-m", "fillgate.cli", *args], cwd=cwd or self.workdir, env=self.env,
                              capture_output=True, text=True, timeout=300)
        if show:
            self.show(args, done.stdout, done.stderr, done.returncode)
        return done


def run(console: Console, url: str | None = None) -> int:
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="fillgate-identity-"))
    url = url or f"sqlite:///{workdir / 'digests.db'}"  # fillgate: allow  (the demo is the operator)
    engine = sa.create_engine(world.driver_url(url))  # fillgate: allow
    backend = engine.dialect.name
    checks: dict[str, bool] = {}
    console.print(f"[bold]Example 3: run identity and persistence[/] on {engine.url.render_as_string()}; "
                  f"working folder {workdir}")
    world.seed(engine)

    # --- 1. the incident --------------------------------------------------------------------
    _step(console, 1, "BEFORE: the scheduler process runs the digest; news arrives; an hour later it runs again")
    os.chdir(workdir)  # where the hidden sqlite3.connect() puts its file
    import before  # the scheduler imports the job once; RUN_ID is fixed from now on

    console.print(f"[dim]>>> before.run_digest(engine)   # run 1[/]\n{before.run_digest(engine)}")
    first = world.digest_rows(engine)
    console.print(_digests_table(engine, "digests after run 1"))
    world.add_articles(engine, 2, hour=6)
    console.print(f"[dim]>>> before.run_digest(engine)   # run 2, an hour later, same process[/]\n"
                  f"{before.run_digest(engine)}")
    second = world.digest_rows(engine)
    console.print(_digests_table(engine, "digests after run 2"))
    lost = [row for row in first if row not in second]
    console.print(f"[bold red]Run 2 reused run id {before.RUN_ID} and replaced run 1's {len(lost)} digests:[/] "
                  "run 1's outputs are gone.")
    checks["before: run 2 overwrote run 1's outputs"] = len(second) == len(first) and len(lost) == len(first)

    cache = workdir / "summary_cache.db"
    with sqlite3.connect(cache) as conn:
        cached = conn.execute("SELECT count(*) FROM summaries").fetchone()[0]
    console.print(f"[bold red]A hidden sqlite3.connect() wrote {cache.name}[/] ({cached} rows) into the working "
                  f"folder, while DATABASE_URL is {engine.url.render_as_string()}.")
    checks["before: hidden sqlite3 file written"] = cached == 2 * len(world.TOPICS)

    console.print("[dim]>>> before.refresh_digest(engine, 'rust', 8, 'late news')   # the late-article path[/]")
    if backend in ("sqlite", "postgresql"):
        try:
            before.refresh_digest(engine, "rust", 8, "late news")
            failed = ""
        except sa.exc.DBAPIError as exc:
            failed = str(exc.orig).strip().splitlines()[0]
        console.print(f"[bold red]{backend} rejects it:[/] {failed}")
        checks["before: ON CONFLICT (topic) rejected"] = "ON CONFLICT" in failed
    else:
        console.print(f"({backend} has no ON CONFLICT; its ON DUPLICATE KEY UPDATE takes no column list)")

    # --- 2. fillgate -------------------------------------------------------------------------
    _step(console, 2, "WITH fillgate: two runs started at the same moment, in two processes")
    world.seed(engine)
    cli = CLI(console, workdir, url)
    cli("init")
    args = [["plan", str(REPO / JOBS) + ":WriteDigests", "-o", f"{name}.plan", "--json"] for name in ("a", "b")]
    procs = [cli.start(*a) for a in args]  # both at once
    plans = []
    for a, proc in zip(args, procs, strict=True):
        out, err = proc.communicate(timeout=300)
        cli.show(a, "", err, proc.returncode)
        plans.append(json.loads(out))
    ids = [p["run_id"] for p in plans]
    console.print(f"run ids: {ids[0]} and {ids[1]} (ULIDs: time-ordered, 80 random bits each)")
    applied = [cli("apply", f"{name}.plan") for name in ("a", "b")]
    rows = world.digest_rows(engine)
    console.print(_digests_table(engine, "digests: each run's own rows"))
    checks["fillgate: distinct run ids"] = len(set(ids)) == 2
    checks["fillgate: each run kept its own outputs"] = (
        sorted({r[0] for r in rows}) == sorted(ids) and len(rows) == 2 * len(world.TOPICS)
        and all(a.returncode == 0 for a in applied))
    with engine.connect() as conn:
        audit = conn.execute(sa.text(
            "SELECT r.parent_run_id, c.row_key FROM fillgate_changes c JOIN fillgate_runs r ON r.run_id = c.run_id"
        )).all()
    own = all(json.loads(key)[0] == plan for plan, key in audit)
    console.print(f"audit rows: {len(audit)}; every one belongs to the run whose digest it inserted: {own}")
    checks["fillgate: each run's audit rows are its own"] = own and len(audit) == 2 * len(world.TOPICS)

    target = Target.from_url("default", url)  # fillgate: allow
    same_process = [make_plan(connect(target), WriteDigests).run.run_id for _ in range(2)]
    console.print("[dim]>>> \\[make_plan(conn, WriteDigests).run.run_id for _ in range(2)]   # one process[/]")
    console.print(str(same_process))
    checks["fillgate: a new id for every run in one process"] = len(set(same_process + ids)) == 4

    _step(console, 3, "Only the configured target: a hidden create_engine is refused; lint finds sqlite3.connect")
    hidden = workdir / "hidden_cache.db"
    refused = cli("run", str(REPO / BUGGY) + ":DigestsWithHiddenEngine")
    console.print(f"{hidden.name}: tables {_sqlite_tables(hidden)} (nothing was written to it)")
    checks["fillgate: hidden create_engine refused (exit 3)"] = (
        refused.returncode == 3 and "tried to open a database other than its target" in refused.stderr
        and not _sqlite_tables(hidden))
    lint_buggy = cli("lint", BUGGY, cwd=REPO)
    lint_jobs = cli("lint", JOBS, cwd=REPO)
    checks["fillgate lint: finds sqlite3.connect and create_engine (exit 1)"] = (
        lint_buggy.returncode == 1 and "sqlite3.connect()" in lint_buggy.stdout)
    checks["fillgate lint: jobs.py is clean (exit 0)"] = lint_jobs.returncode == 0

    _step(console, 4, "The conflict key is verified against the table's constraints before anything runs")
    with engine.connect() as conn:
        runs_before = conn.execute(sa.text("SELECT count(*) FROM fillgate_runs")).scalar_one()
    wrong = cli("run", str(REPO / BUGGY) + ":DigestsOnTopic")
    with engine.connect() as conn:
        runs_after = conn.execute(sa.text("SELECT count(*) FROM fillgate_runs")).scalar_one()
    checks["fillgate: key (topic) is an error before anything runs (exit 2)"] = (
        wrong.returncode == 2 and "matches no primary key or unique constraint" in wrong.stderr
        and runs_after == runs_before)
    right = cli("run", str(REPO / JOBS) + ":WriteDigests", "--json", show=False)
    console.print(f"[dim]$ fillgate run {JOBS}:WriteDigests[/]\n(key (run_timestamp, topic): exit {right.returncode}, "
                  f"{json.loads(right.stdout)['counts']['applied']} digests inserted)")
    checks["fillgate: key (run_timestamp, topic) works"] = right.returncode == 0

    console.print()
    for name, ok in checks.items():
        console.print(f"{'[green]✓[/]' if ok else '[bold red]✗[/]'} {name}")
    good = all(checks.values())
    console.print(f"\n[{'green' if good else 'red'}]Done in {time.perf_counter() - started:.1f}s.[/]")
    engine.dispose()
    return 0 if good else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Example 3: run identity and persistence, without/with fillgate.")
    parser.add_argument("--url", help="database URL (default: a new SQLite file); its articles and digests "
                        "tables are replaced")
    args = parser.parse_args(argv)
    return run(Console(highlight=False, width=None if sys.stdout.isatty() else 130), args.url)


if __name__ == "__main__":
    sys.exit(main())
