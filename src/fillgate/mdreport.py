"""``fillgate show RUN --format markdown``: a GitHub-flavoured Markdown report of a run (or
of a plan file's plan run) for a pull request or a ticket, the paper trail of a change:

the summary table, the counts, a sample of the diff (an apply: its first audit rows; a plan:
its first changes), the disagreements and errors, the approvals, the rehearsal and the canary,
the exact commands to look further or undo, and every related run id. Values are shown whole
(never cut); table cells escape ``|`` and line breaks.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from itertools import islice
from pathlib import Path
from shlex import quote
from typing import Any

from fillgate.commands import RunDescription
from fillgate.ledger import Run
from fillgate.plan import iter_records
from fillgate.redact import mask_secrets
from fillgate.runs import WRITING_KINDS, RunKind, shown_status
from fillgate.stamp import Connected
from fillgate.values import decode_key, format_key, format_value, loads

SAMPLE = 10


def cell(text: Any) -> str:
    """Text for one table cell: ``|`` escaped, line breaks as ``<br>``, never empty."""
    value = str(text) if text is not None else ""
    value = value.replace("\\", "\\\\").replace("|", "\\|").replace("\r\n", "\n").replace("\n", "<br>")
    return value or " "


def code(text: Any) -> str:
    """Inline code that holds any backticks the text has."""
    value = str(text)
    longest = 0
    current = 0
    for ch in value:
        current = current + 1 if ch == "`" else 0
        longest = max(longest, current)
    fence = "`" * (longest + 1)
    pad = " " if value.startswith("`") or value.endswith("`") else ""
    return f"{fence}{pad}{value}{pad}{fence}"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return lines


def _summary(run: Run) -> list[str]:
    duration = run.duration_s
    rows = [
        ("run", code(run.run_id)), ("kind", run.kind), ("status", shown_status(run)), ("job", run.job),
        ("table", run.table_name), ("target", f"{run.target} ({run.environment})"), ("operator", run.operator),
        ("plan run", code(run.plan_id) if run.plan_id else None),
        ("plan sha256", code(run.plan_sha256) if run.plan_sha256 else None),
        ("plan file", code(run.plan_path) if run.plan_path else None),
        ("parent run", code(run.parent_run_id) if run.parent_run_id else None),
        ("progress", f"{run.checkpoint}/{run.total}" if run.kind in WRITING_KINDS and run.total is not None else None),
        ("created (UTC)", run.created_at.isoformat(" ") if run.created_at else None),
        ("finished (UTC)", run.finished_at.isoformat(" ") if run.finished_at else None),
        ("duration", f"{duration:.2f}s" if duration is not None else None),
        ("audit", f"{run.audit.rows} rows, sha256 {code(run.audit.sha256)}" if run.audit else None),
        ("message", mask_secrets(run.message) if run.message else None),
    ]
    return table(("", ""), [(f"**{label}**", value) for label, value in rows if value is not None])


def _diff_sample(conn: Connected, run: Run, plan_file: Path | None) -> list[str]:
    if run.kind in WRITING_KINDS:
        rows = list(islice(conn.ledger.iter_changes(run.run_id), SAMPLE))
        total = run.audit.rows if run.audit else conn.ledger.count_changes(run.run_id)
        lines = [f"First {len(rows)} of {total} changes written (from the audit log):", ""]
        return lines + table(("key", "column", "op", "old", "new"), (
            (format_key(decode_key(r.row_key)), r.column_name, r.op, format_value(loads(r.old_value)),
             format_value(loads(r.new_value))) for r in rows))
    path = plan_file or (Path(run.plan_path) if run.plan_path else None)
    if path is None or not path.is_file():
        return ["The plan was not saved to a file (or the file is gone): no diff to show."]
    changes = list(islice(iter_records(path, ("change", "insert")), SAMPLE))
    lines = [f"First {len(changes)} of {run.total or 0} changes planned (from {code(path)}):", ""]
    return lines + table(("key", "column", "old", "new"), (
        (format_key(r["key"]), r.get("column", "(insert)"), format_value(r.get("old")),
         format_value(r["values"] if "values" in r else r.get("new"))) for r in changes))


def _plan_findings(run: Run, plan_file: Path | None) -> list[str]:
    """Disagreements and preserved values from the plan file (a plan run's, or an apply's plan)."""
    path = plan_file or (Path(run.plan_path) if run.plan_path else None)
    if path is None or not path.is_file():
        return []
    out: list[str] = []
    for kind, title, last in (("disagreement", "Disagreements (not written)", "proposed"),
                              ("preserved", "Preserved by the guard (not written)", "why")):
        records = list(islice(iter_records(path, (kind,)), SAMPLE))
        if not records:
            continue
        out += ["", f"### {title}", "", *table(("key", "column", "stored", last), (
            (format_key(r["key"]), r.get("column"), format_value(r.get("old")),
             format_value(r.get("new")) if kind == "disagreement" else r.get("reason", "")) for r in records))]
    return out


def _errors(description: RunDescription) -> list[str]:
    groups = description.error_groups
    if not groups:
        return ["No errors or conflicts."]
    return table(("job / stage", "fingerprint", "phase", "type", "count", "example key", "example message"), (
        (g.get("job") or "", code(g["fingerprint"]), g["phase"], g["error_type"], g["count"],
         format_key(decode_key(g["example_key"])) if g["example_key"] else "",
         mask_secrets(g["example_message"] or "")) for g in groups))


def _approvals(description: RunDescription) -> list[str]:
    if not description.approvals:
        return ["No approvals recorded."]
    return table(("when (UTC)", "operator", "via", "comment", "plan sha256"), (
        (a["created_at"].isoformat(" ") if a.get("created_at") else "", a["operator"], a["via"],
         mask_secrets(a["comment"] or ""), code(a["plan_sha256"])) for a in description.approvals))


def _rehearsal(run: Run) -> list[str]:
    rehearsal = run.args.get("rehearsal")
    if not rehearsal:
        return []
    lines = ["", "## Rehearsal", ""]
    if rehearsal.get("skipped"):
        return [*lines, f"The rehearsal on `{rehearsal['target']}` was **skipped** with `--skip-rehearsal` "
                        f"(confirmed, recorded in this run by {run.operator})."]
    lines.append(f"Rehearsed on target `{rehearsal['target']}` by apply run {code(rehearsal.get('run_id'))} "
                 f"(plan run {code(rehearsal.get('plan_id'))}).")
    if rehearsal.get("differences"):
        tolerance = rehearsal.get("tolerance")
        lines += ["", "Counts of this plan and of the rehearsal plan"
                  + (f" (tolerance {tolerance:g}):" if tolerance is not None else " (no tolerance set):"), ""]
        lines += table(("kind", "this plan", "rehearsal"),
                       ((kind, mine, theirs) for kind, (mine, theirs) in rehearsal["differences"].items()))
    return lines


def _canary(run: Run) -> list[str]:
    canary = run.args.get("canary")
    if not canary:
        return []
    lines = ["", "## Canary", "", f"{canary['changes']} changes spread evenly over the plan's {run.total} were "
             "applied first, then the run paused for verification."]
    if canary.get("verify_sql"):
        lines += ["", "Verification query (must return no rows):", "", "```sql", canary["verify_sql"], "```"]
    if "verified" in canary:
        verdict = "passed" if canary["verified"] else "**failed**: " + "; ".join(canary.get("problems") or [])
        lines += ["", f"Verification {verdict} ({canary.get('changed_keys', 0)} rows changed by the canary)."]
    return lines


def _commands(conn: Connected, run: Run) -> list[str]:
    target = quote(conn.target.name)
    confirm = f" --confirm {quote(conn.target.environment)}" if conn.target.protected else ""
    lines = [f"fillgate show {run.run_id} --target {target}"]
    if run.kind == RunKind.PLAN and run.plan_path and run.total:
        lines += [f"fillgate approve {quote(run.plan_path)} --comment '...'",
                  f"fillgate apply {quote(run.plan_path)} --max-changes {run.total}{confirm}"]
    if run.kind == RunKind.APPLY:
        canary = run.args.get("canary")
        extra = f" --canary {canary['changes']}" if canary else ""
        if canary and canary.get("verify_sql"):
            extra += f" --verify-sql {quote(canary['verify_sql'])}"
        if (run.args.get("rehearsal") or {}).get("skipped"):
            extra += " --skip-rehearsal"
        max_changes = run.args.get("max_changes")
        gate = f" --max-changes {max_changes}" if max_changes is not None else ""
        lines.insert(0, f"# this run: fillgate apply {quote(run.plan_path or '')}{gate}{confirm}{extra}")
    if run.kind in WRITING_KINDS:
        lines += [f"fillgate verify {run.run_id} --target {target}",
                  f"fillgate revert {run.run_id} --target {target} --dry-run",
                  f"fillgate revert {run.run_id} --target {target}{confirm}"]
    return ["```bash", *lines, "```"]


def _run_ids(conn: Connected, run: Run) -> list[str]:
    ids: list[tuple[str, str]] = [("this run", f"{run.run_id} ({run.kind}, {shown_status(run)})")]
    if run.plan_id and run.plan_id != run.run_id:
        ids.append(("plan run", run.plan_id))
    if run.plan_id:
        ids += [("apply run", f"{a.run_id} ({shown_status(a)})") for a in conn.ledger.runs_of_plan(run.plan_id)
                if a.run_id != run.run_id]
    if run.kind in WRITING_KINDS:
        ids += [("revert run", f"{r.run_id} ({shown_status(r)})") for r in conn.ledger.reverts_of(run.run_id)]
    rehearsal = run.args.get("rehearsal") or {}
    if rehearsal.get("run_id"):
        ids.append((f"rehearsal apply run (target {rehearsal['target']})", rehearsal["run_id"]))
    return [f"- {label}: {code(value)}" for label, value in ids]


def run_markdown(conn: Connected, description: RunDescription, plan_file: Path | None = None) -> str:
    """The Markdown report of a run (``plan_file``: shown for that plan file)."""
    run = description.run
    lines = [f"# fillgate {run.kind} run {code(run.run_id)}: {shown_status(run)}", "", *_summary(run),
             "", "## Counts", "", *table(("count", "value"), run.counts.items()),
             "", "## Diff sample", "", *_diff_sample(conn, run, plan_file), *_plan_findings(run, plan_file),
             "", "## Errors and conflicts", "", *_errors(description),
             "", "## Approvals", "", *_approvals(description), *_rehearsal(run), *_canary(run),
             "", "## Commands", "", *_commands(conn, run),
             "", "## Run ids", "", *_run_ids(conn, run),
             "", "<details><summary>arguments</summary>", "", "```json",
             json.dumps(run.args, default=str, indent=2, sort_keys=True), "```", "", "</details>", ""]
    return "\n".join(lines)
