"""How results look: Rich tables for people, plain dicts for ``--json``."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from fillgate.engine import PLAN_COUNTS, ApplyResult, PlanResult
from fillgate.ledger import Run
from fillgate.pipeline import PipelineResult
from fillgate.revert import RevertPreview
from fillgate.stamp import InitResult
from fillgate.values import loads

PLAN_LABELS = {
    "rows": "rows scanned",
    "writes": "writes",
    "inserts": "  of which inserts",
    "unchanged": "unchanged",
    "skipped": "skipped by policy",
    "disagreements": "disagreements",
    "preserved": "preserved (guard)",
    "errors": "row errors",
    "unexpected_index": "unexpected lookup index",
}


def to_json(data: Any) -> str:
    def default(value: Any) -> Any:
        if isinstance(value, dt.datetime):
            return value.isoformat() + ("Z" if value.tzinfo is None else "")
        if isinstance(value, dt.date | dt.time):
            return value.isoformat()
        return str(value)

    return json.dumps(data, default=default, indent=2, sort_keys=False)


def _short(value: Any, width: int = 40) -> str:
    text = "NULL" if value is None else repr(value) if not isinstance(value, str) else value
    return text if len(text) <= width else text[: width - 1] + "…"


def _key(key: Sequence[Any]) -> str:
    return ", ".join(str(k) for k in key)


def _print_table(
    console: Console, title: str, columns: Sequence[str | tuple[str, str]], rows: Iterable[Sequence[str]]
) -> None:
    """A titled table (columns: a name, or (name, style)); nothing at all when there are no rows."""
    rows = list(rows)
    if not rows:
        return
    t = Table(title=title, title_justify="left")
    for column in columns:
        name, style = (column, None) if isinstance(column, str) else column
        t.add_column(name, style=style)
    for row in rows:
        t.add_row(*row)
    console.print(t)


# --- init -------------------------------------------------------------------------------


def init_json(result: InitResult) -> dict[str, Any]:
    return {**result.__dict__, "changed": result.changed}


def print_init(console: Console, result: InitResult) -> None:
    if result.created:
        console.print(f"Created the fillgate ledger in target [bold]{result.target}[/].")
    if result.stamped and result.previous_environment is None:
        console.print(f"Stamped the database as environment [bold]{result.environment}[/].")
    elif result.stamped:
        console.print(
            f"Re-stamped the database from [bold]{result.previous_environment}[/] to "
            f"[bold]{result.environment}[/] (recorded as run {result.run_id})."
        )
    if not result.changed:
        console.print(
            f"Target [bold]{result.target}[/] is already initialized and stamped "
            f"[bold]{result.environment}[/]; nothing to do."
        )


# --- plan -------------------------------------------------------------------------------


def plan_json(result: PlanResult) -> dict[str, Any]:
    return {
        "plan_id": result.header.plan_id,
        "run_id": result.run.run_id,
        "job": result.header.job,
        "target": result.header.target,
        "environment": result.header.environment,
        "path": str(result.path) if result.path else None,
        "counts": result.counts,
        "changes": result.header.changes,
        "samples": result.samples,
    }


def print_plan(console: Console, result: PlanResult, sample: int = 10, next_step: bool = True) -> None:
    h = result.header
    console.print(
        f"[bold]Plan {h.plan_id}[/]  job [cyan]{h.job}[/]  target [bold]{h.target}[/] "
        f"({h.environment})  table [cyan]{h.table}[/]"
    )
    counts = Table(show_header=False, box=None, padding=(0, 2))
    for name in PLAN_COUNTS:
        style = "bold green" if name == "writes" else "bold red" if name == "errors" and result.counts[name] else ""
        counts.add_row(PLAN_LABELS[name], f"[{style}]{result.counts[name]}[/]" if style else str(result.counts[name]))
    console.print(counts)
    changes = result.samples.get("change", [])[:sample]
    _print_table(console, f"first {len(changes)} of {h.changes} changes",
                 ("key", "column", ("old", "red"), ("new", "green")),
                 ((_key(i["key"]), i["column"], _short(i["old"]), _short(i["new"])) for i in changes))
    inserts = result.samples.get("insert", [])[:sample]
    _print_table(console, f"first {len(inserts)} of {result.counts.get('inserts', 0)} inserts",
                 ("key", ("row", "green")),
                 ((_key(i["key"]), _short(json.dumps(i["values"], default=str), 70)) for i in inserts))
    for kind, title in (("disagreement", "disagreements (not written)"), ("preserved", "preserved by the guard")):
        _print_table(console, title, ("key", "column", "stored", "proposed"), (
            (_key(i["key"]), i["column"], _short(i["old"]), _short(i.get("new", i.get("reason"))))
            for i in result.samples.get(kind, [])[:5]
        ))
    _print_table(console, "unexpected lookup index (never written)", ("key", "what"),
                 ((_key(i["key"]), _short(i["message"], 80)) for i in result.samples.get("unexpected_index", [])[:5]))
    _print_table(console, "row errors (nothing written for these rows)", ("key", "error", "message"), (
        (_key(i["key"]), i["error_type"], _short(i["message"], 70)) for i in result.samples.get("error", [])[:5]
    ))
    if result.path:
        console.print(f"Plan saved to [bold]{result.path}[/]")
        if next_step:
            console.print(f"Apply it with: fillgate apply {result.path} --max-changes {h.changes}")
    else:
        console.print("Nothing was written. Save the plan with -o FILE to apply it.")


# --- apply / revert / resume -------------------------------------------------------------


def apply_json(result: ApplyResult) -> dict[str, Any]:
    return {
        "run_id": result.run.run_id,
        "kind": result.run.kind,
        "status": result.run.status,
        "counts": result.counts,
        "checkpoint": result.run.checkpoint,
        "total": result.run.total,
        "conflicts": result.conflicts,
        "stopped": result.stopped,
    }


def print_apply(console: Console, result: ApplyResult) -> None:
    run = result.run
    c = result.counts
    colour = {"succeeded": "green", "paused": "yellow", "cancelled": "yellow"}.get(run.status, "red")
    console.print(
        f"[bold]{run.kind.capitalize()} run {run.run_id}[/]: [{colour}]{run.status}[/]  "
        f"applied {c['applied']}, conflicts {c['conflicts']}, errors {c['errors']} "
        f"({run.checkpoint}/{run.total} changes processed)"
    )
    _print_table(console, "conflicts (changed since the plan; left alone)", ("key", "column", "expected", "found"), (
        (_key(i["key"]), i["column"], _short(i["expected"]), _short(i["found"]) if i["row_exists"] else "(row deleted)")
        for i in result.conflicts[:10]
    ))
    if result.stopped == "paused":
        console.print(f"Paused between batches. Continue with: fillgate resume {run.run_id}")
    elif run.status == "succeeded" and run.kind != "revert":
        console.print(f"Undo it with: fillgate revert {run.run_id}")


def preview_json(preview: RevertPreview) -> dict[str, Any]:
    return {
        "run_id": preview.run.run_id,
        "total": preview.total,
        "revertible": preview.revertible,
        "conflicts": preview.conflicts,
        "samples": preview.samples,
        "conflict_samples": preview.conflict_samples,
    }


def print_preview(console: Console, preview: RevertPreview) -> None:
    console.print(
        f"[bold]Revert of run {preview.run.run_id}[/] (dry run, nothing written): "
        f"{preview.revertible} of {preview.total} fields would be restored, "
        f"{preview.conflicts} changed since and would be left alone."
    )
    _print_table(console, "would restore", ("key", "column", "now", "restored to"), (
        (_key(i["key"]), i["column"], _short(i["old"]), _short(i["new"])) for i in preview.samples[:10]
    ))


# --- runs, show, history -----------------------------------------------------------------


def _when(value: dt.datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else ""


def runs_json(runs: Sequence[Run]) -> list[dict[str, Any]]:
    return [r.to_json() for r in runs]


def print_runs(console: Console, runs: Sequence[Run]) -> None:
    if not runs:
        console.print("No runs yet.")
        return
    t = Table()
    # run ids (users copy them), kinds and statuses are never truncated, even at 80 columns
    t.add_column("run", no_wrap=True, min_width=26)
    t.add_column("kind", no_wrap=True, min_width=6)
    t.add_column("job")
    t.add_column("status", no_wrap=True, min_width=9)
    for col in ("changes", "created (UTC)", "operator"):
        t.add_column(col)
    for r in runs:
        changes = r.counts.get("writes") if r.kind == "plan" else r.counts.get("applied")
        t.add_row(r.run_id, r.kind, r.job or "", r.status, "" if changes is None else str(changes),
                  _when(r.created_at), r.operator)
    console.print(t)


def show_json(run: Run, error_groups: list[dict[str, Any]]) -> dict[str, Any]:
    return {**run.to_json(), "error_groups": error_groups}


def _print_details(console: Console, run: Run) -> None:
    """Anomalies and the slowest rows, as recorded by the run's monitor."""
    mismatch = run.details.get("first_mismatch")
    if run.counts.get("unexpected_index"):
        line = f"[bold red]{run.counts['unexpected_index']} rows had an unexpected lookup index[/] (never written)"
        if mismatch:
            line += (f"; first: key {_key(mismatch.get('key', []))}: expected {mismatch.get('expected')!r}, "
                     f"got {mismatch.get('got')!r} ({mismatch.get('message', '')})")
        console.print(line)
    slowest = run.details.get("slowest") or []
    if slowest:
        console.print("slowest rows (compute + lookup)", style="table.title")  # a title would wrap
        t = Table()
        t.add_column("key")
        t.add_column("ms", justify="right")
        for item in slowest:
            t.add_row(_key(item["key"]), f"{item['ms']:.1f}")
        console.print(t)


