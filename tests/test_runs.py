"""Runs: listing and showing them, pause / resume / cancel (live and dead processes), and
revert (of a revert, twice, dry run), on every backend."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fillgate import connect, init_target
from fillgate.config import Target, parse_url
from fillgate.errors import LockHeldError
from fillgate.ledger import ApplyLock

from conftest import TestDB, fillgate_subprocess, run_cli, second_database

SLOW = ("--batch-size", "5", "--pause-between-batches", "50")


def _wait_for(what: str, check: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _run(db: TestDB, run_id: str) -> dict[str, Any]:
    row = db.rows("SELECT status, checkpoint, total, control, counts, message FROM fillgate_runs "
                  "WHERE run_id = :r", {"r": run_id})[0]
    return dict(zip(("status", "checkpoint", "total", "control", "counts", "message"), row, strict=True))


def _apply_run(db: TestDB) -> tuple[str, int] | None:
    rows = db.rows("SELECT run_id, checkpoint FROM fillgate_runs WHERE kind = 'apply'")
    return rows[0] if rows else None


def _prepare(db: TestDB, cli: CliRunner, jobs_file: Path, n: int) -> tuple[Path, int]:
    """``n`` people without email; a FillEmail plan saved as p.plan."""
    db.create_people(n, with_email_every=n + 1)
    cfg = db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0
    planned = run_cli(cli, cfg, "plan", f"{jobs_file}:FillEmail", "-o", "p.plan", "--json")
    assert planned.exit_code == 0, planned.output
    return cfg, json.loads(planned.stdout)["changes"]


def _filled(db: TestDB) -> int:
    return db.scalar("SELECT count(*) FROM people WHERE email IS NOT NULL")


def _assert_applied_once(db: TestDB, run_id: str, n: int) -> None:
    assert db.rows("SELECT id, email FROM people ORDER BY id") == [
        (i, f"person{i}@example.com") for i in range(1, n + 1)
    ]
    assert db.scalar("SELECT count(*) FROM fillgate_changes WHERE run_id = :r", {"r": run_id}) == n
    assert db.scalar("SELECT count(DISTINCT row_key) FROM fillgate_changes WHERE run_id = :r", {"r": run_id}) == n


def _start_slow_apply(cfg: Path, tmp_path: Path) -> subprocess.Popen[str]:
    return fillgate_subprocess(["--config", str(cfg), "apply", "p.plan", *SLOW, "--json"], cwd=tmp_path)


# --- runs and show ----------------------------------------------------------------------


def test_runs_lists_plan_apply_revert(db: TestDB, cli: CliRunner, jobs_file: Path) -> None:
    cfg, changes = _prepare(db, cli, jobs_file, 10)
    assert changes == 10
    gated = run_cli(cli, cfg, "plan", f"{jobs_file}:FillEmail", "--max-errors", "0", "--json")
    assert gated.exit_code == 0  # no errors: the gate does not trip
    db.execute("UPDATE people SET name = 'boom' WHERE id = 10")
    tripped = run_cli(cli, cfg, "plan", f"{jobs_file}:FillEmail", "--max-errors", "0")
    assert tripped.exit_code == 3, tripped.output
    applied = run_cli(cli, cfg, "apply", "p.plan", "--json")
    assert applied.exit_code == 0, applied.output
    apply_id = json.loads(applied.stdout)["run_id"]
    reverted = run_cli(cli, cfg, "revert", apply_id, "--json")
    assert reverted.exit_code == 0, reverted.output
    revert_id = json.loads(reverted.stdout)["run_id"]

    listed = run_cli(cli, cfg, "runs", "--json")
    assert listed.exit_code == 0, listed.output
    runs = json.loads(listed.stdout)
    # newest first
    assert [(r["kind"], r["status"]) for r in runs] == [
        ("revert", "succeeded"), ("apply", "succeeded"), ("plan", "failed"), ("plan", "planned"),
        ("plan", "planned"), ("init", "succeeded"),
    ]
    by_id = {r["run_id"]: r for r in runs}
    assert by_id[apply_id]["counts"] == {"applied": 10, "conflicts": 0, "errors": 0}
    assert by_id[apply_id]["checkpoint"] == by_id[apply_id]["total"] == 10
    assert by_id[revert_id]["parent_run_id"] == apply_id
    assert by_id[apply_id]["plan_id"] == runs[4]["run_id"]
    assert all(r["operator"] for r in runs)

    only = run_cli(cli, cfg, "runs", "--kind", "plan", "--status", "failed", "--json")
    assert [r["status"] for r in json.loads(only.stdout)] == ["failed"]
    assert "--max-errors 0" in json.loads(only.stdout)[0]["message"]
    human = run_cli(cli, cfg, "runs")  # 80 columns: one block per run, run ids and statuses in full
    assert human.exit_code == 0
    blocks = human.stdout.split("── ")
    assert any(re.search(rf"^run +{apply_id}$", block, re.M) and re.search(r"^status +succeeded$", block, re.M)
               for block in blocks)
    assert any(re.search(rf"^run +{revert_id}$", block, re.M) and re.search(r"^kind +revert$", block, re.M)
               for block in blocks)


def test_show_run(db: TestDB, cli: CliRunner, jobs_file: Path) -> None:
    db.create_people(12)  # odd ids lack an email
    db.execute("UPDATE people SET name = 'boom' WHERE id IN (3, 5)")
    cfg = db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0
    planned = run_cli(cli, cfg, "plan", f"{jobs_file}:FillEmail", "-o", "p.plan", "--json")
    assert planned.exit_code == 1  # two row errors
    plan_id = json.loads(planned.stdout)["run_id"]

    shown = json.loads(run_cli(cli, cfg, "show", plan_id, "--json").stdout)
    assert shown["status"] == "planned"
    assert shown["kind"] == "plan"
    assert shown["counts"] == {"rows": 12, "writes": 4, "unchanged": 0, "skipped": 6, "disagreements": 0,
                               "preserved": 0, "errors": 2, "unexpected_index": 0, "inserts": 0}
    (group,) = shown["error_groups"]
    assert group["count"] == 2
    assert group["error_type"] == "RuntimeError"
    assert group["example_key"] == "[3]"
    assert group["example_message"] == "cannot compute email for boom"

    db.execute("UPDATE people SET email = 'x@y.z' WHERE id = 1")
    applied = run_cli(cli, cfg, "apply", "p.plan", "--json")
    assert applied.exit_code == 1
    apply_id = json.loads(applied.stdout)["run_id"]
    shown = json.loads(run_cli(cli, cfg, "show", apply_id, "--json").stdout)
    assert shown["status"] == "succeeded"
    assert shown["counts"] == {"applied": 3, "conflicts": 1, "errors": 0}
    assert (shown["checkpoint"], shown["total"]) == (4, 4)
    assert [(g["error_type"], g["count"], g["example_key"]) for g in shown["error_groups"]] == [
        ("Conflict", 1, "[1]")
    ]

    missing = run_cli(cli, cfg, "show", "01ARZ3NDEKTSV4RRFFQ69G5FAV")
    assert missing.exit_code == 2
    assert "no run" in missing.stderr


# --- pause, resume, cancel ----------------------------------------------------------------


def test_pause_then_resume(db: TestDB, cli: CliRunner, jobs_file: Path, tmp_path: Path) -> None:
    n = 200
    cfg, changes = _prepare(db, cli, jobs_file, n)
    proc = _start_slow_apply(cfg, tmp_path)
    try:
        run_id, _ = _wait_for("the apply to write a batch", lambda: (r := _apply_run(db)) and r[1] >= 10 and r)
        paused = run_cli(cli, cfg, "pause", run_id, "--json")
        assert paused.exit_code == 0, paused.output
        assert json.loads(paused.stdout)["control"] == "pause"
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert json.loads(stdout)["stopped"] == "paused"

    run = _run(db, run_id)
    assert run["status"] == "paused"
    assert run["control"] is None
    assert 10 <= run["checkpoint"] < changes
    assert run["checkpoint"] % 5 == 0
    # exactly the checkpointed changes are in the table and in the audit log
    assert _filled(db) == run["checkpoint"]
    assert db.scalar("SELECT count(*) FROM fillgate_changes WHERE run_id = :r", {"r": run_id}) == run["checkpoint"]
    listed = json.loads(run_cli(cli, cfg, "runs", "--status", "paused", "--json").stdout)
    assert [r["run_id"] for r in listed] == [run_id]

    # a paused plan is not applied a second time by a new apply
    again = run_cli(cli, cfg, "apply", "p.plan")
    assert again.exit_code == 3
    assert f"fillgate resume {run_id}" in again.stderr

    resumed = run_cli(cli, cfg, "resume", run_id, "--json")
    assert resumed.exit_code == 0, resumed.output
    result = json.loads(resumed.stdout)
    assert result["status"] == "succeeded"
    assert result["counts"]["applied"] == changes
    assert (result["checkpoint"], result["total"]) == (changes, changes)
    _assert_applied_once(db, run_id, n)

    refused = run_cli(cli, cfg, "resume", run_id)
    assert refused.exit_code == 2
    assert "already succeeded" in refused.stderr


def test_cancel_paused_run_then_resume_is_refused(
    db: TestDB, cli: CliRunner, jobs_file: Path, tmp_path: Path
) -> None:
    n = 200
    cfg, changes = _prepare(db, cli, jobs_file, n)
    proc = _start_slow_apply(cfg, tmp_path)
    try:
        run_id, _ = _wait_for("the apply to write a batch", lambda: (r := _apply_run(db)) and r[1] >= 5 and r)
        assert run_cli(cli, cfg, "pause", run_id).exit_code == 0
        proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert _run(db, run_id)["status"] == "paused"
    done = _filled(db)
    assert 5 <= done < changes

    cancelled = run_cli(cli, cfg, "cancel", run_id, "--json")
    assert cancelled.exit_code == 0, cancelled.output
    assert json.loads(cancelled.stdout)["status"] == "cancelled"
    assert _run(db, run_id)["status"] == "cancelled"

    refused = run_cli(cli, cfg, "resume", run_id)
    assert refused.exit_code == 2
    assert "cancelled" in refused.stderr
    assert _filled(db) == done
    assert _run(db, run_id)["status"] == "cancelled"

    again = run_cli(cli, cfg, "cancel", run_id)
    assert again.exit_code == 2
    assert "has status cancelled; only running, paused or failed runs can be cancelled" in again.stderr

    # what a cancelled run applied stays audited and can be reverted
    reverted = run_cli(cli, cfg, "revert", run_id, "--json")
    assert reverted.exit_code == 0, reverted.output
    assert json.loads(reverted.stdout)["counts"]["applied"] == done
    assert _filled(db) == 0


def test_cancel_live_run(db: TestDB, cli: CliRunner, jobs_file: Path, tmp_path: Path) -> None:
    n = 200
    cfg, changes = _prepare(db, cli, jobs_file, n)
    proc = _start_slow_apply(cfg, tmp_path)
    try:
        run_id, _ = _wait_for("the apply to write a batch", lambda: (r := _apply_run(db)) and r[1] >= 5 and r)
        assert run_cli(cli, cfg, "cancel", run_id).exit_code == 0
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert json.loads(stdout)["stopped"] == "cancelled"
    run = _run(db, run_id)
    assert run["status"] == "cancelled"
    assert 5 <= run["checkpoint"] < changes
    assert _filled(db) == run["checkpoint"]
    assert run_cli(cli, cfg, "resume", run_id).exit_code == 2


def _kill_mid_run(db: TestDB, proc: subprocess.Popen[str], run_id: str | None, past: int) -> str:
    """SIGKILL ``proc`` once its run has checkpointed more than ``past`` changes."""
    try:
        def progressed() -> Any:
            r = _apply_run(db)
            return r if r and (run_id is None or r[0] == run_id) and r[1] > past else None

        found, _ = _wait_for("the run to make progress", progressed)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return found


def _control_dead(cli: CliRunner, cfg: Path, db: TestDB, run_id: str, action: str, status: str) -> None:
    """``action`` on a run whose process died sets ``status`` at once (the database may take a
    moment to notice the dead connection and release its lock; until then fillgate rightly
    treats the run as live)."""
    def settled() -> bool:
        result = run_cli(cli, cfg, action, run_id, "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["status"] == status

    _wait_for(f"{action} to take effect", settled, timeout=10)
    run = _run(db, run_id)
    assert run["status"] == status
    assert run["control"] is None
    assert "not running" in run["message"]


def test_pause_and_cancel_of_a_dead_process(db: TestDB, cli: CliRunner, jobs_file: Path, tmp_path: Path) -> None:
    n = 200
    cfg, changes = _prepare(db, cli, jobs_file, n)
    run_id = _kill_mid_run(db, _start_slow_apply(cfg, tmp_path), None, 5)
    assert _run(db, run_id)["status"] == "running"  # nobody told the ledger
    _control_dead(cli, cfg, db, run_id, "pause", "paused")
    checkpoint = _run(db, run_id)["checkpoint"]
    assert 5 < checkpoint < changes
    assert _filled(db) == checkpoint

    # resume it in another process, kill that too, then cancel
    resumer = fillgate_subprocess(["--config", str(cfg), "resume", run_id, *SLOW], cwd=tmp_path)
    _kill_mid_run(db, resumer, run_id, checkpoint)
    assert _run(db, run_id)["status"] == "running"
    _control_dead(cli, cfg, db, run_id, "cancel", "cancelled")
    run = _run(db, run_id)
    assert checkpoint < run["checkpoint"] < changes
    assert _filled(db) == run["checkpoint"]
    assert db.scalar("SELECT count(*) FROM fillgate_changes WHERE run_id = :r", {"r": run_id}) == run["checkpoint"]
    assert run_cli(cli, cfg, "resume", run_id).exit_code == 2


def test_pause_and_resume_a_revert(db: TestDB, cli: CliRunner, jobs_file: Path, tmp_path: Path) -> None:
    """A revert is resumable too: it continues from its checkpoint in the audit log's order."""
    n = 200
    cfg, _ = _prepare(db, cli, jobs_file, n)
    applied = run_cli(cli, cfg, "apply", "p.plan", "--json")
    assert applied.exit_code == 0, applied.output
    apply_id = json.loads(applied.stdout)["run_id"]
    proc = fillgate_subprocess(["--config", str(cfg), "revert", apply_id, *SLOW, "--json"], cwd=tmp_path)
    try:
        def reverting() -> Any:
            rows = db.rows("SELECT run_id, checkpoint FROM fillgate_runs WHERE kind = 'revert'")
            return rows[0][0] if rows and rows[0][1] >= 10 else None

        revert_id = _wait_for("the revert to write a batch", reverting)
        assert run_cli(cli, cfg, "pause", revert_id).exit_code == 0
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert json.loads(stdout)["stopped"] == "paused"
    run = _run(db, revert_id)
    assert run["status"] == "paused"
    assert 10 <= run["checkpoint"] < n
    assert _filled(db) == n - run["checkpoint"]

    # while the revert is paused, the apply cannot be reverted again
    again = run_cli(cli, cfg, "revert", apply_id)
    assert again.exit_code == 3
    assert f"fillgate resume {revert_id}" in again.stderr

    resumed = run_cli(cli, cfg, "resume", revert_id, "--json")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["counts"] == {"applied": n, "conflicts": 0, "errors": 0}
    assert _filled(db) == 0
    assert db.scalar("SELECT count(DISTINCT row_key) FROM fillgate_changes WHERE run_id = :r", {"r": revert_id}) == n
    assert db.scalar("SELECT count(*) FROM fillgate_changes WHERE run_id = :r", {"r": revert_id}) == n


