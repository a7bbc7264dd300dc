"""Distributed runs, in this process (``--partitions`` without a cluster): the plan directory is
verified and gated as one plan, a partition re-run continues from its checkpoint (written in
its batches' own transactions), a failed partition leaves the others to finish, and the
result equals the one-process run's. The Dask cluster tests are in test_distributed_dask.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import fillgate.partitions as partitions_module
from fillgate import Target
from fillgate.distributed import Cluster, InProcess, apply_distributed, plan_distributed, resume_distributed
from fillgate.errors import GateExceededError, PartitionFailedError, PlanFileError
from fillgate.limits import Limits
from fillgate.loader import load_job
from fillgate.stamp import Connected, connect, init_target

from conftest import TestDB, run_cli

JOBS = '''
from fillgate import Job, FillMissing, Overwrite, Param


class Enrich(Job):
    name = "enrich"
    table = "accounts"
    params = {"fail": Param(bool, default=False)}
    columns = {"email": FillMissing(), "score": Overwrite()}
    source = "SELECT id, email, score FROM accounts"

    def compute(self, row, ctx):
        if 41 <= row["id"] <= 80 and self.args["fail"]:
            raise ValueError(f"no score for {row['id']}")
        return {"email": f"user{row['id']}@example.com", "score": row["id"] * 2 + 1}


class Twin(Enrich):
    table = "twins"
    source = "SELECT id, email, score FROM twins"


class Escape(Enrich):
    name = "escape"

    def compute(self, row, ctx):
        ctx.open_target("live")
        return {"email": "x@example.com", "score": 0}
'''

ROWS = 120


def _accounts(db: TestDB, table: str = "accounts") -> None:
    db.execute(f"CREATE TABLE {table} (id INTEGER NOT NULL PRIMARY KEY, email VARCHAR(100), score INTEGER)")
    db.execute(f"INSERT INTO {table} (id, email, score) VALUES (:id, :email, :score)",
               [{"id": i, "email": f"kept{i}@x.org" if i % 10 == 0 else None, "score": i} for i in range(1, ROWS + 1)])


def _expected(i: int) -> tuple[int, str, int]:
    return (i, f"kept{i}@x.org" if i % 10 == 0 else f"user{i}@example.com", i * 2 + 1)


TOTAL = ROWS * 2 - ROWS // 10


def _setup(db: TestDB, tmp_path: Path) -> tuple[Connected, Any]:
    _accounts(db)
    (tmp_path / "djobs.py").write_text(JOBS)
    target = Target.from_url("staging", db.url)
    init_target(target)
    return connect(target), load_job(f"{tmp_path / 'djobs.py'}:Enrich")


def _exactly_once(db: TestDB) -> None:
    assert db.rows("SELECT id, email, score FROM accounts ORDER BY id") == [_expected(i) for i in range(1, ROWS + 1)]
    assert db.scalar("SELECT count(*) FROM fillgate_changes") == TOTAL
    assert db.rows("SELECT row_key, column_name FROM fillgate_changes GROUP BY row_key, column_name "
                   "HAVING count(*) > 1") == []


def test_a_partition_rerun_continues_from_its_checkpoint(
    db: TestDB, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The third batch of partition 1 dies inside its transaction: the partition's checkpoint
    (committed with each batch) says where it stopped, and resume applies the rest once."""
    conn, job = _setup(db, tmp_path)
    planned = plan_distributed(conn, job, out=tmp_path / "plans", cluster=Cluster(partitions=3))
    assert planned.header.changes == TOTAL and planned.path is not None
    real_execute = partitions_module.execute
    calls = {"n": 0}

    def dying(conn: Any, run: Any, changes: Any, limits: Any, lock: Any, monitor: Any, on_batch: Any) -> Any:
        if run.args["partition"] != 1:
            return real_execute(conn, run, changes, limits, lock, monitor, on_batch=on_batch)

        def hook(tx: Any, checkpoint: int, counts: dict[str, int]) -> str | None:
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("worker died")  # inside the batch's transaction: rolled back
            return on_batch(tx, checkpoint, counts)  # type: ignore[no-any-return]
        return real_execute(conn, run, changes, limits, lock, monitor, on_batch=hook)

    monkeypatch.setattr(partitions_module, "execute", dying)
    with pytest.raises(PartitionFailedError, match="partition 1 failed: RuntimeError: worker died"):
        apply_distributed(conn, planned.path, Limits(batch_size=10))
    run = conn.ledger.list_runs(kind="apply")[0]
    assert run.status == "failed"
    parts = conn.ledger.partitions(run.run_id)
    assert [p["status"] for p in parts] == ["succeeded", "failed", "succeeded"]
    child = conn.ledger.get_run(parts[1]["child_run_id"])
    assert parts[1]["checkpoint"] == child.checkpoint == 20  # two batches committed, the third rolled back
    assert db.scalar("SELECT count(*) FROM fillgate_changes WHERE run_id = :r", {"r": child.run_id}) == 20
    monkeypatch.setattr(partitions_module, "execute", real_execute)
    resumed = resume_distributed(conn, run.run_id, Limits(batch_size=10))
    assert resumed.run.status == "succeeded"
    assert resumed.counts == {"applied": TOTAL, "conflicts": 0, "errors": 0}
    assert resumed.run.checkpoint == TOTAL
    _exactly_once(db)
    # a partition run again after it finished writes nothing
    again = partitions_module.apply_partition(conn.target, run.run_id, 1, Limits(batch_size=10))
    assert again["status"] == "succeeded"
    _exactly_once(db)


