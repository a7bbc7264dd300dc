"""How results look: Rich tables for people, plain dicts for ``--json``."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from shlex import quote
from typing import Any, NamedTuple

from rich.cells import cell_len
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
)
from rich.table import Table
from rich.text import Text

from fillgate.applier import ApplyResult
from fillgate.commands import Approval
from fillgate.counts import LABELS, PLAN_COUNTS
from fillgate.estimate import Estimate, format_duration
from fillgate.ledger import Run
from fillgate.ledger.integrity import RunCheck, VerifyReport
from fillgate.pipeline_run import PipelineResult
from fillgate.planner import PlanResult
from fillgate.redact import mask_params, mask_secrets
from fillgate.revert import RevertPreview
from fillgate.runs import WRITING_KINDS, RunKind, RunStatus, interrupted, shown_status
from fillgate.stamp import InitResult
from fillgate.values import decode_key, format_key, format_value, loads


def _short(value: Any, width: int = 40) -> str:
    """Kept for the "stored differently" table; shows the value whole (never cut)."""
    return format_value(value)


def _key(key: Sequence[Any]) -> str:
    return format_key(key)


# --- tables that never cut ------------------------------------------------------------------


class Col(NamedTuple):
    """A table column. ``wrap``: its text may wrap onto several lines (prose: jobs, messages);
    the others (ids, counts, keys, values, times) are only ever shown whole on one line."""

    name: str
    style: str | None = None
    wrap: bool = False
    justify: str = "left"


WRAP_MIN = 16  # the narrowest a wrapping column gets before the table goes vertical


def _cell_width(text: str) -> int:
    return max((cell_len(line) for line in text.splitlines()), default=0)


def _line(console: Console, text: str | Text) -> None:
    """One line of prose, never broken by fillgate (the terminal wraps it): ids, paths and
    commands in it can be copied whole."""
    console.print(text, soft_wrap=True)


Cell = str | Text  # a cell's text (a Text keeps its styles: a verdict in red)


def _print_table(
    console: Console, title: str, columns: Sequence[str | tuple[str, str] | Col], rows: Iterable[Sequence[Cell]]
) -> None:
    """A titled table; nothing at all when there are no rows. When the table does not fit the
    console's width with every id, count and value whole, one block per row instead
    (``field: value`` lines)."""
    rows = [list(row) for row in rows]
    if not rows:
        return
    cols = [c if isinstance(c, Col) else Col(c) if isinstance(c, str) else Col(*c) for c in columns]
    natural = [max([_cell_width(c.name), *(_cell_width(_plain(r[i])) for r in rows)]) for i, c in enumerate(cols)]
    needed = sum(min(w, WRAP_MIN) if c.wrap else w for c, w in zip(cols, natural, strict=True))
    _line(console, Text(title, style="table.title"))
    if needed + 3 * len(cols) + 1 <= console.width:
        t = Table()
        for c in cols:
            t.add_column(c.name, style=c.style, no_wrap=not c.wrap, overflow="fold",
                         justify=c.justify)  # type: ignore[arg-type]
        for row in rows:
            t.add_row(*(cell if isinstance(cell, Text) else Text(cell) for cell in row))
        console.print(t)
        return
    _print_records(console, [c.name for c in cols], rows, [c.style for c in cols])


def _plain(cell: Cell) -> str:
    return cell.plain if isinstance(cell, Text) else cell


def _print_records(console: Console, labels: Sequence[str], rows: Sequence[Sequence[Cell]],
                   styles: Sequence[str | None] | None = None, numbered: bool = True) -> None:
    """The vertical layout: one block per row, one ``label  value`` line per non-empty field."""
    pad = max(cell_len(label) for label in labels) + 2
    for number, row in enumerate(rows, start=1):
        if numbered:
            _line(console, Text(f"── {number} of {len(rows)} ──", style="dim"))
        for i, (label, value) in enumerate(zip(labels, row, strict=True)):
            if _plain(value) == "":
                continue
            line = Text(label.ljust(pad), style="bold")
            if isinstance(value, Text):
                line.append_text(value)
            else:
                line.append(value.replace("\n", "\n" + " " * pad), style=(styles[i] if styles else None) or "")
            _line(console, line)


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
        "samples": {kind: [{**i, "message": mask_secrets(i["message"])} if "message" in i else i for i in items]
                    for kind, items in result.samples.items()},
        "estimate": result.estimate.to_json() if result.estimate is not None else None,
    }


def estimate_line(estimate: Estimate) -> str:
    """The apply's estimated duration, as ``fillgate plan`` prints it."""
    if estimate.skipped:
        return f"No duration estimate: {estimate.skipped}."
    if estimate.duration_s is None or estimate.rate is None:
        return "Nothing to apply, nothing to estimate."
    when = format_duration(estimate.duration_s)
    when = when if when.startswith("under") else f"about {when}"
    return (f"Estimated apply time: {when} for {estimate.changes} changes "
            f"({estimate.rate:.0f} changes/s, measured by a trial batch of {estimate.trial} changes that was "
            "rolled back; holds and pauses not included).")


