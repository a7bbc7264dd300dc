"""Distributed runs on a real Dask LocalCluster (2 worker processes), on every backend: a
worker killed with SIGKILL in the middle of a partition (Dask re-runs its task elsewhere), and
the coordinator killed (``fillgate resume`` finishes the run). Every change lands exactly once,
with one audit row per changed field, a partition whose rows all fail is reported while the
others finish, and the result equals the one-process run's."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fillgate import Target
from fillgate.applier import run_job
from fillgate.distributed import Cluster, apply_distributed, plan_distributed
from fillgate.limits import Limits
from fillgate.loader import load_job
from fillgate.runs import pid_alive
from fillgate.stamp import connect, init_target

from conftest import TestDB, fillgate_subprocess, run_cli

pytestmark = pytest.mark.slow
pytest.importorskip("distributed")  # the dask extra (the test extra installs it)
dask_cluster = pytest.importorskip("fillgate.contrib.dask_cluster")

JOBS = '''
from fillgate import Job, FillMissing, Overwrite, Param


class Enrich(Job):
    name = "enrich"
    table = "accounts"
    columns = {"email": FillMissing(), "score": Overwrite()}
    source = "SELECT id, email, score FROM accounts"
    params = {"fail": Param(bool, default=False)}

    def compute(self, row, ctx):
        if self.args["fail"] and row["id"] <= 100:
            raise ValueError(f"no score for {row['id']}")
        return {"email": f"user{row['id']}@example.com", "score": row["id"] * 2 + 1}


class Twin(Enrich):
    table = "twins"
    source = "SELECT id, email, score FROM twins"
'''
ROWS = 400
TOTAL = ROWS * 2 - ROWS // 10


@pytest.fixture(scope="module")
def executor() -> Iterator[Any]:
    ex = dask_cluster.DaskExecutor(workers=2)
    yield ex
    ex.close()


def _table(db: TestDB, name: str) -> None:
    db.execute(f"CREATE TABLE {name} (id INTEGER NOT NULL PRIMARY KEY, email VARCHAR(100), score INTEGER)")
    db.execute(f"INSERT INTO {name} (id, email, score) VALUES (:id, :email, :score)",
               [{"id": i, "email": f"kept{i}@x.org" if i % 10 == 0 else None, "score": i} for i in range(1, ROWS + 1)])


def _expected(i: int, failed: bool = False) -> tuple[int, str | None, int]:
    if failed:
        return (i, f"kept{i}@x.org" if i % 10 == 0 else None, i)
    return (i, f"kept{i}@x.org" if i % 10 == 0 else f"user{i}@example.com", i * 2 + 1)


def _once(db: TestDB, total: int) -> None:
    """Every change in the audit log exactly once, one row per changed field."""
    assert db.scalar("SELECT count(*) FROM fillgate_changes WHERE table_name = 'accounts'") == total
    assert db.rows("SELECT row_key, column_name FROM fillgate_changes WHERE table_name = 'accounts' "
                   "GROUP BY row_key, column_name HAVING count(*) > 1") == []


def _running_partition(db: TestDB) -> tuple[str, int] | None:
    """(child run, its worker's pid) of a partition in the middle of its batches."""
    rows = db.rows("SELECT p.child_run_id, r.pid FROM fillgate_partitions p JOIN fillgate_runs r ON "
                   "r.run_id = p.child_run_id WHERE r.kind = 'apply' AND r.status = 'running' AND p.checkpoint > 0 "
                   "AND p.checkpoint < p.total")
    return (rows[0][0], rows[0][1]) if rows else None


def test_sigkill_a_worker_mid_partition(db: TestDB, tmp_path: Path, executor: Any) -> None:
    _table(db, "accounts")
    _table(db, "twins")
    (tmp_path / "dask_jobs.py").write_text(JOBS)
    target = Target.from_url("staging", db.url)
    init_target(target)
    conn = connect(target)
    job = load_job(f"{tmp_path / 'dask_jobs.py'}:Enrich")
    run_job(conn, load_job(f"{tmp_path / 'dask_jobs.py'}:Twin"), out=tmp_path / "single")
    planned = plan_distributed(conn, job, out=tmp_path / "plans", cluster=Cluster(partitions=4), executor=executor)
    assert planned.path is not None and planned.header.changes == TOTAL
    outcome: dict[str, Any] = {}

    def apply() -> None:
        try:
            outcome["result"] = apply_distributed(conn, planned.path, Limits(batch_size=10, pause_ms=40),
                                                  executor=executor)
        except BaseException as exc:  # reported below
            outcome["error"] = exc

    thread = threading.Thread(target=apply)
    thread.start()
    deadline = time.monotonic() + 60
    killed = None
    while killed is None and thread.is_alive() and time.monotonic() < deadline:
        found = _running_partition(db)
        if found is not None:
            killed = found
            os.kill(found[1], signal.SIGKILL)
        time.sleep(0.02)
    thread.join(180)
    assert killed is not None, "no partition was caught in the middle"
    assert "error" not in outcome, outcome
    result = outcome["result"]
    assert result.run.status == "succeeded"
    assert result.counts == {"applied": TOTAL, "conflicts": 0, "errors": 0}
    assert db.rows("SELECT id, email, score FROM accounts ORDER BY id") == [_expected(i) for i in range(1, ROWS + 1)]
    _once(db, TOTAL)
    # the killed worker's partition run was taken over, continued from its checkpoint, and finished
    assert db.scalar("SELECT status FROM fillgate_runs WHERE run_id = :r", {"r": killed[0]}) == "succeeded"
    # the same as the one-process run: table and audit rows (but ids, times and the table's name)
    assert db.rows("SELECT id, email, score FROM accounts ORDER BY id") == \
        db.rows("SELECT id, email, score FROM twins ORDER BY id")

    def audit(table: str) -> list[tuple[Any, ...]]:
        return sorted(db.rows("SELECT row_key, column_name, op, old_value, new_value, source FROM fillgate_changes "
                              "WHERE table_name = :t", {"t": table}))

    assert audit("accounts") == audit("twins")


def test_kill_the_coordinator_then_resume(db: TestDB, cli: CliRunner, tmp_path: Path) -> None:
    """``fillgate run --workers 2`` killed with SIGKILL while partitions apply (its workers die
    with it), then ``fillgate resume``: the run finishes; the partition whose rows all failed
    to compute is reported, the others are applied exactly once."""
    _table(db, "accounts")
    (tmp_path / "dask_jobs.py").write_text(JOBS)
    cfg = db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0
    proc = fillgate_subprocess(["--config", str(cfg), "run", f"{tmp_path / 'dask_jobs.py'}:Enrich", "--workers", "2",
                                "--partitions", "4", "-p", "fail=1", "--batch-size", "10",
                                "--pause-between-batches", "40"], cwd=tmp_path)
    deadline = time.monotonic() + 90
    while proc.poll() is None and _running_partition(db) is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    run_id = db.scalar("SELECT run_id FROM fillgate_runs WHERE kind = 'apply' AND parent_run_id IN "
                       "(SELECT run_id FROM fillgate_runs WHERE kind = 'plan' AND args LIKE '%workers%')")
    shown = json.loads(run_cli(cli, cfg, "show", run_id, "--json").stdout)
    assert shown["status"] == "running" and any(p["status"] != "succeeded" for p in shown["partitions"])
    _wait_for_workers_to_die(db)
    resumed = run_cli(cli, cfg, "resume", run_id, "--workers", "2", "--json")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["status"] == "succeeded"
    failed = range(1, 101)  # partition 0: every row failed to compute, nothing planned for it
    plan_parts = db.rows("SELECT part, total FROM fillgate_partitions WHERE run_id = (SELECT parent_run_id FROM "
                         "fillgate_runs WHERE run_id = :r) ORDER BY part", {"r": run_id})
    assert plan_parts == [(0, 0), (1, 190), (2, 190), (3, 190)]
    assert db.rows("SELECT id, email, score FROM accounts ORDER BY id") == \
        [_expected(i, i in failed) for i in range(1, ROWS + 1)]
    _once(db, 570)
    final = json.loads(run_cli(cli, cfg, "show", run_id, "--json").stdout)
    assert final["counts"] == {"applied": 570, "conflicts": 0, "errors": 0}
    assert [p["status"] for p in final["partitions"]] == ["succeeded"] * 4


def _wait_for_workers_to_die(db: TestDB) -> None:
    """The killed coordinator's worker processes exit with it; wait until they have."""
    pids = [pid for (pid,) in db.rows("SELECT pid FROM fillgate_runs WHERE kind = 'apply' AND status = 'running'")]
    deadline = time.monotonic() + 30
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)


