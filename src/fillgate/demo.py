"""``fillgate demo``: the whole loop on an embedded SQLite file, in a few seconds."""

from __future__ import annotations

import contextlib
import random
import sqlite3
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from shlex import quote
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel

from fillgate import output, report
from fillgate.applier import ApplyResult, apply_plan
from fillgate.config import load_config
from fillgate.context import RunContext
from fillgate.errors import GuardRefused, UsageError
from fillgate.job import Job
from fillgate.limits import Limits
from fillgate.planner import PlanResult, make_plan
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

    def compute(self, row: Mapping[str, Any], ctx: RunContext) -> dict[str, Any]:
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


DEMO_CONFIG_MARK = "# written by fillgate demo"


def write_demo_config(path: Path) -> tuple[Path, bool]:
    """Leave a config beside the demo database so that the printed commands work afterwards:
    target ``demo`` (the default) and target ``live``, which reaches the same database and
    so is refused by its stamp. Returns the file and whether commands need ``--config`` (a
    fillgate.toml of the user's own is there already and is never overwritten)."""
    config = path.parent / "fillgate.toml"
    if config.exists() and not config.read_text(errors="replace").startswith(DEMO_CONFIG_MARK):
        config, needs_flag = path.with_name(f"{path.stem}.fillgate.toml"), True
    else:
        needs_flag = False
    url = f"sqlite:///{path.resolve()}"
    config.write_text(
        f"{DEMO_CONFIG_MARK}: the targets of the demo database beside it.\n"
        'default_target = "demo"\n\n'
        f'[targets.demo]\nurl = "{url}"\n\n'
        "# the same database under another name: its stamp says 'demo', so fillgate refuses it\n"
        f'[targets.live]\nurl = "{url}"\nenvironment = "live"\nmax_changes = 100\n'
    )
    return config, needs_flag


def _step(console: Console, number: int, title: str, command: str) -> None:
    console.print()
    console.print(Panel(f"[bold]{escape(title)}[/]", title=f"step {number}", title_align="left"))
    console.print(f"[dim]$ {escape(command)}[/]", soft_wrap=True)


def _check_replaceable(path: Path) -> None:
    """The demo replaces a database an earlier demo made there (stamped 'demo', with its customers
    table), never anything else: a file of yours at ``--path`` is refused, untouched."""
    refusal = UsageError(
        f"demo --path {path}: that path exists and is not a database an earlier fillgate demo made; the "
        "demo creates a new SQLite file there and will not delete yours. Give a new path (or delete it yourself)."
    )
    if path.is_symlink() or not path.is_file():
        raise refusal
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            stamped = db.execute("SELECT value FROM fillgate_meta WHERE name = 'environment'").fetchone()
            db.execute("SELECT count(*) FROM customers").fetchone()
    except sqlite3.Error:
        raise refusal from None
    if stamped is None or stamped[0] != "demo":
        raise refusal


def run_demo(console: Console, path: Path | None = None, rows: int = 5000) -> Path:
    started = time.perf_counter()
    if path is None:
        path = Path(tempfile.mkdtemp(prefix="fillgate-demo-")) / "demo.db"
    if path.exists() or path.is_symlink():
        _check_replaceable(path)
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    create_demo_database(path, rows)
    tour = _Tour(console, path)
    console.print(f"[bold]fillgate demo[/]: {rows} customers in {escape(str(path))}; about half have no email.",
                  soft_wrap=True)
    planned = tour.plan_and_refuse()
    applied, key_text = tour.apply_and_revert(planned)
    console.print(f"\n[green]Done in {time.perf_counter() - started:.1f}s.[/] Database: {escape(str(path))}",
                  soft_wrap=True)
    tour.what_next(applied.run.run_id, key_text, planned.header.changes)
    return path