def apply_hint(result: PlanResult, confirm: str | None = None) -> str:
    """The command that applies a saved plan (``confirm``: the environment a protected target
    must be confirmed with), or why there is nothing to apply."""
    h = result.header
    if not h.changes:
        return "Nothing to apply: the plan has no changes."
    command = f"fillgate apply {quote(str(result.path))} --max-changes {h.changes}"
    cluster = result.run.args.get("distributed") or {}  # a distributed plan: on the same kind of cluster
    if cluster.get("workers"):
        command += f" --workers {cluster['workers']}"
    elif cluster.get("scheduler"):
        command += f" --scheduler {quote(cluster['scheduler'])}"
    return f"Apply it with: {command}" + (f" --confirm {confirm}" if confirm else "")


def _sample_title(title: str, shown: Sequence[Any], count: int) -> str:
    """A sample table's title, saying how many there are when it shows fewer (never a silent cut)."""
    return title if len(shown) >= count else f"{title}: first {len(shown)} of {count}"


def print_plan(console: Console, result: PlanResult, sample: int = 10, next_step: bool = True,
               confirm: str | None = None) -> None:
    h = result.header
    _line(console, f"[bold]Plan {h.plan_id}[/]  job [cyan]{escape(h.job)}[/]  target [bold]{escape(h.target)}[/] "
          f"({escape(h.environment)})  table [cyan]{escape(h.table)}[/]")
    counts = Table(show_header=False, box=None, padding=(0, 2))
    for name in PLAN_COUNTS:
        style = "bold green" if name == "writes" else "bold red" if name == "errors" and result.counts[name] else ""
        counts.add_row(LABELS[name], f"[{style}]{result.counts[name]}[/]" if style else str(result.counts[name]))
    console.print(counts)
    changes = result.samples.get("change", [])[:sample]
    _print_table(console, f"first {len(changes)} of {h.changes} changes",
                 ("key", "column", ("old", "red"), ("new", "green")),
                 ((_key(i["key"]), i["column"], format_value(i["old"]), format_value(i["new"])) for i in changes))
    inserts = result.samples.get("insert", [])[:sample]
    _print_table(console, f"first {len(inserts)} of {result.counts.get('inserts', 0)} inserts",
                 ("key", ("row", "green")),
                 ((_key(i["key"]), ", ".join(f"{c}={format_value(v)}" for c, v in i["values"].items()))
                  for i in inserts))
    shown = {kind: result.samples.get(kind, [])[:5]
             for kind in ("disagreement", "preserved", "unexpected_index", "error")}
    _print_table(console, _sample_title("disagreements (not written)", shown["disagreement"],
                                        result.counts.get("disagreements", 0)),
                 ("key", "column", "stored", "proposed"), (
        (_key(i["key"]), i["column"], format_value(i["old"]), format_value(i["new"])) for i in shown["disagreement"]
    ))
    _print_table(console, _sample_title("preserved by the guard", shown["preserved"],
                                        result.counts.get("preserved", 0)),
                 ("key", "column", "stored", Col("why", wrap=True)), (
        (_key(i["key"]), i["column"], format_value(i["old"]), str(i.get("reason", ""))) for i in shown["preserved"]
    ))
    _print_table(console, _sample_title("unexpected lookup index (never written)", shown["unexpected_index"],
                                        result.counts.get("unexpected_index", 0)),
                 ("key", Col("what", wrap=True)), ((_key(i["key"]), i["message"]) for i in shown["unexpected_index"]))
    _print_table(console, _sample_title("row errors (nothing written for these rows)", shown["error"],
                                        result.counts.get("errors", 0)),
                 ("key", "error", Col("message", wrap=True)),
                 ((_key(i["key"]), i["error_type"], mask_secrets(i["message"])) for i in shown["error"]))
    if result.estimate is not None and result.estimate.changes:
        _line(console, escape(estimate_line(result.estimate)))
    if result.path:
        _line(console, f"Plan saved to [bold]{escape(str(result.path))}[/]")
        if next_step:
            _line(console, escape(apply_hint(result, confirm)))
    else:
        _line(console, "Nothing was written. Save the plan with -o FILE to apply it.")


