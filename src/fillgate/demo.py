"""``fillgate demo``: the whole loop on an embedded SQLite file, in a few seconds."""

from __future__ import annotations

import random
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.panel import Panel

from fillgate import report
from fillgate.config import Target, parse_url
from fillgate.context import RunContext
from fillgate.engine import Limits, apply_plan, make_plan
from fillgate.errors import GuardRefused
from fillgate.job import Job
from fillgate.policy import FillMissing
from fillgate.revert import revert_run
from fillgate.stamp import connect, init_target
from fillgate.values import encode_key

FIRST = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Margaret", "Linus",
         "Radia", "Dennis", "Sophie", "Guido", "Annie", "Tim", "Hedy", "John", "Karen", "Niklaus"]
LAST = ["Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson", "Hamilton",
        "Torvalds", "Perlman", "Ritchie", "Wilson", "van Rossum", "Easley", "Berners-Lee", "Lamarr",
        "Backus", "Sparck Jones", "Wirth"]
COUNTRIES = ["DE", "FR", "GB", "US", "NL", "SE", "ES", "IT", "PL", "JP"]


class FillCustomerEmail(Job):
    """Give customers without an email a company address; never touch a known one."""

    table = "customers"
    key = ("id",)
    columns = {"email": FillMissing()}
    source = "SELECT id, first_name, last_name, email, opted_out FROM customers"

    def compute(self, row: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
        if not row["last_name"]:
            raise ValueError(f"customer {row['id']} has no last name")
        if row["opted_out"]:
            return {"email": None}  # a NULL proposal: the guard keeps whatever is stored
        local = f"{row['first_name']}.{row['last_name']}".lower().replace(" ", "")
        return {"email": f"{local}.{row['id']}@example.com"}


def create_demo_database(path: Path, rows: int, seed: int = 7) -> None:
    rng = random.Random(seed)
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE customers (id INTEGER PRIMARY KEY, first_name TEXT NOT NULL, last_name TEXT, "
        "email TEXT, country TEXT NOT NULL, opted_out INTEGER NOT NULL DEFAULT 0)"
    )
    data = []
    for i in range(1, rows + 1):
        first, last = rng.choice(FIRST), rng.choice(LAST)
        email = f"{first}@{last}.org".lower().replace(" ", "") if rng.random() < 0.5 else None
        if i % 997 == 0:
            last = ""
        data.append((i, first, last, email, rng.choice(COUNTRIES), int(rng.random() < 0.02)))
    db.executemany("INSERT INTO customers VALUES (?, ?, ?, ?, ?, ?)", data)
    db.commit()
    db.close()


def _step(console: Console, number: int, title: str, command: str) -> None:
    console.print()
    console.print(Panel(f"[bold]{title}[/]\n[dim]$ {command}[/]", title=f"step {number}", title_align="left"))


def run_demo(console: Console, path: Path | None = None, rows: int = 5000) -> Path:
    started = time.perf_counter()
    if path is None:
        path = Path(tempfile.mkdtemp(prefix="fillgate-demo-")) / "demo.db"
    if path.exists():
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    create_demo_database(path, rows)
    plan_file = path.with_suffix(".plan")
    target = Target("demo", parse_url(f"sqlite:///{path}", "demo"), "demo")
    job = "fillgate.demo:FillCustomerEmail"
    console.print(f"[bold]fillgate demo[/]: {rows} customers in {path}; about half have no email.")

    _step(console, 1, "Create the ledger and stamp the database 'demo'", "fillgate init --target demo")
    report.print_init(console, init_target(target))

    _step(console, 2, "Plan: a dry run that writes nothing and shows the diff",
          f"fillgate plan {job} --target demo -o {plan_file}")
    conn = connect(target)
    planned = make_plan(conn, FillCustomerEmail, out=plan_file)
    report.print_plan(console, planned, sample=5)

    _step(console, 3, "The gate: a plan bigger than you expected is refused before any write",
          f"fillgate apply {plan_file} --max-changes 25")
    try:
        apply_plan(conn, plan_file, Limits(max_changes=25))
    except GuardRefused as exc:
        console.print(f"[bold red]refused (exit {exc.exit_code}):[/] {exc}")

    _step(console, 4, "The stamp: a target that claims to be 'live' but reaches this database is refused",
          "fillgate plan ... --target live")
    try:
        connect(Target("live", target.url, "live", protected=True))
    except GuardRefused as exc:
        console.print(f"[bold red]refused (exit {exc.exit_code}):[/] {exc}")

    _step(console, 5, "Apply exactly the reviewed plan, audited, in batches",
          f"fillgate apply {plan_file} --max-changes {planned.header.changes}")
    applied = apply_plan(conn, plan_file, Limits(max_changes=planned.header.changes))
    report.print_apply(console, applied)

    first = planned.samples["change"][0]
    key_text = ",".join(str(k) for k in first["key"])
    _step(console, 6, "History: which run changed this row, when, from what to what",
          f"fillgate history customers {key_text} --target demo")
    report.print_history(console, "customers", key_text,
                         conn.ledger.history("customers", [encode_key(first["key"])]))

    _step(console, 7, "Revert the run from its audit log (a new audited run)",
          f"fillgate revert {applied.run.run_id} --target demo")
    reverted = revert_run(conn, applied.run.run_id)
    report.print_apply(console, reverted)
    db = sqlite3.connect(path)
    missing = db.execute("SELECT count(*) FROM customers WHERE email IS NULL").fetchone()[0]
    audit = db.execute("SELECT count(*) FROM fillgate_changes").fetchone()[0]
    db.close()
    console.print(
        f"Back to the start: {missing} customers without email again; the audit log keeps all "
        f"{audit} field changes (apply + revert), and refuses UPDATE and DELETE."
    )
    console.print(f"\n[green]Done in {time.perf_counter() - started:.1f}s.[/] Database: {path}")
    return path