def print_show(console: Console, run: Run, error_groups: list[dict[str, Any]]) -> None:
    t = Table(show_header=False, box=None, padding=(0, 2))
    duration = run.duration_s
    for label, value in (
        ("run", run.run_id), ("kind", run.kind), ("status", run.status), ("job", run.job),
        ("table", run.table_name), ("target", f"{run.target} ({run.environment})"),
        ("operator", run.operator), ("plan", run.plan_id), ("plan file", run.plan_path),
        ("parent run", run.parent_run_id),
        ("progress", f"{run.checkpoint}/{run.total}" if run.kind != "plan" and run.total is not None else None),
        ("created", _when(run.created_at)), ("finished", _when(run.finished_at)),
        ("duration", f"{duration:.2f}s" if duration is not None else None),
        ("message", run.message), ("arguments", json.dumps(run.args, default=str)),
    ):
        if value:
            t.add_row(label, str(value))
    console.print(t)
    counts = Table(title="counts", title_justify="left", show_header=False)
    for name, value in run.counts.items():
        counts.add_row(name, str(value))
    console.print(counts)
    _print_details(console, run)
    _print_table(
        console, "errors and conflicts by fingerprint",
        ("job / stage", "fingerprint", "phase", "type", "count", "example key", "example message"),
        ((g.get("job") or "", g["fingerprint"], g["phase"], g["error_type"], str(g["count"]),
          g["example_key"] or "", _short(g["example_message"], 60)) for g in error_groups),
    )