def test_plan_and_apply_on_an_existing_cluster(db: TestDB, cli: CliRunner, tmp_path: Path, executor: Any,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """``plan`` with DASK_SCHEDULER_ADDRESS, ``apply DIR --scheduler ADDRESS``: the partitions run
    on the cluster that is already there; the plan directory is applied as one plan."""
    address = executor.cluster.scheduler_address
    _table(db, "accounts")
    (tmp_path / "dask_jobs.py").write_text(JOBS)
    cfg = db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", address)
    planned = run_cli(cli, cfg, "plan", f"{tmp_path / 'dask_jobs.py'}:Enrich", "-o", "plans/", "--json")
    assert planned.exit_code == 0, planned.output
    folder = Path(json.loads(planned.stdout)["path"])
    assert (folder / "manifest.json").is_file() and json.loads(planned.stdout)["changes"] == TOTAL
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS")
    refused = run_cli(cli, cfg, "apply", str(folder), "--scheduler", address, "--max-changes", "10")
    assert refused.exit_code == 3 and f"has {TOTAL} changes" in refused.stderr, refused.output
    applied = run_cli(cli, cfg, "apply", str(folder), "--scheduler", address, "--json")
    assert applied.exit_code == 0, applied.output
    assert json.loads(applied.stdout)["counts"] == {"applied": TOTAL, "conflicts": 0, "errors": 0}
    assert db.rows("SELECT id, email, score FROM accounts ORDER BY id") == [_expected(i) for i in range(1, ROWS + 1)]
    _once(db, TOTAL)
    workers = {pid for (pid,) in db.rows("SELECT pid FROM fillgate_runs WHERE kind = 'apply' AND args LIKE "
                                         "'%partition%'")}
    assert workers <= set(executor.worker_pids()) and os.getpid() not in workers  # the cluster's workers did it
