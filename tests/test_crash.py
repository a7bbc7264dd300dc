"""THE crash test: an apply killed with SIGKILL at random points, resumed each time, ends with
every change applied exactly once, on every backend.

The kill points come from a seeded RNG; the seed is printed (and can be forced with
``FILLGATE_CRASH_SEED``) so a failure is reproducible.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import TestDB, current_apply, finish_apply, kill_when, run_cli, start_apply

ROWS = 1600
PACE = ("--batch-size", "20", "--pause-between-batches", "5")
# --chunk-time: batch sizes that change from batch to batch (tiny chunk time: they shrink and grow)
ADAPTIVE = ("--batch-size", "40", "--chunk-time", "0.01", "--pause-between-batches", "5")

JOB = '''
from fillgate import Job, FillMissing, Overwrite


class Enrich(Job):
    table = "accounts"
    columns = {"email": FillMissing(), "score": Overwrite()}
    source = "SELECT id, email, score FROM accounts"

    def compute(self, row, ctx):
        return {"email": f"user{row['id']}@example.com", "score": row["id"] * 2 + 1}
'''


def _expected(i: int) -> tuple[int, str, int]:
    """Every 10th account already has an email (kept by FillMissing); every score changes."""
    return (i, f"kept{i}@x.org" if i % 10 == 0 else f"user{i}@example.com", i * 2 + 1)


@pytest.mark.parametrize("pace", [PACE, ADAPTIVE], ids=["fixed", "adaptive"])
def test_kill_and_resume_applies_every_change_exactly_once(
    db: TestDB, cli: CliRunner, tmp_path: Path, pace: tuple[str, ...]
) -> None:
    seed = int(os.environ.get("FILLGATE_CRASH_SEED") or random.randrange(2**32))
    print(f"crash test seed: {seed} (rerun with FILLGATE_CRASH_SEED={seed})")
    rng = random.Random(seed)

    db.execute("CREATE TABLE accounts (id INTEGER NOT NULL PRIMARY KEY, email VARCHAR(100), score INTEGER)")
    db.execute(
        "INSERT INTO accounts (id, email, score) VALUES (:id, :email, :score)",
        [{"id": i, "email": f"kept{i}@x.org" if i % 10 == 0 else None, "score": i} for i in range(1, ROWS + 1)],
    )
    (tmp_path / "crash_jobs.py").write_text(JOB)
    cfg = db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0
    planned = run_cli(cli, cfg, "plan", f"{tmp_path / 'crash_jobs.py'}:Enrich", "-o", "crash.plan", "--json")
    assert planned.exit_code == 0, planned.output
    total = json.loads(planned.stdout)["changes"]
    assert total == ROWS * 2 - ROWS // 10
    planned_changes = {
        (json.dumps(r["key"], separators=(",", ":")), r["column"], json.dumps(r["new"]))
        for r in map(json.loads, Path("crash.plan").read_text().splitlines()[1:])
        if r["kind"] == "change"
    }
    assert len(planned_changes) == total

    def start(run_id: str | None) -> subprocess.Popen[str]:
        return start_apply(cfg, tmp_path, "crash.plan", run_id, pace)

    def current() -> tuple[str, str, int] | None:
        return current_apply(db)

    log = []
    # 1. kill the apply at a random moment after it starts: maybe before its run exists
    proc = start(None)
    started = time.monotonic()
    delay = rng.uniform(0.0, 3.0)
    log.append(f"apply killed after {delay:.2f}s: " + kill_when(proc, lambda: time.monotonic() - started > delay, rng))

    # 2./3. kill it (or a resume of it) twice more, each time after some progress
    for _ in range(2):
        run = current()
        if run is not None and run[1] == "succeeded":
            break
        done = run[2] if run else 0
        target = rng.randint(done + 1, done + max(1, (total - done) // 2))
        proc = start(run[0] if run else None)

        def reached(target: int = target) -> bool:
            r = current()
            return r is not None and r[2] >= target

        log.append(f"{'resume' if run else 'apply'} from {done} killed past {target}: " + kill_when(proc, reached, rng))
    print("; ".join(log))

    # 4. resume to completion
    finish_apply(db, cfg, "crash.plan", pace[:-2], (seed, log))

    # every intended change is in the table, exactly once
    assert db.rows("SELECT id, email, score FROM accounts ORDER BY id") == [
        _expected(i) for i in range(1, ROWS + 1)
    ], (seed, log)
    final = current_apply(db)
    assert final is not None, (seed, log)
    run_id, status, checkpoint = final
    assert status == "succeeded", (seed, log)
    assert checkpoint == total, (seed, log)
    assert db.scalar("SELECT total FROM fillgate_runs WHERE run_id = :r", {"r": run_id}) == total
    counts = json.loads(db.scalar("SELECT counts FROM fillgate_runs WHERE run_id = :r", {"r": run_id}))
    assert counts == {"applied": total, "conflicts": 0, "errors": 0}, (seed, log)
    # and the audit log holds exactly one row per changed field
    assert db.scalar("SELECT count(*) FROM fillgate_changes") == total, (seed, log)
    assert db.scalar("SELECT count(*) FROM fillgate_changes WHERE run_id = :r", {"r": run_id}) == total
    assert db.rows(
        "SELECT row_key, column_name FROM fillgate_changes GROUP BY row_key, column_name HAVING count(*) > 1"
    ) == [], (seed, log)
    audited = {(k, c, v) for k, c, v in db.rows("SELECT row_key, column_name, new_value FROM fillgate_changes")}
    assert audited == planned_changes, (seed, log)
    assert db.scalar("SELECT count(*) FROM fillgate_errors") == 0
