"""The dashboard's only door into fillgate's library.

Every page and action of the web dashboard goes through this module, and this module calls
only public library functions: where a CLI command exists, the same call the CLI makes
(``commands.describe`` for a run's page, ``history.row_history`` for a row's history,
``revert.preview_revert`` and ``commands.revert``, ``control.control_run`` and ``resume_run``),
otherwise ``Ledger`` methods, config, stamp and plan. When the library is restructured, this is
the one file to re-point.

Actions have the CLI's guards (stamp, protected environment and its typed confirmation), as
they are the same calls. Resume and revert run in a thread of the server (see :class:`Runner`);
each action is recorded in the ledger with the operator who asked.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import shlex
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from fillgate import commands
from fillgate.config import Config, Target, load_config
from fillgate.control import control_run, resume_run
from fillgate.errors import (
    ConfigError,
    FillgateError,
    NotInitializedError,
    RunNotFoundError,
    StampMismatchError,
    UsageError,
)
from fillgate.history import MAX_TEXT_KEY_PARTS, row_history
from fillgate.interrupts import clear as clear_stop
from fillgate.interrupts import request_stop
from fillgate.ledger import Ledger, Run, acting_as, operator_name
from fillgate.limits import Limits
from fillgate.monitor import Monitor
from fillgate.pipeline_run import stage_applies
from fillgate.plan import verify_plan
from fillgate.redact import mask_secrets, redact_url
from fillgate.revert import RevertPreview, preview_revert
from fillgate.runs import RunKind, RunStatus, interrupted
from fillgate.stamp import Connected, connect
from fillgate.throttle import Throttle
from fillgate.values import format_key, format_value, key_candidates, loads, split_key
from fillgate.web.planindex import KINDS, PAGE, PlanStatus, PlanStore

log = logging.getLogger("fillgate.web")

RUN_KINDS = tuple(RunKind)
RUN_STATUSES = tuple(RunStatus)
ACTIVE = (RunStatus.RUNNING, RunStatus.PAUSED)
RUNS_PER_PAGE = 50
TIMELINE = 200  # batches shown on a run page (the newest)
RECENT = 20  # batches the rate and ETA are measured over
HISTORY_LIMIT = 1000
KIND_LABELS = {"change": "write", "insert": "insert", "disagreement": "disagreement", "preserved": "preserved",
               "error": "row error", "unexpected_index": "unexpected lookup index"}


class WebError(FillgateError):
    """What a page could not show, said to the person reading it (never a traceback)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def describe_error(exc: BaseException) -> str:
    """A one-paragraph message for a library or database error, its passwords masked."""
    if isinstance(exc, FillgateError):
        return mask_secrets(str(exc))
    if isinstance(exc, SQLAlchemyError):
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        return mask_secrets(f"database error: {reason}")
    return f"unexpected {type(exc).__name__}; see the server's log."


# --- values ---------------------------------------------------------------------------------


def display(value: Any) -> str | None:
    """A stored value as text, whole and exactly as the CLI shows it (``report.format_value``:
    1.50, 2013-01-01 05:17:00, \\x00ff, '42' for a string that reads as a number); None stays
    None (the page shows NULL)."""
    return None if value is None else format_value(value)


def display_json(text: str) -> str | None:
    """A value from the audit log (its JSON text) as text."""
    return display(loads(text))


def key_text(key: Sequence[Any] | None) -> str:
    """A row key as the CLI shows it: ``42``, or ``a, b`` for a composite key."""
    return "" if key is None else format_key(key)


def key_query(key: Sequence[Any] | None) -> str:
    """A key as the history form takes it back (a JSON list: exact for every type)."""
    return json.dumps(list(key or []), default=str, ensure_ascii=False)


# --- targets --------------------------------------------------------------------------------