def approve_json(result: Approval) -> dict[str, Any]:
    return {"plan_id": result.plan_id, "plan_sha256": result.plan_sha256, "path": result.path,
            "operator": result.operator, "via": result.via, "comment": result.comment, "needed": result.needed,
            "approvals": [approval_json(a) for a in result.approvals]}


def approval_json(approval: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(approval)
    if isinstance(out.get("created_at"), dt.datetime):
        out["created_at"] = out["created_at"].isoformat() + "Z"
    return out


def print_approve(console: Console, result: Approval) -> None:
    _line(console, f"Approved plan {result.plan_id} as {escape(result.operator)} "
                   f"(sha256 {result.plan_sha256}).")
    who = ", ".join(a["operator"] for a in result.approvals)
    needed = f"; the target needs {result.needed} from operators other than the one applying" if result.needed else ""
    _line(console, escape(f"Approvals of this plan: {len(result.approvals)} ({who}){needed}."))


def _print_approvals(console: Console, approvals: Sequence[Mapping[str, Any]]) -> None:
    _print_table(console, "approvals", ("when (UTC)", Col("operator", wrap=True), Col("via", wrap=True),
                                        Col("comment", wrap=True)),
                 ((_when(a["created_at"]), a["operator"], a["via"], a["comment"] or "") for a in approvals))


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
        "canary": result.canary,
    }


def print_apply(console: Console, result: ApplyResult) -> None:
    run = result.run
    c = result.counts
    colour = {RunStatus.SUCCEEDED: "green", RunStatus.PAUSED: "yellow", RunStatus.CANCELLED: "yellow"}.get(
        RunStatus(run.status), "red")
    _line(console,
        f"[bold]{run.kind.capitalize()} run {run.run_id}[/]: [{colour}]{run.status}[/]  "
        f"applied {c['applied']}, conflicts {c['conflicts']}, errors {c['errors']} "
        f"({run.checkpoint}/{run.total} changes processed)"
    )
    conflicts = result.conflicts[:10]
    _print_table(console, _sample_title("conflicts (changed since the plan; left alone)", conflicts,
                                        len(result.conflicts)), ("key", "column", "expected", "found"), (
        (_key(i["key"]), i["column"], format_value(i["expected"]),
         format_value(i["found"]) if i["row_exists"] else "(row deleted)")
        for i in conflicts
    ))
    if result.stopped == RunStatus.PAUSED:
        _line(console, f"Paused between batches. Continue with: fillgate resume {run.run_id}")
    elif result.stopped == "interrupted":
        _line(console, f"Paused: {run.message}; no batch is half-written. "
                       f"Continue with: fillgate resume {run.run_id}")
    elif result.stopped == "canary":
        _line(console, escape(f"Canary: {run.message}"))
    elif run.status == RunStatus.SUCCEEDED and run.kind != RunKind.REVERT:
        _line(console, f"Undo it with: fillgate revert {run.run_id}")


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
    _line(console,
        f"[bold]Revert of run {preview.run.run_id}[/] (dry run, nothing written): "
        f"{preview.revertible} of {preview.total} fields would be restored, "
        f"{preview.conflicts} changed since and would be left alone."
    )
    samples = preview.samples[:10]
    _print_table(console, _sample_title("would restore", samples, preview.revertible),
                 ("key", "column", "now", "restored to"), (
        (_key(i["key"]), i["column"], format_value(i["old"]), format_value(i["new"])) for i in samples
    ))


# --- runs, show, history -----------------------------------------------------------------