def history_json(entries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for e in entries:
        item = dict(e)
        item["old_value"] = loads(e["old_value"])
        item["new_value"] = loads(e["new_value"])
        out.append(item)
    return out


def print_history(console: Console, table: str, key: str, entries: Sequence[Mapping[str, Any]]) -> None:
    if not entries:
        console.print(f"No recorded changes for {table} {key}.")
        return
    _print_table(
        console, f"history of {table} {key}",
        ("when (UTC)", "run", "kind", "job / source", "column", "from", "to", "operator"),
        ((_when(e["changed_at"]), e["run_id"], e["kind"] or "", e["source"], e["column_name"],
          _short(loads(e["old_value"])), _short(loads(e["new_value"])), e["operator"] or "") for e in entries),
    )


# --- progress ----------------------------------------------------------------------------


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.0f}/s", style="cyan")


class RichProgress:
    """A progress bar with rate and ETA (for terminals; the CLI leaves it off on pipes and
    with ``--json``). A held run shows why it is held."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def start(self, description: str, total: int | None) -> None:
        self.stop()
        self._bar = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
            TimeRemainingColumn(), TextColumn("[yellow]{task.fields[note]}"),
            console=self.console, transient=True,
        )
        self._bar.start()
        self._task = self._bar.add_task(description[:40], total=total or None, note="")

    def advance(self, done: int) -> None:
        if self._bar is not None and self._task is not None:
            task = self._bar.tasks[0]
            total = task.total if task.total is None or done <= task.total else done
            self._bar.update(self._task, completed=done, total=total, note="")

    def hold(self, reason: str | None) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, note=f"held: {reason}" if reason else "")

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
            self._task = None


# --- pipelines -----------------------------------------------------------------------------


def pipeline_json(result: PipelineResult) -> dict[str, Any]:
    return {
        "run_id": result.run.run_id,
        "kind": "pipeline",
        "status": result.run.status,
        "counts": result.run.counts,
        "stages": [
            {"stage": s.stage, "plan": plan_json(s.plan), "apply": apply_json(s.apply) if s.apply else None}
            for s in result.stages
        ],
    }


def print_pipeline(console: Console, result: PipelineResult) -> None:
    run = result.run
    rows = []
    for s in result.stages:
        c = s.plan.counts
        a = s.apply.counts if s.apply else {}
        rows.append((s.stage, str(c["rows"]), str(c["writes"]), str(c["inserts"]), str(c["errors"]),
                     str(c["unexpected_index"]), str(a.get("applied", "")), str(a.get("conflicts", "")),
                     s.apply.run.run_id if s.apply else ""))
    _print_table(console, f"pipeline {run.job}: run {run.run_id} {run.status}",
                 ("stage", "rows", "writes", "inserts", "errors", "unexpected", "applied", "conflicts", "apply run"),
                 rows)
    console.print(f"Details of every stage, errors included: fillgate show {run.run_id}")
