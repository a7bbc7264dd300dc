"""The ``fillgate`` command: a thin Typer layer; every command is a library call."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from sqlalchemy.exc import SQLAlchemyError

from fillgate import report
from fillgate.config import Target, load_config
from fillgate.engine import ApplyResult, Limits, PlanResult, apply_plan, control_run, make_plan, resume_run, run_job
from fillgate.errors import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_ROW_PROBLEMS,
    FillgateError,
    Interrupted,
    PlanMismatchError,
    RunStateError,
    UsageError,
)
from fillgate.events import EventWriter
from fillgate.interrupts import stop_on_signals
from fillgate.job import load_runnable, parse_param_options
from fillgate.monitor import Monitor
from fillgate.pipeline import Pipeline, revert_pipeline, run_pipeline, stage_applies
from fillgate.plan import read_header
from fillgate.report import RichProgress
from fillgate.revert import preview_revert, revert_run
from fillgate.stamp import Connected, check_write_allowed, connect, init_target
from fillgate.throttle import ReplicationLagCheck, SQLCheck, Throttle
from fillgate.values import key_candidates

app = typer.Typer(
    name="fillgate",
    help="Safe, reviewable, reversible backfills: plan, gate, apply with audit, resume and revert.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(highlight=False, soft_wrap=False)
err = Console(stderr=True, highlight=False)

_state: dict[str, Any] = {"config": None}

TargetOpt = Annotated[str | None, typer.Option("--target", "-t", help="Target name from fillgate.toml.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
ConfirmOpt = Annotated[
    str | None, typer.Option("--confirm", help="Type the environment name to write to a protected target.")
]
MaxChangesOpt = Annotated[
    int | None, typer.Option("--max-changes", min=0, help="Refuse a plan with more than N changes.")
]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Changes per transaction.")]
MaxErrorsOpt = Annotated[int | None, typer.Option("--max-errors", min=0, help="Stop after more than N errors.")]
MaxRateOpt = Annotated[
    float | None,
    typer.Option("--max-error-rate", min=0.0, max=1.0, help="Stop when errors/rows exceeds R (after 100 rows)."),
]
PauseOpt = Annotated[int, typer.Option("--pause-between-batches", min=0, help="Sleep MS milliseconds between batches.")]
EventsOpt = Annotated[
    str | None, typer.Option("--events", help="Write run events as JSON lines to FILE ('-': stdout).")
]
RateOpt = Annotated[float | None, typer.Option("--rate", min=0.001, help="At most N rows per second.")]
LagOpt = Annotated[
    float | None,
    typer.Option("--max-replication-lag", min=0.0, help="Hold while a PostgreSQL replica lags more than S seconds."),
]
HoldWhileOpt = Annotated[
    list[str] | None,
    typer.Option("--hold-while", help="Hold while this SQL returns a true first column (repeatable)."),
]
MaxHoldOpt = Annotated[
    float | None, typer.Option("--max-hold", min=0.0, help="Stop the run if one hold lasts longer than S seconds.")
]
ParamOpt = Annotated[list[str] | None, typer.Option("--param", "-p", help="Job parameter name=value (repeatable).")]


@app.callback()
def _main(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Config file (default: fillgate.toml found upwards).")
    ] = None,
) -> None:
    _state["config"] = config


@contextmanager
def _errors() -> Iterator[None]:
    """Turn fillgate errors into a message on stderr and the documented exit code."""
    try:
        yield
    except Interrupted as exc:
        err.print(f"[bold yellow]interrupted:[/] {escape(str(exc))}", soft_wrap=True)
        if exc.run_id and "resume" not in str(exc) and "Plan again" not in str(exc):
            err.print(f"Continue it with: fillgate resume {exc.run_id}", soft_wrap=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except KeyboardInterrupt:
        err.print("[bold yellow]interrupted:[/] stopped by Ctrl-C before anything was written.", soft_wrap=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except FillgateError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        err.print(f"[bold red]database error:[/] {escape(reason)}", soft_wrap=True)
        raise typer.Exit(EXIT_ROW_PROBLEMS) from None


def _target(name: str | None) -> Target:
    return load_config(_state["config"]).target(name)


def _emit(as_json: bool, data: Callable[[], Any], human: Callable[[], None]) -> None:
    if as_json:
        sys.stdout.write(report.to_json(data()) + "\n")
    else:
        human()


def _finish_apply(result: ApplyResult, as_json: bool, human: Console, plan_errors: int = 0) -> None:
    _emit(as_json, lambda: report.apply_json(result), lambda: report.print_apply(human, result))
    if result.stopped == "interrupted":
        raise typer.Exit(EXIT_INTERRUPTED)
    raise typer.Exit(EXIT_OK if result.clean and not plan_errors else EXIT_ROW_PROBLEMS)


@app.command()
def init(
    target: TargetOpt = None,
    force_stamp: Annotated[
        bool, typer.Option("--force-stamp", help="Change an existing stamp to the target's environment (recorded).")
    ] = False,
    confirm: ConfirmOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create the ledger tables and stamp the database with the target's environment."""
    with _errors():
        result = init_target(_target(target), force_stamp=force_stamp, confirm=confirm)
    _emit(as_json, lambda: report.init_json(result), lambda: report.print_init(out, result))