def _when(value: dt.datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else ""


def _run_json(run: Run) -> dict[str, Any]:
    """A run for --json; its message (which may quote a driver's error) with passwords masked."""
    data = run.to_json()
    if data.get("message"):
        data["message"] = mask_secrets(data["message"])
    if isinstance(data.get("args"), dict) and isinstance(data["args"].get("params"), dict):  # a run recorded
        data["args"] = {**data["args"], "params": mask_params(data["args"]["params"])}  # before params were masked
    gone = interrupted(run)
    if gone:  # recorded as running, but its process is gone
        data["interrupted"] = gone
    return data


def runs_json(runs: Sequence[Run]) -> list[dict[str, Any]]:
    return [_run_json(r) for r in runs]


def print_runs(console: Console, runs: Sequence[Run], filters: Mapping[str, str | None] | None = None) -> None:
    if not runs:
        given = {name: value for name, value in (filters or {}).items() if value is not None}
        if given:  # runs there may be, but none of these
            shown = ", ".join(f"--{name} {quote(value)}" for name, value in given.items())
            _line(console, escape(f"No runs match {shown} (fillgate runs lists them all)."))
        else:
            console.print("No runs yet.")
        return
    rows = []
    for r in runs:
        changes = r.counts.get("writes") if r.kind == RunKind.PLAN else r.counts.get("applied")
        rows.append((r.run_id, r.kind, r.job or "", shown_status(r), "" if changes is None else str(changes),
                     _when(r.created_at), r.operator))
    _print_table(console, f"{len(runs)} most recent run{'s' if len(runs) != 1 else ''}, newest first", (
        "run", "kind", Col("job", wrap=True), "status", Col("changes", justify="right"), "created (UTC)",
        Col("operator", wrap=True),
    ), rows)


def show_json(run: Run, error_groups: list[dict[str, Any]],
              approvals: Sequence[Mapping[str, Any]] = (),
              partitions: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    groups = [{**g, "example_message": mask_secrets(g["example_message"] or "")} for g in error_groups]
    out = {**_run_json(run), "error_groups": groups, "approvals": [approval_json(a) for a in approvals]}
    if partitions:
        out["partitions"] = [dict(p) for p in partitions]
    return out


def _print_partitions(console: Console, run: Run, partitions: Sequence[Mapping[str, Any]]) -> None:
    """A distributed run's partitions: key range, status, progress and counts, and their run."""
    planning = run.kind == RunKind.PLAN
    names = ("rows", "writes", "errors") if planning else ("applied", "conflicts", "errors")

    def progress(p: Mapping[str, Any]) -> str:
        return str(p["total"] if p["total"] is not None else "") if planning else f"{p['checkpoint']}/{p['total']}"

    _print_table(
        console, f"partitions ({len(partitions)})",
        (Col("#", justify="right"), "from key", "below key", "status",
         Col("changes" if planning else "progress", justify="right"),
         *(Col(n, justify="right") for n in names), "run"),
        ((str(p["part"]), "" if p["lo"] is None else _key(p["lo"]), "" if p["hi"] is None else _key(p["hi"]),
          p["status"], progress(p), *(str(p["counts"].get(n, 0)) for n in names), p["run_id"] or "")
         for p in partitions),
    )


def _print_details(console: Console, run: Run) -> None:
    """Anomalies and the slowest rows, as recorded by the run's monitor."""
    mismatch = run.details.get("first_mismatch")
    if run.counts.get("unexpected_index"):
        line = f"[bold red]{run.counts['unexpected_index']} rows had an unexpected lookup index[/] (never written)"
        if mismatch:
            line += escape(f"; first: key {_key(mismatch.get('key', []))}: expected "
                           f"{format_value(mismatch.get('expected'))}, got {format_value(mismatch.get('got'))} "
                           f"({mismatch.get('message', '')})")
        _line(console, line)
    slowest = run.details.get("slowest") or []
    _print_table(console, "slowest rows (compute + lookup)", ("key", Col("ms", justify="right")),
                 ((_key(item["key"]), f"{item['ms']:.1f}") for item in slowest))


def _print_audit(console: Console, run: Run) -> None:
    """The head of the run's audit hash chain (``fillgate verify`` checks the rows against
    it), on a line of its own: a hash is never cut."""
    if run.kind not in WRITING_KINDS:
        return
    if run.args.get("distributed"):
        console.print("audit: in the runs of its partitions (each keeps its own hash chain; fillgate verify "
                      "checks them)")
        return
    if run.audit is None:
        console.print("audit: no tamper evidence (the run predates it)")
    else:
        console.print(f"audit: {run.audit.rows} rows, sha256 {run.audit.sha256}", soft_wrap=True)


def _status_line(run: Run) -> str:
    gone = interrupted(run)
    if gone is None:
        return run.status
    what = ("continue it with fillgate resume " + run.run_id + ", or give it up with fillgate cancel " + run.run_id
            if run.kind in WRITING_KINDS else "plan again")
    return f"interrupted (recorded as running, but {gone}): {what}"


def print_show(console: Console, run: Run, error_groups: list[dict[str, Any]],
               approvals: Sequence[Mapping[str, Any]] = (),
               partitions: Sequence[Mapping[str, Any]] = ()) -> None:
    duration = run.duration_s
    fields = [(label, str(value)) for label, value in (
        ("run", run.run_id), ("kind", run.kind), ("status", _status_line(run)), ("job", run.job),
        ("table", run.table_name), ("target", f"{run.target} ({run.environment})"),
        ("operator", run.operator), ("plan", run.plan_id), ("plan file", run.plan_path),
        ("parent run", run.parent_run_id),
        ("progress", f"{run.checkpoint}/{run.total}" if run.kind != RunKind.PLAN and run.total is not None else None),
        ("created", _when(run.created_at)), ("finished", _when(run.finished_at)),
        ("duration", f"{duration:.2f}s" if duration is not None else None),
        ("message", mask_secrets(run.message or "")), ("arguments", mask_secrets(json.dumps(run.args, default=str))),
        ("apply estimate", _recorded_estimate(run)),
    ) if value]
    _print_records(console, [label for label, _ in fields], [[value for _, value in fields]], numbered=False)
    _print_audit(console, run)
    _print_table(console, "counts", ("count", Col("value", justify="right")),
                 ((name, str(value)) for name, value in run.counts.items()))
    _print_details(console, run)
    _print_partitions(console, run, partitions)
    _print_table(
        console, "errors and conflicts by fingerprint",
        (Col("job / stage", wrap=True), "fingerprint", "phase", "type", Col("count", justify="right"),
         "example key", Col("example message", wrap=True)),
        ((g.get("job") or "", g["fingerprint"], g["phase"], g["error_type"], str(g["count"]),
          _stored_key(g["example_key"]), mask_secrets(g["example_message"] or "")) for g in error_groups),
    )
    _print_approvals(console, approvals)


def _recorded_estimate(run: Run) -> str | None:
    """The apply estimate a plan recorded (an apply shows its plan's), as ``fillgate plan`` said it."""
    recorded = (run.details or {}).get("estimate")
    if not isinstance(recorded, dict):
        return None
    try:
        return estimate_line(Estimate(**recorded))
    except TypeError:  # recorded by another version of fillgate
        return None


def _stored_key(text: str | None) -> str:
    """A key as the ledger stores it (JSON text), shown like every other key."""
    if not text:
        return ""
    try:
        return _key(decode_key(text))
    except (ValueError, TypeError):
        return text


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
        _line(console, f"No recorded changes for {escape(table)} {escape(key)}.")
        return
    _print_table(
        console, f"history of {table} {key}",
        ("when (UTC)", "run", "kind", Col("job / source", wrap=True), "column", "from", "to",
         Col("operator", wrap=True)),
        ((_when(e["changed_at"]), e["run_id"], e["kind"] or "", e["source"], e["column_name"],
          format_value(loads(e["old_value"])), format_value(loads(e["new_value"])), e["operator"] or "")
         for e in entries),
    )


# --- progress ----------------------------------------------------------------------------


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.0f}/s", style="cyan")


class _EtaColumn(ProgressColumn):
    """Time left at the measured rate (the run's last batches, or the plan's trial batch)."""

    def render(self, task: Task) -> Text:
        rate = task.fields.get("rate")
        if not rate or task.total is None:
            return Text("-:--:--", style="progress.remaining")
        left = max(task.total - task.completed, 0) / rate
        return Text(str(dt.timedelta(seconds=round(left))), style="progress.remaining")


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
            _EtaColumn(), TextColumn("[yellow]{task.fields[note]}"),
            console=self.console, transient=True,
        )
        self._bar.start()
        self._task = self._bar.add_task(description[:40], total=total or None, note="", rate=None)

    def advance(self, done: int) -> None:
        if self._bar is not None and self._task is not None:
            task = self._bar.tasks[0]
            total = task.total if task.total is None or done <= task.total else done
            self._bar.update(self._task, completed=done, total=total, note="")

    def hold(self, reason: str | None) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, note=f"held: {reason}" if reason else "")

    def measured(self, rate: float | None) -> None:
        if self._bar is not None and self._task is not None and rate:
            self._bar.update(self._task, rate=rate)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
            self._task = None