def test_distributed_result_equals_the_one_process_result(db: TestDB, tmp_path: Path) -> None:
    conn, job = _setup(db, tmp_path)
    _accounts(db, "twins")
    twin = load_job(f"{tmp_path / 'djobs.py'}:Twin")
    from fillgate.applier import run_job

    run_job(conn, twin, out=tmp_path / "single")
    planned = plan_distributed(conn, job, out=tmp_path / "plans", cluster=Cluster(partitions=4))
    assert planned.path is not None
    apply_distributed(conn, planned.path, Limits(batch_size=7))
    assert db.rows("SELECT id, email, score FROM accounts ORDER BY id") == \
        db.rows("SELECT id, email, score FROM twins ORDER BY id")

    def audit(table: str) -> list[tuple[Any, ...]]:
        return sorted(db.rows("SELECT row_key, column_name, op, old_value, new_value, source FROM fillgate_changes "
                              "WHERE table_name = :t", {"t": table}))

    assert audit("accounts") == audit("twins") and len(audit("accounts")) == TOTAL


def test_a_partition_whose_rows_all_fail_is_reported_and_the_others_finish(
    db: TestDB, cli: CliRunner, tmp_path: Path
) -> None:
    _accounts(db)
    (tmp_path / "djobs.py").write_text(JOBS)
    cfg = db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0
    done = run_cli(cli, cfg, "run", f"{tmp_path / 'djobs.py'}:Enrich", "--partitions", "3", "-p", "fail=1",
                   "--events", "events.jsonl")
    assert done.exit_code == 1, done.output  # row errors: exit 1
    assert "row errors                 40" in done.stdout
    apply_id = db.scalar("SELECT run_id FROM fillgate_runs WHERE kind = 'apply' AND parent_run_id IN "
                         "(SELECT run_id FROM fillgate_runs WHERE kind = 'plan' AND plan_path LIKE '%plans%' "
                         "AND args LIKE '%distributed%')")
    plan = db.rows("SELECT part, status, total, counts FROM fillgate_partitions WHERE run_id = "
                   "(SELECT parent_run_id FROM fillgate_runs WHERE run_id = :r) ORDER BY part", {"r": apply_id})
    assert [(p, s, t) for p, s, t, _ in plan] == [(0, "planned", 76), (1, "planned", 0), (2, "planned", 76)]
    assert json.loads(plan[1][3])["errors"] == 40
    rows = db.rows("SELECT id, email, score FROM accounts ORDER BY id")
    assert rows == [(i, *_expected(i)[1:]) if not 41 <= i <= 80 else
                    (i, f"kept{i}@x.org" if i % 10 == 0 else None, i) for i in range(1, ROWS + 1)]
    shown = run_cli(cli, cfg, "show", apply_id, "--json")
    data = json.loads(shown.stdout)
    assert [p["status"] for p in data["partitions"]] == ["succeeded"] * 3
    assert data["counts"] == {"applied": 152, "conflicts": 0, "errors": 0}
    events = [json.loads(line) for line in Path("events.jsonl").read_text().splitlines()]
    finished = [e for e in events if e["event"] == "run_finished" and e["run_id"] == apply_id]
    batches = [e for e in events if e["event"] == "batch_done" and e["run_id"] == apply_id]
    assert finished[0]["totals"]["applied"] == sum(b["writes"] for b in batches) == 152
    assert {b["partition"] for b in batches} == {0, 1, 2} or {b["partition"] for b in batches} == {0, 2}
    assert run_cli(cli, cfg, "verify").exit_code == 0  # the partitions' audit rows match their evidence
    plan_id = db.scalar("SELECT parent_run_id FROM fillgate_runs WHERE run_id = :r", {"r": apply_id})
    shown_plan = json.loads(run_cli(cli, cfg, "show", plan_id, "--json").stdout)  # the plan: one, with its parts
    assert shown_plan["total"] == 152 and shown_plan["counts"]["errors"] == 40
    assert [(p["status"], p["total"], p["counts"]["errors"]) for p in shown_plan["partitions"]] == \
        [("planned", 76, 0), ("planned", 0, 40), ("planned", 76, 0)]
    runs = json.loads(run_cli(cli, cfg, "runs", "--json").stdout)
    assert [r["kind"] for r in runs] == ["apply", "plan", "init"]  # the partitions' runs are not listed