class _Tour:
    """The demo's steps, each printed with the command that does the same."""

    job = "fillgate.demo:FillCustomerEmail"

    def __init__(self, console: Console, path: Path) -> None:
        self.console, self.path = console, path
        self.config_file, needs_flag = write_demo_config(path)
        self.config = load_config(self.config_file)
        self.flag = f" --config {quote(str(self.config_file))}" if needs_flag else ""
        self.plan_file = path.with_suffix(".plan")
        self.plan_arg = quote(str(self.plan_file))

    def cmd(self, text: str) -> str:
        return f"fillgate {text}{self.flag}"

    def plan_and_refuse(self) -> PlanResult:
        """Steps 1-4: init, plan, the gate and the stamp refusing."""
        console, cmd, job = self.console, self.cmd, self.job
        _step(console, 1, "Create the ledger and stamp the database 'demo'", cmd("init --target demo"))
        report.print_init(console, init_target(self.config.target("demo")))
        _step(console, 2, "Plan: a dry run that writes nothing and shows the diff",
              cmd(f"plan {job} --target demo -o {self.plan_arg}"))
        self.conn = connect(self.config.target("demo"))
        planned = make_plan(self.conn, FillCustomerEmail, out=self.plan_file)
        report.print_plan(console, planned, sample=5, next_step=False)
        _step(console, 3, "The gate: a plan bigger than you expected is refused before any write",
              cmd(f"apply {self.plan_arg} --max-changes 25"))
        try:
            apply_plan(self.conn, self.plan_file, Limits(max_changes=25))
        except GuardRefused as exc:
            output.print_error(console, exc.exit_code, str(exc))
        _step(console, 4, "The stamp: a target that claims to be 'live' but reaches this database is refused",
              cmd(f"plan {job} --target live"))
        try:
            connect(self.config.target("live"))
        except GuardRefused as exc:
            output.print_error(console, exc.exit_code, str(exc))
        return planned

    def apply_and_revert(self, planned: PlanResult) -> tuple[ApplyResult, str]:
        """Steps 5-7: apply, the history of a row, revert."""
        console, cmd, conn = self.console, self.cmd, self.conn
        _step(console, 5, "Apply exactly the reviewed plan, audited, in batches",
              cmd(f"apply {self.plan_arg} --max-changes {planned.header.changes}"))
        applied = apply_plan(conn, self.plan_file, Limits(max_changes=planned.header.changes))
        report.print_apply(console, applied)
        first = planned.samples["change"][0]
        key_text = ",".join(str(k) for k in first["key"])
        _step(console, 6, "History: which run changed this row, when, from what to what",
              cmd(f"history customers {key_text} --target demo"))
        report.print_history(console, "customers", key_text,
                             conn.ledger.history("customers", [encode_key(first["key"])]))
        _step(console, 7, "Revert the run from its audit log (a new audited run)",
              cmd(f"revert {applied.run.run_id} --target demo"))
        report.print_apply(console, revert_run(conn, applied.run.run_id))
        db = sqlite3.connect(self.path)
        missing = db.execute("SELECT count(*) FROM customers WHERE email IS NULL").fetchone()[0]
        audit = db.execute("SELECT count(*) FROM fillgate_changes").fetchone()[0]
        db.close()
        console.print(
            f"Back to the start: {missing} customers without email again; the audit log keeps all "
            f"{audit} field changes (apply + revert), and refuses UPDATE and DELETE.", soft_wrap=True
        )
        return applied, key_text

    def what_next(self, run_id: str, key_text: str, changes: int) -> None:
        again = self.path.with_name("again.plan")
        self.console.print(
            f"The demo left {escape(str(self.config_file))} beside it (targets demo and live). "
            "Try the commands yourself from there:", soft_wrap=True
        )
        cmd = self.cmd
        for line in (f"cd {quote(str(self.path.parent))}", cmd("runs"), cmd(f"show {run_id}"),
                     cmd(f"history customers {key_text}"), cmd(f"plan {self.job} -o {again.name}"),
                     cmd(f"apply {again.name} --max-changes {changes}")):
            self.console.print(f"  {escape(line)}", soft_wrap=True)
        web = escape("pip install 'fillgate[web]'")
        self.console.print(f"Or browse them in the web dashboard: {escape(cmd('serve'))} (it needs {web}).",
                           soft_wrap=True)