@app.command()
def plan(
    job: Annotated[str, typer.Argument(help="path/to/file.py:ClassName or package.module:ClassName")],
    target: TargetOpt = None,
    output: Annotated[  # a str: a Path would drop the trailing "/" that marks a folder
        str | None, typer.Option("--output", "-o", help="Save the plan file here (a folder gets <plan id>.plan).")
    ] = None,
    param: ParamOpt = None,
    max_errors: MaxErrorsOpt = None,
    max_error_rate: MaxRateOpt = None,
    sample: Annotated[int, typer.Option("--sample", min=0, help="Changes to show in the diff.")] = 10,
    events: EventsOpt = None,
    rate: RateOpt = None,
    max_replication_lag: LagOpt = None,
    hold_while: HoldWhileOpt = None,
    max_hold: MaxHoldOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Dry run: compute every change and show it. Writes nothing to your tables."""
    with _errors():
        job_cls = load_runnable(job)
        params = parse_param_options(param or [])
        conn = connect(_target(target))
        limits = _limits(conn, rate, max_replication_lag, hold_while, max_hold,
                         max_errors=max_errors, max_error_rate=max_error_rate)
        with _monitor(events, as_json) as monitor:
            if issubclass(job_cls, Pipeline):
                staged = run_pipeline(conn, job_cls, params, out=output or ".fillgate/plans/", limits=limits,
                                      monitor=monitor, apply=False)
            else:
                result = make_plan(conn, job_cls, params, out=output, limits=limits, monitor=monitor)
    human = _human(events)
    if issubclass(job_cls, Pipeline):
        _emit(as_json, lambda: report.pipeline_json(staged), lambda: report.print_pipeline(human, staged))
        raise typer.Exit(EXIT_OK if staged.clean else EXIT_ROW_PROBLEMS)
    _emit(as_json, lambda: report.plan_json(result), lambda: report.print_plan(human, result, sample))
    problems = result.counts["errors"] or result.counts["unexpected_index"]
    raise typer.Exit(EXIT_ROW_PROBLEMS if problems else EXIT_OK)


def _limits(
    conn: Connected,
    rate: float | None = None,
    max_replication_lag: float | None = None,
    hold_while: list[str] | None = None,
    max_hold: float | None = None,
    **kwargs: Any,
) -> Limits:
    """Gates and pacing from the command line (built-in health checks included).

    The health checks run once now, so that one that cannot work on this target (a
    ``--hold-while`` query that fails, ``--max-replication-lag`` on a backend other than
    PostgreSQL) stops the command before anything is written, not after the first batch."""
    checks: list[Any] = [SQLCheck(sql) for sql in hold_while or []]
    if max_replication_lag is not None:
        checks.append(ReplicationLagCheck(max_replication_lag))
    if checks:
        with conn.engine.connect() as probe:
            Throttle(checks=checks).reasons(probe)
    values = {k: v for k, v in kwargs.items() if v is not None}
    return Limits(rate=rate, checks=checks, max_hold_s=max_hold, **values)


@contextmanager
def _monitor(events: str | None, as_json: bool) -> Iterator[Monitor]:
    """Events to a file or stdout, alerts from the environment, and a progress bar on a
    terminal; while inside, Ctrl-C and SIGTERM stop the run at its next batch boundary."""
    if events == "-" and as_json:
        raise UsageError(
            "--events - and --json both write to stdout. Write the events to a file "
            "(--events run.jsonl), or drop --json (with --events -, people's output goes to stderr)."
        )
    progress = RichProgress(err) if err.is_terminal and not as_json else None

    def stopping(reason: str) -> None:
        err.print(f"[bold yellow]{reason}[/]: stopping after the current batch "
                  "(press Ctrl-C again to stop at once; that batch is then rolled back).")

    with stop_on_signals(stopping), Monitor(events=EventWriter(events), progress=progress) as monitor:
        yield monitor


def _human(events: str | None) -> Console:
    """Where human-readable output goes: stderr when the events stream owns stdout."""
    return err if events == "-" else out


@app.command()
def apply(
    plan_file: Annotated[Path, typer.Argument(help="A plan file made by fillgate plan -o.")],
    target: TargetOpt = None,
    max_changes: MaxChangesOpt = None,
    confirm: ConfirmOpt = None,
    batch_size: BatchOpt = 5000,
    max_errors: MaxErrorsOpt = None,
    max_error_rate: MaxRateOpt = None,
    pause_between_batches: PauseOpt = 0,
    events: EventsOpt = None,
    rate: RateOpt = None,
    max_replication_lag: LagOpt = None,
    hold_while: HoldWhileOpt = None,
    max_hold: MaxHoldOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write exactly the reviewed plan: compare-and-set, audited, resumable."""
    with _errors():
        header = read_header(plan_file)
        if target is not None and target != header.target:
            raise PlanMismatchError(
                f"plan {plan_file} was made for target '{header.target}', not '{target}'. "
                f"Make a new plan for '{target}'."
            )
        conn = connect(_target(header.target))
        limits = _limits(conn, rate, max_replication_lag, hold_while, max_hold,
                         max_changes=max_changes, confirm=confirm, batch_size=batch_size, max_errors=max_errors,
                         max_error_rate=max_error_rate, pause_ms=pause_between_batches)
        with _monitor(events, as_json) as monitor:
            result = apply_plan(conn, plan_file, limits, monitor)
    _finish_apply(result, as_json, _human(events))


@app.command()
def run(
    job: Annotated[str, typer.Argument(help="path/to/file.py:ClassName or package.module:ClassName")],
    target: TargetOpt = None,
    output: Annotated[  # a str: a Path would drop the trailing "/" that marks a folder
        str, typer.Option("--output", "-o", help="Where to keep the plan (needed to resume).")
    ] = ".fillgate/plans/",
    param: ParamOpt = None,
    max_changes: MaxChangesOpt = None,
    confirm: ConfirmOpt = None,
    batch_size: BatchOpt = 5000,
    max_errors: MaxErrorsOpt = None,
    max_error_rate: MaxRateOpt = None,
    pause_between_batches: PauseOpt = 0,
    events: EventsOpt = None,
    rate: RateOpt = None,
    max_replication_lag: LagOpt = None,
    hold_while: HoldWhileOpt = None,
    max_hold: MaxHoldOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Plan, gate and apply in one go."""
    with _errors():
        job_cls = load_runnable(job)
        params = parse_param_options(param or [])
        conn = connect(_target(target))
        check_write_allowed(conn.target, confirm)
        limits = _limits(conn, rate, max_replication_lag, hold_while, max_hold,
                         max_changes=max_changes, confirm=confirm, batch_size=batch_size, max_errors=max_errors,
                         max_error_rate=max_error_rate, pause_ms=pause_between_batches)
        with _monitor(events, as_json) as monitor:
            if issubclass(job_cls, Pipeline):
                staged = run_pipeline(conn, job_cls, params, out=output, limits=limits, monitor=monitor)
            else:
                def show_plan(planned: PlanResult) -> None:
                    if not as_json:
                        report.print_plan(_human(events), planned, next_step=False)

                planned, result = run_job(conn, job_cls, params, out=output, limits=limits, monitor=monitor,
                                          on_planned=show_plan)
    if issubclass(job_cls, Pipeline):
        _emit(as_json, lambda: report.pipeline_json(staged), lambda: report.print_pipeline(_human(events), staged))
        raise typer.Exit(EXIT_OK if staged.clean else EXIT_ROW_PROBLEMS)
    _finish_apply(result, as_json, _human(events),
                  plan_errors=planned.counts["errors"] + planned.counts["unexpected_index"])


@app.command()
def runs(
    target: TargetOpt = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1)] = 20,
    kind: Annotated[
        str | None, typer.Option("--kind", help="init, stamp, plan, apply, revert or pipeline")
    ] = None,
    status: Annotated[str | None, typer.Option("--status")] = None,
    job: Annotated[str | None, typer.Option("--job")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List recent runs, newest first."""
    with _errors():
        found = connect(_target(target)).ledger.list_runs(limit=limit, kind=kind, status=status, job=job)
    _emit(as_json, lambda: report.runs_json(found), lambda: report.print_runs(out, found))


@app.command()
def show(run_id: Annotated[str, typer.Argument(metavar="RUN")], target: TargetOpt = None,
         as_json: JsonOpt = False) -> None:
    """Show one run: status, counts, timing, errors grouped by fingerprint."""
    with _errors():
        conn = connect(_target(target))
        ledger = conn.ledger
        found = ledger.get_run(run_id)
        related = [run_id]
        if found.kind == "pipeline":  # the stages' plan and apply runs are the pipeline's error log
            related += [r.run_id for r in ledger.children_of(run_id)] + [
                r.run_id for r in stage_applies(conn, run_id)
            ]
        if found.kind == "apply" and not found.details and found.parent_run_id:
            # an apply computes nothing: its slowest rows and lookup anomalies are its plan's
            found.details = {**ledger.get_run(found.parent_run_id).details, "from_plan_run": found.parent_run_id}
        groups = ledger.error_groups(related)
    _emit(as_json, lambda: report.show_json(found, groups), lambda: report.print_show(out, found, groups))


@app.command()
def history(
    table: Annotated[str, typer.Argument()],
    key: Annotated[str, typer.Argument(help="The row's key: 42, or a,b for a composite key, or a JSON list.")],
    column: Annotated[str | None, typer.Option("--column", help="Only this column.")] = None,
    target: TargetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Which runs changed this row, when, and from what to what."""
    with _errors():
        entries = connect(_target(target)).ledger.history(table, key_candidates(key), column)
    _emit(as_json, lambda: report.history_json(entries), lambda: report.print_history(out, table, key, entries))


@app.command()
def revert(
    run_id: Annotated[str, typer.Argument(metavar="RUN")],
    target: TargetOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be restored; write nothing.")] = False,
    confirm: ConfirmOpt = None,
    batch_size: BatchOpt = 5000,
    pause_between_batches: PauseOpt = 0,
    events: EventsOpt = None,
    rate: RateOpt = None,
    max_replication_lag: LagOpt = None,
    hold_while: HoldWhileOpt = None,
    max_hold: MaxHoldOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Undo a run from its audit log, as a new audited run; rows changed since are left alone."""
    with _errors():
        conn = connect(_target(target))
        if dry_run:
            preview = preview_revert(conn, run_id)
        else:
            limits = _limits(conn, rate, max_replication_lag, hold_while, max_hold,
                             confirm=confirm, batch_size=batch_size, pause_ms=pause_between_batches)
            with _monitor(events, as_json) as monitor:
                results = (revert_pipeline(conn, run_id, limits, monitor)
                           if conn.ledger.get_run(run_id).kind == "pipeline"
                           else [revert_run(conn, run_id, limits, monitor)])
            if not results:
                raise RunStateError(f"pipeline run {run_id} applied no stage; there is nothing to revert.")
    if dry_run:
        _emit(as_json, lambda: report.preview_json(preview), lambda: report.print_preview(out, preview))
        return
    if len(results) == 1:
        _finish_apply(results[0], as_json, _human(events))
    # a pipeline: one revert per stage, last stage first
    _emit(as_json, lambda: {"run_id": run_id, "reverts": [report.apply_json(r) for r in results]},
          lambda: [report.print_apply(_human(events), r) for r in results])
    raise typer.Exit(EXIT_OK if all(r.clean for r in results) else EXIT_ROW_PROBLEMS)


def _control(run_id: str, target: str | None, action: str, as_json: bool) -> None:
    with _errors():
        conn: Connected = connect(_target(target))
        found = control_run(conn, run_id, action)
    if as_json:
        sys.stdout.write(json.dumps({"run_id": found.run_id, "status": found.status,
                                     "control": found.control}) + "\n")
    elif found.control:
        out.print(f"Run {run_id} will {action} after its current batch.")
    else:
        out.print(f"Run {run_id} is {found.status}.")


@app.command()
def pause(run_id: Annotated[str, typer.Argument(metavar="RUN")], target: TargetOpt = None,
          as_json: JsonOpt = False) -> None:
    """Pause a running apply or revert after its current batch."""
    _control(run_id, target, "pause", as_json)


@app.command()
def cancel(run_id: Annotated[str, typer.Argument(metavar="RUN")], target: TargetOpt = None,
           as_json: JsonOpt = False) -> None:
    """Cancel a running or paused apply or revert (applied batches stay audited and revertable)."""
    _control(run_id, target, "cancel", as_json)


@app.command()
def resume(
    run_id: Annotated[str, typer.Argument(metavar="RUN")],
    target: TargetOpt = None,
    confirm: ConfirmOpt = None,
    batch_size: BatchOpt = 5000,
    max_errors: MaxErrorsOpt = None,
    max_error_rate: MaxRateOpt = None,
    pause_between_batches: PauseOpt = 0,
    events: EventsOpt = None,
    rate: RateOpt = None,
    max_replication_lag: LagOpt = None,
    hold_while: HoldWhileOpt = None,
    max_hold: MaxHoldOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Continue a paused, failed or interrupted run from its checkpoint (exactly once)."""
    with _errors():
        conn = connect(_target(target))
        limits = _limits(conn, rate, max_replication_lag, hold_while, max_hold,
                         confirm=confirm, batch_size=batch_size, max_errors=max_errors,
                         max_error_rate=max_error_rate, pause_ms=pause_between_batches)
        with _monitor(events, as_json) as monitor:
            result = resume_run(conn, run_id, limits, monitor)
    _finish_apply(result, as_json, _human(events))


@app.command()
def demo(
    path: Annotated[
        Path | None, typer.Option("--path", help="SQLite file to create (default: a new temporary file).")
    ] = None,
    rows: Annotated[int, typer.Option("--rows", min=100, help="Customers to generate.")] = 5000,
) -> None:
    """A self-contained tour on an embedded SQLite file: init, plan, gate, apply, history, revert."""
    from fillgate.demo import run_demo

    with _errors():
        run_demo(out, path=path, rows=rows)


@app.command()
def serve(
    target: Annotated[
        list[str] | None, typer.Option("--target", "-t", help="Serve this target (repeatable; default: all).")
    ] = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind; anything but loopback needs a token.")] = (
        "127.0.0.1"),
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on.")] = 8642,
    read_only: Annotated[bool, typer.Option("--read-only", help="Hide and refuse every action.")] = False,
    token_file: Annotated[
        Path | None, typer.Option("--token-file", help="File holding the token (else FILLGATE_WEB_TOKEN).")
    ] = None,
    cache_dir: Annotated[
        Path | None, typer.Option("--cache-dir", help="Where plan indexes are kept (default ~/.cache/fillgate).")
    ] = None,
) -> None:
    """Start the web dashboard: runs, plans, history, revert (needs: pip install 'fillgate[web]')."""
    with _errors():
        from fillgate.web import serve as serve_web

        serve_web(_state["config"], target, host=host, port=port, read_only=read_only, token_file=token_file,
                  cache_dir=cache_dir)


@app.command()
def lint(
    paths: Annotated[list[Path], typer.Argument(help="Job modules or folders (searched recursively for *.py).")],
    as_json: JsonOpt = False,
) -> None:
    """Find hard-coded target names and database URLs in job modules (exit 1 if any)."""
    from fillgate.lint import configured_names, lint_paths, python_files

    try:
        names, protected = configured_names(_state["config"])
        files = python_files(paths)
        findings = lint_paths(files, names, protected)
    except FillgateError as exc:  # plain text: lint output is read by scripts and editors
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    if as_json:
        data = {"files": len(files), "findings": [f.to_json() for f in findings]}
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        for finding in findings:
            typer.echo(finding.format())
        where = f"{len(files)} file{'s' if len(files) != 1 else ''}"
        typer.echo(f"{len(findings)} finding{'s' if len(findings) != 1 else ''} in {where}."
                   if findings else f"{where} checked: no hard-coded targets or database URLs.", err=True)
    raise typer.Exit(EXIT_ROW_PROBLEMS if findings else EXIT_OK)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # Ctrl-C outside a command's own handling (while starting up)
        err.print("[bold yellow]interrupted:[/] stopped by Ctrl-C; nothing was written.")
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
