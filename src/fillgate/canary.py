"""Canary applies: write a few changes spread across the plan first, pause, verify.

``fillgate apply PLAN --canary N`` applies N of the plan's T changes first: the changes at
positions ``k * T // N`` (k = 0 .. N-1) of the plan's order, which is the order of the key,
so the canary is evenly strided across the key space from its first change on (never just the
first N keys). The run then pauses (in the transaction of its last canary batch, so a crash
cannot skip the pause) and runs its verification:

* the job's ``verify(ctx, changed_keys)`` method, if it has one: ``changed_keys`` are the keys
  of the rows the canary changed (from the audit log); it returns None or True when all is
  well, False or a text saying what is wrong otherwise (an exception fails it too);
* ``--verify-sql SQL``: a query on the target that must return no rows (each row it returns
  is a problem; the first five are shown).

The run's order is the canary's changes, then the others in plan order, and its checkpoint
counts along that order, so ``fillgate resume`` continues with the rest exactly once, like
any apply (a run whose process died before it verified its canary is verified by the resume
first). A failed verification leaves the run paused (exit 4); ``fillgate cancel RUN`` then
``fillgate revert RUN`` undoes the canary, ``fillgate resume RUN`` goes on regardless.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import chain, islice
from pathlib import Path
from typing import Any

from sqlalchemy import text

from fillgate.context import RunContext, activate
from fillgate.errors import CanaryVerificationError, FillgateError, UsageError
from fillgate.job import Job
from fillgate.ledger import Run
from fillgate.loader import load_job
from fillgate.plan import iter_changes, read_header
from fillgate.sql import Change
from fillgate.stamp import Connected
from fillgate.values import decode_key, dumps

SHOWN_PROBLEMS = 5


def canary_positions(total: int, n: int) -> list[int]:
    """The positions (0-based, in plan order) of the canary's ``n`` changes among ``total``."""
    return [k * total // n for k in range(n)]


def check_canary(n: int, total: int) -> None:
    if n < 1 or n >= total:
        raise UsageError(f"--canary {n}: a canary is at least 1 and fewer than the plan's {total} changes.")


def canary_order(path: str | Path, n: int, total: int, skip: int = 0) -> Iterator[Change]:
    """The plan's changes in a canary run's order (the canary's, then the rest in plan order),
    after the first ``skip`` of them (a checkpoint)."""
    picked = set(canary_positions(total, n))
    first = (c for i, c in enumerate(iter_changes(path)) if i in picked)
    rest = (c for i, c in enumerate(iter_changes(path)) if i not in picked)
    return islice(chain(first, rest), skip, None)


def run_changes(run: Run, skip: int) -> Iterator[Change]:
    """An apply run's changes after ``skip``, in the order the run writes them."""
    canary = run.args.get("canary")
    if canary:
        return canary_order(run.plan_path or "", int(canary["changes"]), int(run.total or 0), skip)
    return iter_changes(run.plan_path or "", skip=skip)


def changed_keys(conn: Connected, run_id: str) -> list[tuple[Any, ...]]:
    """The keys of the rows a run changed, in the order it changed them (each once)."""
    seen: dict[str, None] = {}
    for row in conn.ledger.iter_changes(run_id):
        seen.setdefault(row.row_key, None)
    return [decode_key(k) for k in seen]


def _job_problems(conn: Connected, run: Run, keys: Sequence[tuple[Any, ...]]) -> list[str]:
    """What the job's ``verify`` found wrong (it has none: nothing)."""
    header = read_header(run.plan_path or "")
    job_cls = load_job(header.job_spec) if header.job_spec else None
    if job_cls is None or job_cls.verify is Job.verify:
        return []
    job: Job = job_cls(header.params)
    ctx = RunContext(run_id=run.run_id, target=conn.target, job=header.job, params=job.args, engine=conn.engine)
    try:
        with activate(ctx):
            verdict = job.verify(ctx, list(keys))
    except FillgateError:
        raise
    except Exception as exc:
        return [f"{header.job}.verify raised {type(exc).__name__}: {exc}"]
    finally:
        ctx.close()
    if verdict is None or verdict is True:
        return []
    return [f"{header.job}.verify: {'returned False' if verdict is False else verdict}"]


def _sql_problems(conn: Connected, sql: str) -> list[str]:
    with conn.engine.connect() as reader:
        result = reader.execute(text(sql))
        columns = list(result.keys())
        rows = result.fetchmany(SHOWN_PROBLEMS + 1)
        reader.rollback()
    if not rows:
        return []
    shown = ["{" + ", ".join(f"{c}: {dumps(v)}" for c, v in zip(columns, row, strict=True)) + "}"
             for row in rows[:SHOWN_PROBLEMS]]
    more = " and more" if len(rows) > SHOWN_PROBLEMS else ""
    return [f"--verify-sql returned rows (it must return none): {'; '.join(shown)}{more}"]


def verify_canary(conn: Connected, run: Run) -> dict[str, Any]:
    """Run the canary's verification (the job's ``verify``, ``--verify-sql``) and record its
    outcome with the run (``verified``, ``problems``, ``message``). The run stays paused."""
    canary = dict(run.args["canary"])
    keys = changed_keys(conn, run.run_id)
    problems = _job_problems(conn, run, keys)
    if canary.get("verify_sql"):
        problems += _sql_problems(conn, canary["verify_sql"])
    canary.update(changed_keys=len(keys), verified=not problems, problems=problems)
    where = f" --target {conn.target.name}"
    confirm = f" --confirm {conn.target.environment}" if conn.target.protected else ""
    undo = f"fillgate cancel {run.run_id}{where} && fillgate revert {run.run_id}{where}{confirm}"
    go_on = f"fillgate resume {run.run_id}{where}{confirm}"
    done = f"canary of {run.checkpoint} of {run.total} changes applied ({len(keys)} rows)"
    message = (f"{done}; verification failed: {' | '.join(problems)}. The run is paused. Undo the canary: {undo}; "
               f"or continue anyway: {go_on}") if problems else (
        f"{done} and verified; the run is paused. Continue with: {go_on}")
    conn.ledger.update_run(run.run_id, args={**run.args, "canary": canary}, message=message)
    return {**canary, "message": message}


def check_verified(run_id: str, canary: dict[str, Any]) -> None:
    """Raise CanaryVerificationError (exit 4) for a canary whose verification failed."""
    if not canary["verified"]:
        raise CanaryVerificationError(f"run {run_id}: {canary['message']}", run_id)
