"""The ``fillgate`` command: a thin Typer layer; every command is a library call."""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperGroup

from fillgate import output
from fillgate.errors import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_ROW_PROBLEMS,
    EXIT_TAMPERED,
    EXIT_USAGE,
    FillgateError,
    Interrupted,
    RunNotFoundError,
    UsageError,
)
from fillgate.interrupts import stop_on_signals
from fillgate.validate import has_surrogate

# The modules below import SQLAlchemy, Alembic and the rest of fillgate: loaded by the command
# that needs them, so that `fillgate --help` and a usage error start fast.
if TYPE_CHECKING:
    from fillgate import applier, commands, control, distributed, loader, pipeline_run, report, stamp, stampread
    from fillgate import config as config_mod
    from fillgate import events as events_mod
    from fillgate import history as history_mod
    from fillgate import job as job_mod
    from fillgate import limits as limits_mod
    from fillgate import monitor as monitor_mod
    from fillgate import plan as plan_mod
    from fillgate import revert as revert_mod
    from fillgate.applier import ApplyResult
    from fillgate.config import Config, Target
    from fillgate.ledger import integrity
    from fillgate.limits import Limits
    from fillgate.monitor import Monitor
    from fillgate.planner import PlanResult
    from fillgate.report import HoldLines, RichProgress
    from fillgate.stamp import Connected
else:
    class _Lazy:
        """A module imported on first use."""

        def __init__(self, name: str) -> None:
            self._name = name

        def __getattr__(self, attr: str) -> Any:
            return getattr(importlib.import_module(self._name), attr)

    applier, commands, control, loader, pipeline_run, report, stamp, stampread = (
        _Lazy(f"fillgate.{name}") for name in
        ("applier", "commands", "control", "loader", "pipeline_run", "report", "stamp", "stampread"))
    config_mod, events_mod, history_mod, job_mod, limits_mod, monitor_mod, revert_mod = (
        _Lazy(f"fillgate.{name}") for name in ("config", "events", "history", "job", "limits", "monitor", "revert"))
    integrity = _Lazy("fillgate.ledger.integrity")
    distributed, plan_mod = _Lazy("fillgate.distributed"), _Lazy("fillgate.plan")


def _database_error(exc: BaseException) -> bool:
    """An error SQLAlchemy raised (it is loaded whenever one can have been raised)."""
    errors = sys.modules.get("sqlalchemy.exc")
    return errors is not None and isinstance(exc, errors.SQLAlchemyError)


# Click's usage errors (a bad option, a missing argument) derive from this class; found through
# typer's own BadParameter so that it works whether typer vendors click or uses it.
_ClickException: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
_GLOBAL_OPTIONS = ("--config", "-c")


def _config_first(args: list[str]) -> list[str]:
    """Move ``--config PATH`` given after the subcommand in front of it (where Click expects
    the group's options), so that ``fillgate runs --config f.toml`` works like
    ``fillgate --config f.toml runs``. Arguments after ``--`` are left alone."""
    i = 0  # the subcommand's position, after the group's own options
    while i < len(args) and args[i].startswith("-") and args[i] != "--":
        i += 2 if args[i] in _GLOBAL_OPTIONS else 1
    if i >= len(args):
        return list(args)
    moved: list[str] = []
    rest: list[str] = []
    j = i + 1
    while j < len(args):
        arg = args[j]
        if arg == "--":
            rest.extend(args[j:])
            break
        if arg in _GLOBAL_OPTIONS:
            moved += args[j:j + 2]
            j += 2
            continue
        (moved if arg.startswith("--config=") else rest).append(arg)
        j += 1
    return [*args[:i], *moved, args[i], *rest]