class HoldLines:
    """Progress where there is no terminal (a pipe, a file, CI): no bar, but a line when a hold
    starts or its reason changes, and one when the run goes on."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._reason: str | None = None
        self._since = 0.0

    def start(self, description: str, total: int | None) -> None:
        self._reason = None

    def advance(self, done: int) -> None:
        pass

    def measured(self, rate: float | None) -> None:
        pass

    def hold(self, reason: str | None) -> None:
        if reason is not None and reason != self._reason:
            if self._reason is None:
                self._since = time.monotonic()
            self._reason = reason
            self.console.print(f"held: {escape(reason)}", soft_wrap=True)
        elif reason is None and self._reason is not None:
            self._reason = None
            self.console.print(f"going on after a hold of {time.monotonic() - self._since:.1f}s", soft_wrap=True)

    def stop(self) -> None:
        self._reason = None


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
                 ("stage", *(Col(name, justify="right") for name in (
                     "rows", "writes", "inserts", "errors", "unexpected", "applied", "conflicts")), "apply run"),
                 rows)
    _line(console, f"Details of every stage, errors included: fillgate show {run.run_id}")


# --- verify --------------------------------------------------------------------------------


def verify_json(result: VerifyReport) -> dict[str, Any]:
    return result.to_json()


def _verdict(check: RunCheck) -> str:
    if check.state == "predates":
        return "no tamper evidence (run predates it)" if not check.findings else "[bold red]TAMPERED[/]"
    if check.state == "ok":
        return "ok"
    parts = [f"{n} {what}" for n, what in ((check.missing, "missing"), (check.added, "added"),
                                           (check.altered, "altered")) if n]
    return "[bold red]TAMPERED[/]" + (f": {', '.join(parts)}" if parts else "")


def print_verify(console: Console, result: VerifyReport) -> None:
    """One line per run, then what differs in each tampered run, first difference first."""
    if not result.runs and not result.findings:
        console.print(f"Target '{escape(result.target)}' has no apply or revert runs: no audit rows to verify.")
        return
    _print_table(console, f"audit log of target {result.target}",
                 ("run", "kind", "status", Col("rows", justify="right"), Col("result", wrap=True)),
                 ((check.run_id, check.kind, check.status, str(check.rows), Text.from_markup(_verdict(check)))
                  for check in result.runs))
    for check in result.tampered:
        console.print(f"[bold red]run {check.run_id}[/] ({check.kind} on {escape(check.table or '')}): "
                      f"first difference: {escape(check.first.message if check.first else '')}", soft_wrap=True)
        if len(check.findings) > 1:  # a long key is wrapped, never cut
            _print_table(console, f"differences in run {check.run_id}",
                         ("kind", "position", "row id", Col("what", wrap=True)),
                         ((f.kind, "" if f.seq is None else str(f.seq), "" if f.row_id is None else str(f.row_id),
                           f.message) for f in check.findings))
        if check.more_findings:
            console.print(f"… and {check.more_findings} more differences (counted above).")
        if check.recorded_sha256 is not None:
            console.print(f"  recorded: {check.recorded_rows} rows, audit sha256 {check.recorded_sha256}",
                          soft_wrap=True)
            console.print(f"  computed: {check.rows} row{'s' if check.rows != 1 else ''}, audit sha256 "
                          f"{check.computed_sha256}", soft_wrap=True)
    for finding in result.findings:
        console.print(f"[bold red]{finding.kind}:[/] {escape(finding.message)}", soft_wrap=True)
    anchors = result.anchors
    if anchors.files:
        console.print(f"Checked {len(anchors)} audit hash{'es' if len(anchors) != 1 else ''} recorded in "
                      f"{', '.join(escape(f) for f in anchors.files)}"
                      + (f" ({anchors.other_targets} of runs on other targets skipped)" if anchors.other_targets
                         else "") + ".", soft_wrap=True)
    quiet = [c for c in result.predating if not c.findings]
    if quiet:
        console.print(f"{len(quiet)} run{'s' if len(quiet) != 1 else ''} predate{'s' if len(quiet) == 1 else ''} "
                      "tamper evidence (written before ledger revision 0003_audit_integrity): the database "
                      "still refuses to rewrite their rows, but they carry no hash to check.", soft_wrap=True)
    if result.ok:
        console.print(f"The audit log matches its tamper evidence ({len(result.runs)} "
                      f"run{'s' if len(result.runs) != 1 else ''} checked).")
    else:
        bad = len(result.tampered)
        console.print(f"[bold red]The audit log does not match its tamper evidence[/]: {bad} "
                      f"run{'s' if bad != 1 else ''} differ"
                      + (f", {len(result.findings)} other finding{'s' if len(result.findings) != 1 else ''}"
                         if result.findings else "") + ". See README, \"What the audit log guarantees\".",
                      soft_wrap=True)