# --- revert -----------------------------------------------------------------------------


def test_revert_of_a_revert_and_twice_refused(db: TestDB, cli: CliRunner, jobs_file: Path) -> None:
    n = 10
    cfg, _ = _prepare(db, cli, jobs_file, n)
    original = db.rows("SELECT id, email FROM people ORDER BY id")
    applied = run_cli(cli, cfg, "apply", "p.plan", "--json")
    assert applied.exit_code == 0, applied.output
    apply_id = json.loads(applied.stdout)["run_id"]
    after_apply = db.rows("SELECT id, email FROM people ORDER BY id")

    first = run_cli(cli, cfg, "revert", apply_id, "--json")
    assert first.exit_code == 0, first.output
    revert_id = json.loads(first.stdout)["run_id"]
    assert db.rows("SELECT id, email FROM people ORDER BY id") == original

    twice = run_cli(cli, cfg, "revert", apply_id)
    assert twice.exit_code == 3
    assert f"already reverted by run {revert_id}" in twice.stderr
    assert db.rows("SELECT id, email FROM people ORDER BY id") == original

    redo = run_cli(cli, cfg, "revert", revert_id, "--json")
    assert redo.exit_code == 0, redo.output
    redo_id = json.loads(redo.stdout)["run_id"]
    assert json.loads(redo.stdout)["kind"] == "revert"
    assert db.rows("SELECT id, email FROM people ORDER BY id") == after_apply
    audit = db.rows("SELECT row_key, old_value, new_value FROM fillgate_changes WHERE run_id = :r",
                    {"r": redo_id})
    assert sorted(audit) == sorted((f"[{i}]", "null", f'"person{i}@example.com"') for i in range(1, n + 1))

    refused = run_cli(cli, cfg, "revert", revert_id)
    assert refused.exit_code == 3
    assert f"already reverted by run {redo_id}" in refused.stderr
    assert db.scalar("SELECT count(*) FROM fillgate_changes") == 3 * n

    plan_id = db.scalar("SELECT plan_id FROM fillgate_runs WHERE run_id = :r", {"r": apply_id})
    not_writing = run_cli(cli, cfg, "revert", plan_id)
    assert not_writing.exit_code == 2
    assert "only apply and revert runs can be reverted" in not_writing.stderr