class _Group(TyperGroup):
    """fillgate's command group: ``--config`` anywhere, arguments that are text, and usage
    errors with the same ``error:`` line (and ``--json`` object) as every other error."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        _state.update(config=None, loaded=None, target=None, targets=(), json="--json" in args)
        for number, arg in enumerate(args, start=1):
            if has_surrogate(arg) or "\x00" in arg:
                _fail(EXIT_USAGE, "UsageError", f"argument {number} is not valid UTF-8 text ({_bad_bytes(arg)}); "
                      "fillgate takes UTF-8 arguments.", _state["json"])
        if args and args[-1] in _GLOBAL_OPTIONS:
            _fail(EXIT_USAGE, "UsageError", f"option {args[-1]} needs a value: {args[-1]} PATH.", _state["json"])
        with _usage_errors():
            return super().parse_args(ctx, _config_first(args))

    def invoke(self, ctx: Any) -> Any:
        with _usage_errors():
            return super().invoke(ctx)


@contextmanager
def _usage_errors() -> Iterator[None]:
    try:
        yield
    except _ClickException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            raise
        context = getattr(exc, "ctx", None)
        where = f" (see: {context.command_path} --help)" if context is not None else ""
        _fail(getattr(exc, "exit_code", EXIT_USAGE), "UsageError", exc.format_message() + where,  # type: ignore[attr-defined]
              _state["json"])


def _bad_bytes(arg: str) -> str:
    """Describe the undecodable part of an argument without printing it."""
    bad = [c for c in arg if "\ud800" <= c <= "\udfff"]
    if not bad:
        return "a NUL character"
    if all("\udc80" <= c <= "\udcff" for c in bad):  # bytes the OS could not decode (surrogateescape)
        return "byte " + ", ".join(f"0x{ord(c) - 0xDC00:02x}" for c in bad[:3])
    return "a lone surrogate"


app = typer.Typer(
    name="fillgate",
    help="Safe, reviewable, reversible backfills: plan, gate, apply with audit, resume and revert.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_Group,
)
out = Console(highlight=False, soft_wrap=False)
err = Console(stderr=True, highlight=False)

# per invocation: the --config given, the target resolved, the declared targets, --json anywhere
_state: dict[str, Any] = {"config": None, "loaded": None, "target": None, "targets": (), "json": False}

COUNT_MAX = 2**63 - 1  # the largest count or size an option takes (a database's BIGINT, Python's sys.maxsize)
PAUSE_MAX_MS = 86_400_000  # a day: sleeping longer overflows the platform's timer

TargetOpt = Annotated[str | None, typer.Option("--target", "-t", help="Target name from fillgate.toml.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
ConfirmOpt = Annotated[
    str | None, typer.Option("--confirm", help="Type the environment name to write to a protected target.")
]
MaxChangesOpt = Annotated[
    int | None, typer.Option("--max-changes", min=0, max=COUNT_MAX,
                              help="Refuse a plan with more than N changes (default: the target's max_changes).")
]
BatchOpt = Annotated[
    int | None,
    typer.Option("--batch-size", min=1, max=COUNT_MAX,
                 help="Changes per transaction: the most with --chunk-time; given alone, every batch's size "
                      "(no adapting). Default 5000."),
]
ChunkTimeOpt = Annotated[
    float | None,
    typer.Option("--chunk-time", min=0.0,
                 help="Adapt the batch size so each batch's transaction takes about S seconds (default 0.5 "
                      "unless --batch-size is given; 0: fixed size)."),
]
NoChunkTimeOpt = Annotated[
    bool, typer.Option("--no-chunk-time", help="Keep every batch at --batch-size (same as --chunk-time 0).")
]
BatchTimeoutOpt = Annotated[
    float | None,
    typer.Option("--batch-timeout", min=0.0,
                 help="Cancel a batch statement running longer than S seconds and retry the batch once at a "
                      "quarter of its size (default: 10 chunk times, at least 5 s; 0: none)."),
]
MaxLoadOpt = Annotated[
    int | None,
    typer.Option("--max-load", min=0, max=COUNT_MAX,
                 help="Hold while the database's load is above N (MariaDB/MySQL Threads_running, PostgreSQL "
                      "active sessions)."),
]
CriticalLoadOpt = Annotated[
    int | None,
    typer.Option("--critical-load", min=0, max=COUNT_MAX,
                 help="Stop when the load is above N: the run pauses at a batch boundary (exit 3)."),
]
VacuumOpt = Annotated[
    bool, typer.Option("--hold-during-vacuum", help="Hold while (auto)vacuum runs on the table (PostgreSQL).")
]
TxnAgeOpt = Annotated[
    float | None,
    typer.Option("--max-transaction-age", min=0.0,
                 help="Hold while another session's transaction open longer than S seconds holds a lock on "
                      "the table (PostgreSQL; MariaDB/MySQL: any InnoDB transaction holding locks)."),
]
MaxErrorsOpt = Annotated[
    int | None, typer.Option("--max-errors", min=0, max=COUNT_MAX, help="Stop after more than N errors.")
]
MaxRateOpt = Annotated[
    float | None,
    typer.Option("--max-error-rate", min=0.0, max=1.0, help="Stop when errors/rows exceeds R (after 100 rows)."),
]
PauseOpt = Annotated[
    int, typer.Option("--pause-between-batches", min=0, max=PAUSE_MAX_MS, help="Sleep MS milliseconds between batches.")
]
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
SkipRehearsalOpt = Annotated[
    bool, typer.Option("--skip-rehearsal", help="Write to a target with rehearse_on without the rehearsal "
                                                "(needs --confirm ENV; recorded in the run).")
]
ParamOpt = Annotated[list[str] | None, typer.Option("--param", "-p", help="Job parameter name=value (repeatable).")]
WorkersOpt = Annotated[
    int | None, typer.Option("--workers", min=1, help="Distributed: start a local Dask cluster of N worker processes "
                                                      "(needs: pip install 'fillgate[dask]').")
]
SchedulerOpt = Annotated[
    str | None, typer.Option("--scheduler", help="Distributed: use the Dask cluster at this address (tcp://HOST:8786; "
                                                 "default: DASK_SCHEDULER_ADDRESS when --workers is not given).")
]
PartitionsOpt = Annotated[
    int | None, typer.Option("--partitions", min=1, help="Distributed: split the source into P key ranges of about "
                                                         "as many rows each (default: 2 per worker).")
]


@app.callback()
def _main(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Config file (default: fillgate.toml found upwards); "
                                            "may also follow the command."),
    ] = None,
) -> None:
    _state["config"] = config


@contextmanager
def _errors(as_json: bool = False) -> Iterator[None]:
    """The single place where errors become output: a line on stderr (``error:``, or
    ``refused:`` for a guard's refusal), with ``--json`` also a JSON object on stdout, and
    the documented exit code."""
    try:
        yield
    except RunNotFoundError as exc:
        _fail(exc.exit_code, type(exc).__name__, _run_not_found(exc), as_json)
    except Interrupted as exc:
        message = str(exc)
        if exc.run_id and "resume" not in message and "Plan again" not in message:
            message += f" Continue it with: fillgate resume {exc.run_id}"
        _fail(EXIT_INTERRUPTED, "Interrupted", message, as_json)
    except KeyboardInterrupt:
        _interrupted_early(as_json)
    except FillgateError as exc:
        _fail(exc.exit_code, type(exc).__name__, str(exc), as_json)
    except Exception as exc:  # a bug (in fillgate or in job code): still one line, never a traceback
        if _database_error(exc):
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            _fail(EXIT_ROW_PROBLEMS, "DatabaseError", f"the database answered: {reason}", as_json)
        _fail(EXIT_ROW_PROBLEMS, type(exc).__name__,
              f"unexpected {type(exc).__name__}: {exc}. This is a bug in the job's code or in fillgate; "
              "FILLGATE_DEBUG=1 shows where it was raised.", as_json)
    except (SystemExit, GeneratorExit) as exc:  # job code called sys.exit(): not fillgate's exit code
        _fail(EXIT_ROW_PROBLEMS, type(exc).__name__,
              f"job code raised {type(exc).__name__}({exc}) (sys.exit() or a generator's close) while fillgate "
              "ran it; fillgate stopped, a run it had started is recorded as failed. Job code must raise an "
              "exception, never exit.", as_json)


def _interrupted_early(as_json: bool) -> None:
    """Ctrl-C before the command wrote anything (often while it still imports the modules it
    needs): said without importing anything more, since an import cut short by the signal
    cannot be retried safely in this process."""
    message = "stopped by Ctrl-C before anything was written."
    err.print(f"[bold yellow]interrupted:[/] {message}", soft_wrap=True)
    if as_json or _state["json"]:
        error = {"type": "Interrupted", "exit_code": EXIT_INTERRUPTED, "message": message}
        sys.stdout.write(json.dumps({"error": error}) + "\n")
    raise typer.Exit(EXIT_INTERRUPTED)


def _fail(exit_code: int, kind: str, message: str, as_json: bool) -> None:
    if os.environ.get("FILLGATE_DEBUG"):  # for fillgate's own developers: where it came from
        traceback.print_exc()
    output.print_error(err, exit_code, message)
    if as_json or _state["json"]:
        sys.stdout.write(output.to_json(output.error_json(exit_code, kind, message)) + "\n")
    raise typer.Exit(exit_code)


def _run_not_found(exc: RunNotFoundError) -> str:
    """Say which target's ledger was searched, and that there are others."""
    target: Target | None = _state["target"]
    message = str(exc)
    if target is None:
        return message
    where = f"the ledger of target '{target.name}' (environment {target.environment}, {target.safe_url})"
    message = message.replace("this target's ledger", where) if "this target's ledger" in message \
        else f"{message} (searched {where})"
    message = message.replace("see: fillgate runs", f"see: fillgate runs --target {target.name}")
    others = [name for name in _state["targets"] if name != target.name]
    if others:
        message += f". Other declared targets: {', '.join(others)}; pick one with --target NAME."
    return message


def _config() -> Config:
    """The configuration, read once per command (the early stamp read and the connect share it)."""
    config: Config | None = _state["loaded"]
    if config is None:
        config = _state["loaded"] = config_mod.load_config(_state["config"])
        _state["targets"] = tuple(sorted(config.targets))
    return config


def _target(name: str | None) -> Target:
    _state["target"] = target = _config().target(name)
    return target


def _refuse_early(name: str | None) -> None:
    """Refuse a target whose database is stamped as another environment, read through its
    driver before SQLAlchemy and the rest of fillgate are imported (fillgate.stampread); any
    other problem is left to the full connect, which reports it where it always did."""
    try:
        spec = _config().spec(name)
        url = spec.url_text()
    except FillgateError:
        return
    stampread.refuse_if_stamped_otherwise(spec.name, spec.environment, url)


def _plan_target(plan_file: str | Path, target: str | None) -> Connected:
    """The target a plan file was made for, connected (``target``, if given, must be it, and
    its stamp is read early; without it the plan's header names the target)."""
    if target is not None:
        _refuse_early(target)
    return commands.target_of_plan(_config(), plan_file, target)


def _connect(name: str | None) -> Connected:
    """The target, reached and its stamp checked (refused early when it can be)."""
    _refuse_early(name)
    return stamp.connect(_target(name))


def _emit(as_json: bool, data: Callable[[], Any], human: Callable[[], None]) -> None:
    if as_json:
        sys.stdout.write(output.to_json(data()) + "\n")
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
    with _errors(as_json):
        result = stamp.init_target(_target(target), force_stamp=force_stamp, confirm=confirm)
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
    sample: Annotated[int, typer.Option("--sample", min=0, max=COUNT_MAX, help="Changes to show in the diff.")] = 10,
    events: EventsOpt = None,
    rate: RateOpt = None,
    max_replication_lag: LagOpt = None,
    hold_while: HoldWhileOpt = None,
    max_hold: MaxHoldOpt = None,
    max_load: MaxLoadOpt = None,
    critical_load: CriticalLoadOpt = None,
    hold_during_vacuum: VacuumOpt = False,
    max_transaction_age: TxnAgeOpt = None,
    estimate: Annotated[
        bool, typer.Option("--estimate/--no-estimate",
                           help="Time a trial batch of the plan's first changes, rolled back, to estimate the "
                                "apply's duration (needs the right to write; nothing is kept).")
    ] = True,
    workers: WorkersOpt = None,
    scheduler: SchedulerOpt = None,
    partitions: PartitionsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Dry run: compute every change and show it. Writes nothing to your tables.

    With --workers, --scheduler or --partitions: a distributed plan, one plan directory
    (a manifest and a plan file per partition) that apply verifies and gates as one plan."""
    with _errors(as_json):
        _refuse_early(target)  # before the job and the cluster are loaded: a refusal comes fast
        runnable = loader.load_runnable(job)
        cluster = distributed.Cluster.from_options(workers, scheduler, partitions)
        conn = stamp.connect(_target(target))
        limits = _limits(conn, rate, max_replication_lag, hold_while, max_hold, table=_table_of(runnable),
                         health=_health(max_load, critical_load, hold_during_vacuum, max_transaction_age),
                         max_errors=max_errors, max_error_rate=max_error_rate)
        with _monitor(events, as_json) as monitor:
            result = commands.plan(conn, runnable, job_mod.parse_param_options(param or []), out=output, limits=limits,
                                   monitor=monitor, estimate=estimate, cluster=cluster)
    human = _human(events)
    if isinstance(result, pipeline_run.PipelineResult):
        _emit(as_json, lambda: report.pipeline_json(result), lambda: report.print_pipeline(human, result))
        raise typer.Exit(EXIT_OK if result.clean else EXIT_ROW_PROBLEMS)
    confirm = conn.target.environment if conn.target.protected else None
    _emit(as_json, lambda: report.plan_json(result), lambda: report.print_plan(human, result, sample, confirm=confirm))
    problems = result.counts["errors"] or result.counts["unexpected_index"]
    raise typer.Exit(EXIT_ROW_PROBLEMS if problems else EXIT_OK)


def _limits(
    conn: Connected,
    rate: float | None = None,
    max_replication_lag: float | None = None,
    hold_while: list[str] | None = None,
    max_hold: float | None = None,
    *,
    table: str | None = None,
    health: dict[str, Any] | None = None,
    **values: Any,
) -> Limits:
    """Gates and pacing from the command line (see ``Limits.for_target``)."""
    return limits_mod.Limits.for_target(conn, hold_while=hold_while or (), max_replication_lag=max_replication_lag,
                                        rate=rate, max_hold_s=max_hold, table=table, **(health or {}), **values)


def _health(max_load: int | None, critical_load: int | None, hold_during_vacuum: bool,
            max_transaction_age: float | None) -> dict[str, Any]:
    return {"max_load": max_load, "critical_load": critical_load, "hold_during_vacuum": hold_during_vacuum,
            "max_transaction_age": max_transaction_age}


def _pacing(batch_size: int | None, chunk_time: float | None, no_chunk_time: bool,
            batch_timeout: float | None) -> dict[str, Any]:
    """Batch sizes: ``--chunk-time`` adapts them up to ``--batch-size``; an explicit
    ``--batch-size`` alone (or ``--no-chunk-time``, ``--chunk-time 0``) keeps them fixed, as
    pt-online-schema-change's explicit ``--chunk-size`` does; neither: 0.5 s, up to 5000."""
    from fillgate.pacing import DEFAULT_CHUNK_TIME, DEFAULT_MAX_BATCH

    if no_chunk_time:
        chunk = 0.0
    elif chunk_time is not None:
        chunk = chunk_time
    else:
        chunk = 0.0 if batch_size is not None else DEFAULT_CHUNK_TIME
    return {"batch_size": batch_size or DEFAULT_MAX_BATCH, "chunk_time": chunk or None,
            "batch_timeout_s": batch_timeout}


def _table_of(runnable: Any) -> str | None:
    """The table a job writes (None for a pipeline: its stages write several)."""
    table = getattr(runnable, "table", None)
    return table if isinstance(table, str) else None


@contextmanager
def _monitor(events: str | None, as_json: bool) -> Iterator[Monitor]:
    """Events to a file or stdout, alerts from the environment, and a progress bar on a
    terminal; while inside, Ctrl-C and SIGTERM stop the run at its next batch boundary."""
    if events == "-" and as_json:
        raise UsageError(
            "--events - and --json both write to stdout. Write the events to a file "
            "(--events run.jsonl), or drop --json (with --events -, people's output goes to stderr)."
        )
    progress: RichProgress | HoldLines | None = None
    if not as_json:
        progress = report.RichProgress(err) if err.is_terminal else report.HoldLines(err)

    def stopping(reason: str) -> None:
        err.print(f"[bold yellow]{reason}[/]: stopping after the current batch "
                  "(press Ctrl-C again to stop at once; that batch is then rolled back).")

    writer = events_mod.EventWriter(events)
    with stop_on_signals(stopping, linger=True), monitor_mod.Monitor(events=writer, progress=progress) as monitor:
        yield monitor


def _human(events: str | None) -> Console:
    """Where human-readable output goes: stderr when the events stream owns stdout."""
    return err if events == "-" else out


@app.command()
def apply(
    plan_file: Annotated[Path, typer.Argument(help="A plan file made by fillgate plan -o, or a distributed plan's "
                                                   "directory.")],
    target: TargetOpt = None,
    max_changes: MaxChangesOpt = None,
    confirm: ConfirmOpt = None,
    batch_size: BatchOpt = None,
    max_errors: MaxErrorsOpt = None,
    max_error_rate: MaxRateOpt = None,
    pause_between_batches: PauseOpt = 0,
    events: EventsOpt = None,
    rate: RateOpt = None,
    max_replication_lag: LagOpt = None,
    hold_while: HoldWhileOpt = None,
    max_hold: MaxHoldOpt = None,
    canary: Annotated[
        int | None, typer.Option("--canary", min=1, help="Apply N changes spread evenly over the plan first, then "
                                                         "pause and verify them; resume applies the rest.")
    ] = None,
    verify_sql: Annotated[
        str | None, typer.Option("--verify-sql", help="With --canary: a query that must return no rows.")
    ] = None,
    skip_rehearsal: SkipRehearsalOpt = False,
    chunk_time: ChunkTimeOpt = None,
    no_chunk_time: NoChunkTimeOpt = False,
    batch_timeout: BatchTimeoutOpt = None,
    max_load: MaxLoadOpt = None,
    critical_load: CriticalLoadOpt = None,
    hold_during_vacuum: VacuumOpt = False,
    max_transaction_age: TxnAgeOpt = None,
    workers: WorkersOpt = None,
    scheduler: SchedulerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write exactly the reviewed plan: compare-and-set, audited, resumable.

    A distributed plan (a plan directory) is applied on --workers N or the --scheduler's
    cluster, partition by partition; without either, in this process."""
    with _errors(as_json):
        conn = _plan_target(plan_file, target)
        cluster = distributed.Cluster.from_options(workers, scheduler)
        _state["target"] = conn.target
        if verify_sql is not None and canary is None:
            raise UsageError("--verify-sql checks a canary; give --canary N too.")
        limits = _limits(conn, rate, max_replication_lag, hold_while, max_hold,
                         table=commands.plan_header(plan_file).table,
                         health=_health(max_load, critical_load, hold_during_vacuum, max_transaction_age),
                         max_changes=max_changes, confirm=confirm, max_errors=max_errors,
                         max_error_rate=max_error_rate, pause_ms=pause_between_batches,
                         skip_rehearsal=skip_rehearsal or None,
                         **_pacing(batch_size, chunk_time, no_chunk_time, batch_timeout))
        with _monitor(events, as_json) as monitor:
            result = commands.apply(conn, plan_file, limits, monitor, cluster, canary=canary, verify_sql=verify_sql)
    _finish_apply(result, as_json, _human(events))


StreamOpt = Annotated[bool, typer.Option(
    "--stream", help="Apply each page's changes as they are planned (no gate may apply: with --max-changes "
                     "or the target's max_changes the plan is made first). Faster; a run stopped before its "
                     "plan is complete cannot be resumed, only run again or reverted.")]


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
    batch_size: BatchOpt = None,
    max_errors: MaxErrorsOpt = None,
    max_error_rate: MaxRateOpt = None,
    pause_between_batches: PauseOpt = 0,
    events: EventsOpt = None,
    rate: RateOpt = None,
    max_replication_lag: LagOpt = None,
    hold_while: HoldWhileOpt = None,
    max_hold: MaxHoldOpt = None,
    skip_rehearsal: SkipRehearsalOpt = False,
    chunk_time: ChunkTimeOpt = None,
    no_chunk_time: NoChunkTimeOpt = False,
    batch_timeout: BatchTimeoutOpt = None,
    max_load: MaxLoadOpt = None,
    critical_load: CriticalLoadOpt = None,
    hold_during_vacuum: VacuumOpt = False,
    max_transaction_age: TxnAgeOpt = None,
    workers: WorkersOpt = None,
    scheduler: SchedulerOpt = None,
    partitions: PartitionsOpt = None,
    stream: StreamOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Plan, gate and apply in one go (distributed on a Dask cluster with --workers or --scheduler)."""
    with _errors(as_json):
        _refuse_early(target)  # before the job and the cluster are loaded: a refusal comes fast
        runnable = loader.load_runnable(job)
        cluster = distributed.Cluster.from_options(workers, scheduler, partitions)
        conn = stamp.connect(_target(target))
        stamp.check_write_allowed(conn.target, confirm)
        limits = _limits(conn, rate, max_replication_lag, hold_while, max_hold, table=_table_of(runnable),
                         health=_health(max_load, critical_load, hold_during_vacuum, max_transaction_age),
                         max_changes=max_changes, confirm=confirm, max_errors=max_errors,
                         max_error_rate=max_error_rate, pause_ms=pause_between_batches,
                         skip_rehearsal=skip_rehearsal or None,
                         **_pacing(batch_size, chunk_time, no_chunk_time, batch_timeout))

        def show_plan(planned: PlanResult) -> None:
            if not as_json:
                report.print_plan(_human(events), planned, next_step=False)

        with _monitor(events, as_json) as monitor:
            done = commands.run(conn, runnable, job_mod.parse_param_options(param or []), out=output, limits=limits,
                                monitor=monitor, on_planned=show_plan, cluster=cluster, stream=stream)
    _finish_run(done, as_json, events)


def _finish_run(done: commands.RunResult, as_json: bool, events: str | None) -> None:
    """``fillgate run``'s result: a pipeline's stages, or the job's apply (and its plan's errors)."""
    if done.pipeline is not None:
        staged = done.pipeline
        _emit(as_json, lambda: report.pipeline_json(staged), lambda: report.print_pipeline(_human(events), staged))
        raise typer.Exit(EXIT_OK if staged.clean else EXIT_ROW_PROBLEMS)
    assert done.plan is not None and done.apply is not None
    _finish_apply(done.apply, as_json, _human(events),
                  plan_errors=done.plan.counts["errors"] + done.plan.counts["unexpected_index"])


@app.command()
def approve(
    plan_file: Annotated[Path, typer.Argument(help="A plan file made by fillgate plan -o.")],
    target: TargetOpt = None,
    comment: Annotated[str | None, typer.Option("--comment", help="Why you approve (kept with the approval).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Approve a plan file (four-eyes): record that you, the operator, reviewed this exact file."""
    with _errors(as_json):
        conn = _plan_target(plan_file, target)
        _state["target"] = conn.target
        result = commands.approve(conn, plan_file, comment)
    _emit(as_json, lambda: report.approve_json(result), lambda: report.print_approve(out, result))


@app.command()
def runs(
    target: TargetOpt = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=COUNT_MAX)] = 20,
    kind: Annotated[
        str | None, typer.Option("--kind", help="init, stamp, plan, apply, revert or pipeline")
    ] = None,
    status: Annotated[str | None, typer.Option("--status")] = None,
    job: Annotated[str | None, typer.Option("--job")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List recent runs, newest first."""
    with _errors(as_json):
        found = _connect(target).ledger.list_runs(limit=limit, kind=kind, status=status, job=job)
    _emit(as_json, lambda: report.runs_json(found),
          lambda: report.print_runs(out, found, {"kind": kind, "status": status, "job": job}))


ShowFormat = Annotated[
    str | None, typer.Option("--format", help="text (default), json (as --json) or markdown (a report for a pull "
                                              "request or ticket).")
]


@app.command()
def show(run_id: Annotated[str, typer.Argument(metavar="RUN", help="A run id, or a plan file (shows its plan run).")],
         target: TargetOpt = None, output_format: ShowFormat = None, as_json: JsonOpt = False) -> None:
    """Show one run: status, counts, timing, errors grouped by fingerprint, approvals."""
    with _errors(as_json):
        shown = _show_format(output_format, as_json)
        plan_file = Path(run_id) if run_id.endswith(".plan") or Path(run_id).is_file() else None
        if plan_file is not None:
            conn = _plan_target(plan_file, target)
            _state["target"] = conn.target
            found = commands.describe(conn, plan_mod.read_header(plan_file).plan_id)
        else:
            conn = _connect(target)
            found = commands.describe(conn, run_id)
        if shown == "markdown":
            from fillgate.mdreport import run_markdown

            text = run_markdown(conn, found, plan_file)
    if shown == "markdown":
        sys.stdout.write(text)
        return
    _emit(shown == "json", lambda: report.show_json(found.run, found.error_groups, found.approvals, found.partitions),
          lambda: report.print_show(out, found.run, found.error_groups, found.approvals,
                                            found.partitions))


def _show_format(output_format: str | None, as_json: bool) -> str:
    if output_format is None:
        return "json" if as_json else "text"
    if output_format not in ("text", "json", "markdown"):
        raise UsageError(f"--format {output_format!r}: use text, json or markdown.")
    if as_json and output_format != "json":
        raise UsageError(f"--json and --format {output_format} ask for two formats; give one.")
    return output_format


@app.command()
def history(
    table: Annotated[str, typer.Argument()],
    key: Annotated[str, typer.Argument(help="The row's key: 42, or a,b for a composite key, or a JSON list.")],
    column: Annotated[str | None, typer.Option("--column", help="Only this column.")] = None,
    target: TargetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Which runs changed this row, when, and from what to what."""
    with _errors(as_json):
        entries = history_mod.row_history(_connect(target), table, key, column)
    _emit(as_json, lambda: report.history_json(entries), lambda: report.print_history(out, table, key, entries))


@app.command()
def verify(
    run_ids: Annotated[
        list[str] | None,
        typer.Argument(metavar="RUN", help="Runs to check (default: every apply and revert run)."),
    ] = None,
    target: TargetOpt = None,
    events: Annotated[
        list[Path] | None,
        typer.Option("--events", metavar="FILE",
                     help="Also check the audit hashes run_finished events recorded in FILE "
                          "(a file written by --events; repeatable)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check the audit log against its tamper evidence (exit 0: it matches; 4: it does not)."""
    with _errors():
        conn = _connect(target)
        anchors = integrity.read_anchors(events or [], conn.target.name)
        result = integrity.verify_ledger(conn.ledger, run_ids, anchors, conn.target.name)
    _emit(as_json, lambda: report.verify_json(result), lambda: report.print_verify(out, result))
    raise typer.Exit(EXIT_OK if result.ok else EXIT_TAMPERED)


@app.command()
def revert(
    run_id: Annotated[str, typer.Argument(metavar="RUN")],
    target: TargetOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be restored; write nothing.")] = False,
    confirm: ConfirmOpt = None,
    batch_size: BatchOpt = None,
    pause_between_batches: PauseOpt = 0,
    events: EventsOpt = None,
    rate: RateOpt = None,
    max_replication_lag: LagOpt = None,
    hold_while: HoldWhileOpt = None,
    max_hold: MaxHoldOpt = None,
    chunk_time: ChunkTimeOpt = None,
    no_chunk_time: NoChunkTimeOpt = False,
    batch_timeout: BatchTimeoutOpt = None,
    max_load: MaxLoadOpt = None,
    critical_load: CriticalLoadOpt = None,
    hold_during_vacuum: VacuumOpt = False,
    max_transaction_age: TxnAgeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Undo a run from its audit log, as a new audited run; rows changed since are left alone."""
    with _errors(as_json):
        conn = _connect(target)
        if dry_run:
            preview = revert_mod.preview_revert(conn, run_id)
        else:
            limits = _limits(conn, rate, max_replication_lag, hold_while, max_hold,
                             table=conn.ledger.get_run(run_id).table_name,
                             health=_health(max_load, critical_load, hold_during_vacuum, max_transaction_age),
                             confirm=confirm, pause_ms=pause_between_batches,
                             **_pacing(batch_size, chunk_time, no_chunk_time, batch_timeout))
            with _monitor(events, as_json) as monitor:
                results = commands.revert(conn, run_id, limits, monitor)
    if dry_run:
        _emit(as_json, lambda: report.preview_json(preview), lambda: report.print_preview(out, preview))
        return
    if len(results) == 1:
        _finish_apply(results[0], as_json, _human(events))
    # a pipeline: one revert per stage, last stage first
    def print_all() -> None:
        for r in results:
            report.print_apply(_human(events), r)

    _emit(as_json, lambda: {"run_id": run_id, "reverts": [report.apply_json(r) for r in results]}, print_all)
    raise typer.Exit(EXIT_OK if all(r.clean for r in results) else EXIT_ROW_PROBLEMS)


def _control(run_id: str, target: str | None, action: str, as_json: bool) -> None:
    with _errors(as_json):
        conn: Connected = _connect(target)
        found = commands.control(conn, run_id, action)
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
    batch_size: BatchOpt = None,
    max_errors: MaxErrorsOpt = None,
    max_error_rate: MaxRateOpt = None,
    pause_between_batches: PauseOpt = 0,
    events: EventsOpt = None,
    rate: RateOpt = None,
    max_replication_lag: LagOpt = None,
    hold_while: HoldWhileOpt = None,
    max_hold: MaxHoldOpt = None,
    chunk_time: ChunkTimeOpt = None,
    no_chunk_time: NoChunkTimeOpt = False,
    batch_timeout: BatchTimeoutOpt = None,
    max_load: MaxLoadOpt = None,
    critical_load: CriticalLoadOpt = None,
    hold_during_vacuum: VacuumOpt = False,
    max_transaction_age: TxnAgeOpt = None,
    workers: WorkersOpt = None,
    scheduler: SchedulerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Continue a paused, failed or interrupted run from its checkpoint (exactly once).

    A distributed run re-dispatches its unfinished partitions, on --workers N or the
    --scheduler's cluster (default: the cluster it was started with)."""
    with _errors(as_json):
        cluster = distributed.Cluster.from_options(workers, scheduler)
        conn = _connect(target)
        limits = _limits(conn, rate, max_replication_lag, hold_while, max_hold,
                         table=conn.ledger.get_run(run_id).table_name,
                         health=_health(max_load, critical_load, hold_during_vacuum, max_transaction_age),
                         confirm=confirm, max_errors=max_errors,
                         max_error_rate=max_error_rate, pause_ms=pause_between_batches,
                         **_pacing(batch_size, chunk_time, no_chunk_time, batch_timeout))
        with _monitor(events, as_json) as monitor:
            result = commands.resume(conn, run_id, limits, monitor, cluster)
    _finish_apply(result, as_json, _human(events))


@app.command()
def demo(
    path: Annotated[
        Path | None, typer.Option("--path", help="SQLite file to create (default: a new temporary file); an "
                                  "existing one only if an earlier demo made it.")
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

    with _errors(as_json):
        names, protected = configured_names(_state["config"])
        files = python_files(paths)
        findings = lint_paths(files, names, protected)
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