def test_a_plan_directory_is_verified_and_gated_as_one_plan(db: TestDB, cli: CliRunner, tmp_path: Path) -> None:
    conn, job = _setup(db, tmp_path)
    planned = plan_distributed(conn, job, out=tmp_path / "plans", cluster=Cluster(partitions=2))
    other = plan_distributed(conn, job, out=tmp_path / "other", cluster=Cluster(partitions=2))
    assert planned.path is not None and other.path is not None
    before = db.rows("SELECT id, email, score FROM accounts ORDER BY id")
    with pytest.raises(GateExceededError, match=f"has {TOTAL} changes, more than --max-changes 10"):
        apply_distributed(conn, planned.path, Limits(max_changes=10))
    manifest = planned.path / "manifest.json"
    data = json.loads(manifest.read_text())
    part = planned.path / data["partitions"][1]["file"]
    original = part.read_bytes()
    # an edited partition file
    part.write_bytes(original.replace(b"user101@example.com", b"evil1@example.com"))
    with pytest.raises(PlanFileError, match="does not match"):
        apply_distributed(conn, planned.path)
    part.write_bytes(original)
    # a partition file of another plan, with a manifest whose entry was rewritten to match it
    foreign = json.loads((other.path / "manifest.json").read_text())["partitions"][1]
    (planned.path / foreign["file"]).write_bytes((other.path / foreign["file"]).read_bytes())
    forged = {**data, "partitions": [data["partitions"][0], foreign]}
    manifest.write_text(json.dumps(forged))
    with pytest.raises(PlanFileError):
        apply_distributed(conn, planned.path)
    assert db.rows("SELECT id, email, score FROM accounts ORDER BY id") == before
    assert conn.ledger.list_runs(kind="apply") == []
    cfg = db.config()
    refused = run_cli(cli, cfg, "apply", str(planned.path))
    assert refused.exit_code == 2 and "modified" in refused.stderr, refused.output