def test_revert_dry_run_writes_nothing_and_reports_conflicts(db: TestDB, cli: CliRunner, jobs_file: Path) -> None:
    n = 10
    cfg, _ = _prepare(db, cli, jobs_file, n)
    applied = run_cli(cli, cfg, "apply", "p.plan", "--json")
    assert applied.exit_code == 0, applied.output
    apply_id = json.loads(applied.stdout)["run_id"]
    db.execute("UPDATE people SET email = 'changed@x.org' WHERE id = 2")
    db.execute("DELETE FROM people WHERE id = 4")
    table = db.rows("SELECT id, email FROM people ORDER BY id")
    runs = db.scalar("SELECT count(*) FROM fillgate_runs")

    preview = run_cli(cli, cfg, "revert", apply_id, "--dry-run", "--json")
    assert preview.exit_code == 0, preview.output
    found = json.loads(preview.stdout)
    assert (found["total"], found["revertible"], found["conflicts"]) == (10, 8, 2)
    conflicts = {c["key"][0]: c for c in found["conflict_samples"]}
    assert conflicts[2]["found"] == "changed@x.org" and conflicts[2]["row_exists"] is True
    assert conflicts[4]["row_exists"] is False
    assert {s["key"][0] for s in found["samples"]} == {1, 3, 5, 6, 7, 8, 9, 10}
    human = run_cli(cli, cfg, "revert", apply_id, "--dry-run")
    assert "8 of 10 fields would be restored, 2 changed since" in " ".join(human.stdout.split())
    # nothing written: table, runs and audit log as they were
    assert db.rows("SELECT id, email FROM people ORDER BY id") == table
    assert db.scalar("SELECT count(*) FROM fillgate_runs") == runs
    assert db.scalar("SELECT count(*) FROM fillgate_changes") == 10

    reverted = run_cli(cli, cfg, "revert", apply_id, "--json")
    assert reverted.exit_code == 1  # conflicts
    result = json.loads(reverted.stdout)
    assert result["counts"] == {"applied": 8, "conflicts": 2, "errors": 0}
    rows = dict(db.rows("SELECT id, email FROM people"))
    assert rows[2] == "changed@x.org"
    assert 4 not in rows
    assert all(rows[i] is None for i in (1, 3, 5, 6, 7, 8, 9, 10))