@dataclass
class TargetView:
    name: str
    environment: str
    protected: bool
    url: str  # password masked
    state: str  # ok, refused, unreachable, uninitialised, unavailable (its url cannot be resolved), error
    message: str | None = None
    stamp: dict[str, str] = field(default_factory=dict)
    revision: str | None = None
    head: str | None = None
    active: list[Run] = field(default_factory=list)
    locks: list[dict[str, Any]] = field(default_factory=list)


class Dashboard:
    """The targets one server shows, and every query and action on them."""

    def __init__(self, config_path: str | Path | None, target_names: Sequence[str] | None,
                 cache_dir: Path) -> None:
        self.config_path = config_path
        self.config: Config = load_config(config_path)
        names = list(target_names or self.config.targets)
        for name in names:
            if name not in self.config.targets:  # an unknown name fails now, naming the declared ones
                self.config.target(name)
        # A declared target whose url cannot be resolved (an unset ${VAR}, a missing driver) is
        # served as "unavailable", saying why: it never stops the server or the other targets.
        self.names = names
        self.plans = PlanStore(cache_dir, _verify)
        self.runner = Runner()

    # --- targets ----------------------------------------------------------------------------

    def target(self, name: str) -> Target:
        if name not in self.names:
            raise WebError(f"this dashboard serves no target '{name}' (it serves: {', '.join(self.names)}).", 404)
        return self.config.target(name)

    def connect(self, name: str) -> Connected:
        """The target, reached and its stamp checked (else a WebError saying why)."""
        try:
            target = self.target(name)
        except ConfigError as exc:  # its url cannot be resolved: the target is unavailable
            raise WebError(f"target '{name}' is unavailable: {describe_error(exc)}", 503) from None
        try:
            return connect(target)
        except StampMismatchError as exc:
            raise WebError(f"refused: {describe_error(exc)}", 409) from None
        except (FillgateError, SQLAlchemyError) as exc:
            raise WebError(describe_error(exc), 503) from None

    def targets(self) -> list[TargetView]:
        return [self.target_view(name) for name in self.names]

    def target_view(self, name: str) -> TargetView:
        try:
            target = self.target(name)
        except ConfigError as exc:  # its url uses an unset ${VAR}, or its driver is not installed
            spec = self.config.targets[name]
            return TargetView(name, spec.environment, spec.protected, redact_url(spec.raw_url), "unavailable",
                              describe_error(exc))
        view = TargetView(name, target.environment, target.protected, target.safe_url, "ok")
        try:
            conn = connect(target)
        except StampMismatchError as exc:
            view.state, view.message = "refused", describe_error(exc)
            view.stamp = _stamp_of(target)
            return view
        except NotInitializedError as exc:
            view.state, view.message = "uninitialised", describe_error(exc)
            return view
        except (FillgateError, SQLAlchemyError) as exc:
            view.state, view.message = "unreachable", describe_error(exc)
            return view
        try:
            ledger = conn.ledger
            view.stamp = dict(conn.meta)
            view.revision, view.head = ledger.current_revision(), ledger.head_revision()
            if view.revision != view.head:
                view.message = (f"the ledger is at revision {view.revision}; this fillgate expects {view.head}. "
                                f"Upgrade it with: fillgate init --target {name}")
            view.active = [r for status in ACTIVE for r in ledger.list_runs(limit=100, status=status)]
            view.locks = ledger.active_locks()
        except (FillgateError, SQLAlchemyError) as exc:
            view.state, view.message = "error", describe_error(exc)
        return view

    # --- runs -------------------------------------------------------------------------------

    def runs_page(self, name: str, page: int, kind: str | None, status: str | None,
                  job: str | None) -> tuple[list[Run], int, list[str]]:
        ledger = self.connect(name).ledger
        runs, total = ledger.page_runs((max(page, 1) - 1) * RUNS_PER_PAGE, RUNS_PER_PAGE, kind, status, job)
        return runs, total, ledger.job_names()

    def run(self, name: str, run_id: str) -> Run:
        return self.connect(name).ledger.get_run(run_id)

    def run_page(self, name: str, run_id: str) -> dict[str, Any]:
        """A run as ``fillgate show`` describes it (``commands.describe``: its errors grouped,
        a pipeline's with its stages', an apply with its plan's details), with its batch
        timeline, the actions taken on it and the runs related to it."""
        conn = self.connect(name)
        ledger = conn.ledger
        described = commands.describe(conn, run_id)
        run = described.run
        timeline = ledger.batches(run_id, TIMELINE)
        return {
            "run": run, "interrupted": interrupted(run), "details": run.details, "errors": described.error_groups,
            "batches": timeline, "batch_summary": ledger.batch_summary(run_id), "actions": ledger.actions(run_id),
            "children": ledger.children_of(run_id), "reverts": ledger.reverts_of(run_id),
            "applies": ledger.runs_of_plan(run_id) if run.kind == RunKind.PLAN else [],
            "target": conn.target, "progress": progress(run, timeline[-RECENT:], _estimated_rate(run.details)),
            "approvals": described.approvals,
        }

    def progress(self, name: str, run_id: str) -> dict[str, Any]:
        ledger = self.connect(name).ledger
        run = ledger.get_run(run_id)
        recent = ledger.batches(run_id, RECENT)
        planned = None
        if not recent and run.kind == RunKind.APPLY and run.plan_id:  # no batch yet: the plan's trial rate
            with contextlib.suppress(FillgateError):
                planned = _estimated_rate(ledger.get_run(run.plan_id).details)
        return {"run": run, "interrupted": interrupted(run), "progress": progress(run, recent, planned)}

    def chart(self, name: str, run_id: str) -> dict[str, Any]:
        """Throughput per batch (for the chart): seconds since the first batch, and rows/s."""
        ledger = self.connect(name).ledger
        run = ledger.get_run(run_id)
        batches = ledger.batches(run_id, 500)
        start = batches[0]["committed_at"] if batches else None
        xs: list[float] = []
        ys: list[float | None] = []
        for b in batches:
            xs.append((b["committed_at"] - start).total_seconds() if start else 0)
            ys.append(round(b["rows"] * 1000 / b["elapsed_ms"], 1) if b["elapsed_ms"] else None)
        return {"x": xs, "rate": ys, "live": run.status == RunStatus.RUNNING and not interrupted(run)}

    # --- history ----------------------------------------------------------------------------

    def history(self, name: str, table: str, key: str, column: str | None) -> tuple[list[dict[str, Any]], int]:
        """``fillgate history`` (``row_history``): the same answer, and the same usage errors
        for a table, column or key that does not make sense. Returns the first
        ``HISTORY_LIMIT`` changes, oldest first, and how many there are."""
        entries = row_history(self.connect(name), table, key, column or None)
        shown = entries[:HISTORY_LIMIT]
        for entry in shown:
            entry["old"] = display_json(entry["old_value"])
            entry["new"] = display_json(entry["new_value"])
        return shown, len(entries)

    # --- actions ----------------------------------------------------------------------------

    def control(self, name: str, run_id: str, action: str, operator: str) -> Run:
        """Pause or cancel (``control_run``, as ``fillgate pause``/``cancel``); recorded.
        Returns the run as it is now (``control`` set: the request awaits its next batch)."""
        conn = self.connect(name)
        try:
            with acting_as(operator):
                run = control_run(conn, run_id, action)
        except FillgateError as exc:
            raise _refused(conn, run_id, action, operator, exc) from None
        outcome = (f"asked the run to {action} after its current batch" if run.control
                   else f"run is now {run.status}")
        conn.ledger.record_action(run_id, action, operator, outcome)
        return run

    def resume(self, name: str, run_id: str, operator: str, confirm: str | None) -> str:
        """``resume_run`` (as ``fillgate resume``) in a thread of the server; recorded."""
        conn = self.connect(name)
        limits = Limits(confirm=confirm or None)
        return self._start(conn, run_id, "resume", operator,
                           lambda monitor: resume_run(conn, run_id, limits, monitor))

    def revert_previews(self, name: str, run_id: str) -> list[RevertPreview]:
        """What ``revert`` would restore (``preview_revert``, as ``fillgate revert --dry-run``):
        one preview, or for a pipeline run one per stage it applied, last stage first (the
        order ``commands.revert`` reverts them in)."""
        conn = self.connect(name)
        if conn.ledger.get_run(run_id).kind != RunKind.PIPELINE:
            return [preview_revert(conn, run_id)]
        return [preview_revert(conn, applied.run_id) for applied in reversed(stage_applies(conn, run_id))]

    def revert(self, name: str, run_id: str, operator: str, confirm: str | None) -> str:
        """``commands.revert`` (as ``fillgate revert``) in a thread of the server; recorded:
        one revert run, or for a pipeline run one per stage it applied, last stage first.
        Returns the first revert run's id once it has started (the others follow it)."""
        conn = self.connect(name)
        limits = Limits(confirm=confirm or None)
        return self._start(conn, run_id, "revert", operator,
                           lambda monitor: commands.revert(conn, run_id, limits, monitor))

    def _start(self, conn: Connected, run_id: str, action: str, operator: str,
               work: Callable[[Monitor], object]) -> str:
        """``work`` in a thread of the server, the action recorded on ``run_id``: refused, or
        started (recorded by the run's own thread before its first batch: on SQLite, a write
        from this thread while the run writes could make the run's batch fail with "database is
        locked"), and, if it stops with an error later, stopped."""

        def record(outcome: str) -> None:
            try:
                conn.ledger.record_action(run_id, action, operator, outcome)
            except (FillgateError, SQLAlchemyError) as exc:  # never stops the run
                log.warning("could not record %s of run %s (%s): %s", action, run_id, outcome, describe_error(exc))

        def started(first: str) -> None:
            record(f"started in the dashboard's server as run {first}" if first != run_id
                   else "continued in the dashboard's server")

        try:
            return self.runner.start(conn, work, operator, started,
                                     lambda exc: record(f"stopped: {describe_error(exc)}"))
        except FillgateError as exc:
            raise _refused(conn, run_id, action, operator, exc) from None

    # --- plans ------------------------------------------------------------------------------

    def plan_of_run(self, name: str, run_id: str) -> tuple[Run, PlanStatus]:
        """The plan file a planned run saved, checked against the checksum the run recorded."""
        run = self.run(name, run_id)
        if run.kind != RunKind.PLAN:
            raise WebError(f"run {run_id} is a {run.kind} run, not a plan.")
        if not run.plan_path:
            raise WebError(f"plan run {run_id} was not saved to a file (it was made without -o), so there are "
                           "no changes to review; make the plan again with: fillgate plan JOB -o FILE", 404)
        if run.args.get("distributed"):
            raise WebError(f"plan run {run_id} is a distributed plan (a plan directory, {run.plan_path}); this page "
                           f"reviews one plan file at a time: see its partitions with fillgate show {run_id}, and "
                           "open a partition's plan file here by its path.", 404)
        status = self.plans.status(Path(run.plan_path))
        if status.reviewable and status.sha256 != run.plan_sha256:
            status = PlanStatus("refused", status.path,
                                f"plan file {status.path} differs from the plan run {run_id} recorded (its SHA-256 "
                                "changed): it was modified after planning. Make the plan again.")
        return run, status

    def plan_file(self, path: str) -> PlanStatus:
        if not path.strip():
            raise WebError("give the path of a plan file (made by fillgate plan -o FILE).")
        if "\x00" in path:
            raise WebError("a file path cannot hold a NUL character; give the path of a plan file.")
        return self.plans.status(Path(path).expanduser())

    def plan_page(self, status: PlanStatus, page: int, kind: str | None, column: str | None,
                  key: str | None) -> dict[str, Any]:
        index = status.index
        if index is None:
            raise WebError(f"plan file {status.path} is not verified yet; reload the page in a moment.", 409)
        if kind and kind not in KINDS:
            raise WebError(f"unknown line kind {kind!r}; use one of: {', '.join(KINDS)}.")
        columns = sorted(status.header.get("columns") or {})
        if column and column not in columns:
            raise WebError(f"the plan has no column {column!r}; its columns are: {', '.join(columns)}.")
        if key:
            raw_lines = index.find_key(_plan_key_candidates(key), kind, column)
            total = len(raw_lines)
        else:
            total = index.count(kind, column)
            raw_lines = index.page(page, kind, column)
        lines = [plan_line(number, raw) for number, raw in raw_lines]
        return {"lines": lines, "total": total, "page": page, "pages": max((total + PAGE - 1) // PAGE, 1),
                "columns": columns, "kind_counts": index.counts(), "done": index.state()[0],
                "indexed": index.state()[1]}

    def apply_command(self, status: PlanStatus) -> str:
        header = status.header
        parts = ["fillgate"]
        if self.config_path:
            parts += ["--config", _quote(str(self.config_path))]
        parts += ["apply", _quote(str(status.path)), "--max-changes", str(header.get("changes", 0))]
        target = self.config.targets.get(header.get("target", ""))
        if target is not None and target.protected:
            parts += ["--confirm", _quote(target.environment)]
        return " ".join(parts)

    def plan_runs(self, header: dict[str, Any]) -> list[Run]:
        """The apply runs of a plan (on its target, when this dashboard serves it)."""
        name = header.get("target")
        if name not in self.names:
            return []
        try:
            return self.connect(name).ledger.runs_of_plan(header["plan_id"])
        except (FillgateError, SQLAlchemyError):
            return []

    def plan_approvals(self, header: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
        """The approvals of a plan, and how many its target needs (when this dashboard serves it)."""
        name = header.get("target")
        if name not in self.names:
            return [], 0
        try:
            conn = self.connect(name)
            return conn.ledger.approvals(header["plan_id"]), conn.target.approvals
        except (FillgateError, SQLAlchemyError):
            return [], 0

    def approve(self, name: str, run_id: str, via: str, comment: str | None) -> commands.Approval:
        """Approve the plan file a plan run saved (as ``fillgate approve``), as the operator
        this dashboard's server runs as (one dashboard is one operator: its sessions are not
        people), recording ``via`` (the session and client that asked)."""
        conn = self.connect(name)
        run = conn.ledger.get_run(run_id)
        if run.kind != RunKind.PLAN or not run.plan_path:
            raise WebError(f"run {run_id} is not a plan saved to a file; only plan files can be approved.")
        return commands.approve(conn, run.plan_path, comment, via=via)

    # --- metrics ----------------------------------------------------------------------------

    def metrics(self) -> list[dict[str, Any]]:
        """Per target: whether it is up, run totals per (job, kind, status), holds per job."""
        out = []
        for name in self.names:
            entry: dict[str, Any] = {"target": name, "up": False, "totals": [], "holds": []}
            try:
                ledger = connect(self.config.target(name)).ledger
                entry["totals"] = ledger.run_totals()
                entry["holds"] = ledger.hold_totals()
                entry["up"] = True
            except (FillgateError, SQLAlchemyError):
                pass
            out.append(entry)
        return out


def _refused(conn: Connected, run_id: str, action: str, operator: str, exc: FillgateError) -> FillgateError:
    """A refused action, recorded among the run's actions (who asked for what): the message says
    so. A run that does not exist gets no record (the ledger keeps actions of its runs only)."""
    if isinstance(exc, RunNotFoundError):
        return exc
    conn.ledger.record_action(run_id, action, operator, f"refused: {exc}")
    refused = copy.copy(exc)
    refused.args = (f"{exc} (This refused request is recorded among the run's actions; nothing else was "
                    "written.)",)
    return refused


def _quote(text: str) -> str:
    return shlex.quote(text)


def _plan_key_candidates(key: str) -> list[str]:
    """The encodings a key typed on the plan page may have (each numeric part doubles them,
    so a long key must come as a JSON list, as for ``fillgate history``)."""
    if not key.strip().startswith("[") and len(split_key(key)) > MAX_TEXT_KEY_PARTS:
        raise UsageError(f"key {key!r} has {len(split_key(key))} parts; give a key of more than "
                         f"{MAX_TEXT_KEY_PARTS} parts as a JSON list.")
    return key_candidates(key)


def _verify(path: Path) -> tuple[dict[str, Any], str]:
    header, sha = verify_plan(path)
    return dataclasses.asdict(header), sha


def _stamp_of(target: Target) -> dict[str, str]:
    """The stamp of a target whose stamp disagrees with its declaration (read without the check)."""
    from fillgate.database import check_reachable

    try:
        return Ledger(check_reachable(target)).read_meta()
    except (FillgateError, SQLAlchemyError):
        return {}


def _estimated_rate(details: Mapping[str, Any] | None) -> float | None:
    """The changes per second a plan's trial batch measured (``details`` of the plan run)."""
    rate = ((details or {}).get("estimate") or {}).get("rate")
    return float(rate) if isinstance(rate, int | float) and rate > 0 else None


def progress(run: Run, recent: list[dict[str, Any]], planned_rate: float | None = None) -> dict[str, Any]:
    """Done, total, percentage, rate (per second over the recent batches; before the first
    batch of an apply, ``planned_rate``, measured by its plan's trial batch) and ETA."""
    plan = run.kind == RunKind.PLAN
    done = run.counts.get("rows", 0) if plan else run.checkpoint
    total = None if plan else run.total
    rate = None
    if len(recent) >= 2:
        span = (recent[-1]["committed_at"] - recent[0]["committed_at"]).total_seconds()
        moved = recent[-1]["done"] - recent[0]["done"]
        if span > 0:
            rate = moved / span
    elif len(recent) == 1 and recent[0]["elapsed_ms"]:
        rate = recent[0]["rows"] * 1000 / recent[0]["elapsed_ms"]
    elif not recent and not plan:
        rate = planned_rate
    eta = None
    if rate and total is not None and total > done:
        eta = (total - done) / rate
    held = recent[-1]["hold_reason"] if recent and recent[-1]["held_ms"] else None
    if run.status == RunStatus.RUNNING and run.message and run.message.startswith("held: "):
        held = run.message.removeprefix("held: ")  # held now: the run says why since its last batch
    return {"done": done, "total": total, "percent": (100.0 * done / total) if total else None,
            "rate": rate, "eta": eta, "unit": "rows" if plan else "changes", "last_hold": held}


def web_operator(session: str, client: str | None) -> str:
    """Who a web action is recorded as: the server's operator (``FILLGATE_OPERATOR`` or
    user@host), the browser's address and the first characters of its session."""
    return f"{operator_name()} via web ({client or 'unknown client'}, session {session[:8]})"[:255]


# --- background runs --------------------------------------------------------------------------


class _Watch(Monitor):
    """A monitor that says when each run starts (and as which run id)."""

    def __init__(self, started: Callable[[str], None]) -> None:
        super().__init__()
        self._on_started = started

    def run_started(
        self, run_id: str, kind: str, job: str, target: str, environment: str, total: int | None,
        *, throttle: Throttle | None = None, heartbeat: Callable[[], None] | None = None,
        rate: float | None = None,
    ) -> None:
        super().run_started(run_id, kind, job, target, environment, total, throttle=throttle, heartbeat=heartbeat,
                            rate=rate)
        self._on_started(run_id)


@dataclass
class _Work:
    """One thread of the :class:`Runner` and the runs it started, in order (the last is current)."""

    conn: Connected
    on_started: Callable[[str], None]
    on_stopped: Callable[[BaseException], None]
    started: threading.Event = field(default_factory=threading.Event)
    runs: list[str] = field(default_factory=list)
    error: BaseException | None = None
    thread: threading.Thread = field(init=False)


class Runner:
    """Resume and revert runs started from the dashboard, each in a thread of the server (a
    pipeline's revert: its stages' reverts one after the other, in one thread).

    ``start`` returns once the first run has started (its run id) or raised the library's
    refusal (stamp, protected environment, lock held, nothing to resume ...), so the page says
    which. When the server stops, ``stop_all`` asks every such run to pause after its current
    batch (a pipeline's next stage, after its first) and waits for it: ``fillgate resume RUN``
    continues it. A server killed outright leaves its runs as interrupted (their
    process is gone), resumable the same way."""

    def __init__(self) -> None:
        self._works: list[_Work] = []
        self._lock = threading.Lock()

    def start(self, conn: Connected, work: Callable[[Monitor], object], operator: str,
              on_started: Callable[[str], None], on_stopped: Callable[[BaseException], None]) -> str:
        """Run ``work`` in a thread of its own. In that thread, ``on_started`` hears of the
        first run it starts (before that run's first batch) and ``on_stopped`` of an error
        raised after that (the run itself records it)."""
        job = _Work(conn, on_started, on_stopped)
        job.thread = threading.Thread(target=self._body, args=(job, work, operator), name="fillgate-web-run",
                                      daemon=True)
        job.thread.start()
        job.started.wait()
        if not job.runs:
            job.thread.join()
            raise job.error or WebError("the run did not start.")
        return job.runs[0]

    def _body(self, job: _Work, work: Callable[[Monitor], object], operator: str) -> None:
        with acting_as(operator):
            try:
                with _Watch(lambda run_id: self._started(job, run_id)) as monitor:
                    work(monitor)
            except BaseException as exc:  # shown on the page, or on the run's page once started
                if not job.runs:
                    job.error = exc
                else:
                    log.warning("run %s, started from the dashboard, stopped: %s", job.runs[-1], describe_error(exc))
                    job.on_stopped(exc)
            finally:
                job.started.set()

    def _started(self, job: _Work, run_id: str) -> None:
        with self._lock:
            first = not job.runs
            if first:
                self._works.append(job)
            job.runs.append(run_id)
        if first:
            job.on_started(run_id)
            job.started.set()

    def _alive(self) -> list[_Work]:
        with self._lock:
            return [job for job in self._works if job.thread.is_alive()]

    def join(self) -> None:
        """Wait until every run started here has ended (tests)."""
        with self._lock:
            threads = [job.thread for job in self._works]
        for thread in threads:
            thread.join()

    def active(self) -> list[str]:
        """The runs being written by this server now."""
        return [job.runs[-1] for job in self._alive()]

    def stop_all(self, timeout: float | None = 60.0) -> None:
        """Ask every run started here to pause after its current batch, and wait for them.
        The request is ``request_stop`` (as a SIGTERM would be), not a write to the ledger
        from this thread: on SQLite that write could make a run's batch fail with "database
        is locked"."""
        alive = self._alive()
        if not alive:
            return
        request_stop("the dashboard's server is stopping")
        try:
            for job in alive:
                job.thread.join(timeout)
        finally:
            clear_stop()


def plan_line(number: int, raw: bytes) -> dict[str, Any]:
    """One plan line, ready to show: every value whole, as text (None: NULL)."""
    record = loads(raw.decode("utf-8"))
    kind = record["kind"]
    item: dict[str, Any] = {
        "line": number, "kind": kind, "label": KIND_LABELS.get(kind, kind), "key": key_text(record.get("key")),
        "key_query": key_query(record.get("key")), "column": record.get("column"),
    }
    if kind == "insert":
        item["values"] = [(c, display(v)) for c, v in (record.get("values") or {}).items()]
    if "old" in record:
        item["old"] = display(record["old"])
    if "new" in record:
        item["new"] = display(record["new"])
    for name in ("reason", "error_type", "message", "fingerprint"):
        if name in record:  # prose, shown as written (a message's passwords masked)
            item[name] = mask_secrets(record[name] if isinstance(record[name], str) else json.dumps(record[name]))
    return item