def test_cancel_and_revert_act_on_the_whole_run(db: TestDB, cli: CliRunner, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    conn, job = _setup(db, tmp_path)
    planned = plan_distributed(conn, job, out=tmp_path / "plans", cluster=Cluster(partitions=3))
    assert planned.path is not None
    real_execute = partitions_module.execute

    def failing(conn: Any, run: Any, changes: Any, limits: Any, lock: Any, monitor: Any, on_batch: Any) -> Any:
        if run.args["partition"] == 2:
            raise RuntimeError("no more")
        return real_execute(conn, run, changes, limits, lock, monitor, on_batch=on_batch)

    monkeypatch.setattr(partitions_module, "execute", failing)
    with pytest.raises(PartitionFailedError):
        apply_distributed(conn, planned.path, Limits(batch_size=10))
    run_id = conn.ledger.list_runs(kind="apply")[0].run_id
    cfg = db.config()
    assert run_cli(cli, cfg, "cancel", run_id).exit_code == 0
    statuses = db.rows("SELECT p.part, p.status, r.status FROM fillgate_partitions p LEFT JOIN fillgate_runs r "
                       "ON r.run_id = p.child_run_id WHERE p.run_id = :r ORDER BY p.part", {"r": run_id})
    assert statuses == [(0, "succeeded", "succeeded"), (1, "succeeded", "succeeded"), (2, "cancelled", "running")] \
        or [s[1] for s in statuses] == ["succeeded", "succeeded", "cancelled"]
    reverted = run_cli(cli, cfg, "revert", run_id, "--json")
    assert reverted.exit_code == 0, reverted.output
    assert len(json.loads(reverted.stdout)["reverts"]) == 2  # one per partition that applied
    original = [(i, f"kept{i}@x.org" if i % 10 == 0 else None, i) for i in range(1, ROWS + 1)]
    assert db.rows("SELECT id, email, score FROM accounts ORDER BY id") == original


def test_pause_and_resume_the_whole_run(db: TestDB, cli: CliRunner, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A pause asked for while the run applies stops every partition after its batch, and the
    partitions not started yet do not start; resume finishes them, exactly once."""
    from fillgate import commands

    conn, job = _setup(db, tmp_path)
    planned = plan_distributed(conn, job, out=tmp_path / "plans", cluster=Cluster(partitions=3))
    assert planned.path is not None
    real_execute = partitions_module.execute

    def pausing(conn: Any, run: Any, changes: Any, limits: Any, lock: Any, monitor: Any, on_batch: Any) -> Any:
        result = real_execute(conn, run, changes, limits, lock, monitor, on_batch=on_batch)
        if run.args["partition"] == 0:
            assert commands.control(conn, run.parent_run_id, "pause").control == "pause"  # the run is live
        return result

    monkeypatch.setattr(partitions_module, "execute", pausing)
    paused = apply_distributed(conn, planned.path, Limits(batch_size=10))
    assert paused.run.status == "paused" and paused.stopped == "paused"
    parts = conn.ledger.partitions(paused.run.run_id)
    assert [p["status"] for p in parts] == ["succeeded", "pending", "pending"]
    assert paused.counts["applied"] == parts[0]["checkpoint"] == paused.run.checkpoint
    cfg = db.config()
    resumed = run_cli(cli, cfg, "resume", paused.run.run_id, "--json")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["status"] == "succeeded"
    _exactly_once(db)


def test_every_worker_checks_the_stamp_and_the_protection(db: TestDB, tmp_path: Path) -> None:
    """A partition applied by a worker is refused, writing nothing, without the typed
    confirmation of a protected target, or when the database's stamp is another environment."""
    from fillgate.errors import ProtectedTargetError, StampMismatchError

    conn, job = _setup(db, tmp_path)
    planned = plan_distributed(conn, job, out=tmp_path / "plans", cluster=Cluster(partitions=2))
    assert planned.path is not None
    paused = apply_distributed(conn, planned.path, Limits(batch_size=10), executor=_PauseFirst())
    run_id = paused.run.run_id
    before = db.rows("SELECT id, email, score FROM accounts ORDER BY id")
    protected = Target.from_url("staging", db.url, protected=True)
    with pytest.raises(ProtectedTargetError):
        partitions_module.apply_partition(protected, run_id, 1, Limits(batch_size=10))
    elsewhere = Target.from_url("staging", db.url, environment="live")
    with pytest.raises(StampMismatchError):
        partitions_module.apply_partition(elsewhere, run_id, 1, Limits(batch_size=10))
    assert db.rows("SELECT id, email, score FROM accounts ORDER BY id") == before


class _PauseFirst(InProcess):
    """An executor that asks the run to pause before running anything (nothing is applied)."""

    def submit(self, fn: Any, *args: Any) -> Any:
        from fillgate.ledger import Ledger
        from fillgate.stamp import connect as reach

        target, run_id = args[0], args[1]
        Ledger(reach(target).engine).update_run(run_id, control="pause")
        return super().submit(fn, *args)


def test_the_target_guard_holds_in_every_partition(db: TestDB, tmp_path: Path) -> None:
    from fillgate.errors import TargetEscapeError

    conn, _ = _setup(db, tmp_path)
    escape = load_job(f"{tmp_path / 'djobs.py'}:Escape")
    with pytest.raises(TargetEscapeError, match="tried to open target 'live'"):
        plan_distributed(conn, escape, out=tmp_path / "plans", cluster=Cluster(partitions=2))
    assert [r.status for r in conn.ledger.list_runs(kind="plan")] == ["failed"]
    assert db.scalar("SELECT count(*) FROM fillgate_changes") == 0