# --- the apply lock ---------------------------------------------------------------------


def test_apply_lock_is_per_database(db: TestDB) -> None:
    """One apply per (job, target): the same job may run on another database of the same
    server (GET_LOCK names are server-wide on MariaDB), but not twice on one database."""
    here = db.target()
    there = Target("other", parse_url(second_database(db, "b"), "test"), "other")
    init_target(here)
    init_target(there)
    held = ApplyLock(connect(here).engine, "apply:jobs:FillEmail", "R1", "me").acquire()
    try:
        elsewhere = ApplyLock(connect(there).engine, "apply:jobs:FillEmail", "R2", "me").acquire()
        elsewhere.release()
        with pytest.raises(LockHeldError, match="held by run R1"):
            ApplyLock(connect(here).engine, "apply:jobs:FillEmail", "R3", "me").acquire()
    finally:
        held.release()
    ApplyLock(connect(here).engine, "apply:jobs:FillEmail", "R4", "me").acquire().release()


def test_cancel_a_failed_run(db: TestDB, cli: CliRunner, jobs_file: Path) -> None:
    """A run stopped by a guard can be given up: cancelled, not resumable, its batches audited."""
    db.create_people(9)
    cfg = db.config()
    assert run_cli(cli, cfg, "init", "--target", "staging").exit_code == 0
    db.execute("CREATE TABLE flag (hold INTEGER NOT NULL)")
    db.execute("INSERT INTO flag (hold) VALUES (0)")
    assert run_cli(cli, cfg, "plan", f"{jobs_file}:FillEmail", "-o", "p.plan").exit_code == 0
    db.execute("UPDATE flag SET hold = 1")
    stopped = run_cli(cli, cfg, "apply", "p.plan", "--batch-size", "2", "--max-hold", "0",
                      "--hold-while", "SELECT hold FROM flag", "--json")
    assert stopped.exit_code == 3, stopped.output
    ((run_id, status),) = db.rows("SELECT run_id, status FROM fillgate_runs WHERE kind = 'apply'")
    assert status == "failed"
    paused = run_cli(cli, cfg, "pause", run_id)  # nothing runs: pausing makes no sense
    assert paused.exit_code == 2
    assert "has status failed; only running or paused runs can be paused" in paused.stderr
    cancelled = run_cli(cli, cfg, "cancel", run_id, "--json")
    assert cancelled.exit_code == 0, cancelled.output
    assert json.loads(cancelled.stdout)["status"] == "cancelled"
    assert db.scalar("SELECT status FROM fillgate_runs WHERE run_id = :r", {"r": run_id}) == "cancelled"
    assert run_cli(cli, cfg, "resume", run_id).exit_code == 2
    # the batch it applied before stopping stays in the table and in the audit log
    assert db.scalar("SELECT count(*) FROM fillgate_changes WHERE run_id = :r", {"r": run_id}) == 2
    assert db.scalar("SELECT count(*) FROM people WHERE email LIKE '%@example.com'") == 2


def test_runs_filters_are_checked(sqlite_db: TestDB, cli: CliRunner) -> None:
    cfg = sqlite_db.config()
    assert run_cli(cli, cfg, "init", "--target", "staging").exit_code == 0
    for option, value in (("--kind", "aply"), ("--status", "done")):
        result = run_cli(cli, cfg, "runs", option, value)
        assert result.exit_code == 2, result.output
        assert f"unknown run {option[2:]} '{value}'" in result.stderr
    listed = run_cli(cli, cfg, "runs", "--kind", "init", "--json")
    assert [r["kind"] for r in json.loads(listed.stdout)] == ["init"]
