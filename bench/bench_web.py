"""Benchmark: the dashboard's pages on a big ledger stay under 200 ms of server time.

Fills one target's ledger with ``--runs`` runs (default 10,000: a third of them applies) and
``--changes`` audit rows (default 10 million, spread over the applies, on ``--rows`` distinct
row keys), a batch timeline for every apply, and writes a plan file of ``--plan-lines`` lines
(default 1 million). The ledger is filled through ``Ledger`` methods (``create_run``,
``insert_changes``, ``record_batch``), so it keeps working when the audit storage changes.
Then it times each page in-process (the Starlette app behind a TestClient; the time printed is
the request's round trip in the same process, an upper bound of the server's time), best and
median of ``--repeat`` requests:

- the runs list, first and last page; a run page; the history of one key;
- page 1, a middle page and the last page of the plan, and a page of one kind of line;
- the targets page and /metrics.

    .venv/bin/python bench/bench_web.py                         # SQLite, the full size
    .venv/bin/python bench/bench_web.py --changes 1000000 --plan-lines 100000   # quicker
    FILLGATE_TEST_POSTGRES_URL=postgresql://postgres@127.0.0.1:5432/test \\
        .venv/bin/python bench/bench_web.py --backend postgresql

The database is built once per ``--dir`` and reused by later runs (delete it to rebuild).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from starlette.testclient import TestClient

from fillgate.config import Target, parse_url
from fillgate.ledger import Run, new_run_id
from fillgate.plan import PlanHeader, PlanWriter
from fillgate.stamp import connect, init_target
from fillgate.web.app import Settings, create_app
from fillgate.web.data import Dashboard

LIMIT_MS = 200.0
TABLE = "people"


def _target(backend: str, root: Path) -> Target:
    if backend == "sqlite":
        url = f"sqlite:///{root / 'ledger.db'}"
    else:
        url = os.environ.get("FILLGATE_TEST_POSTGRES_URL") if backend == "postgresql" else os.environ.get(
            "FILLGATE_TEST_MYSQL_URL")
        if not url:
            sys.exit(f"set FILLGATE_TEST_{'POSTGRES' if backend == 'postgresql' else 'MYSQL'}_URL for {backend}")
        base = sa.make_url(parse_url(url, "bench"))
        name = "fillgate_bench_web"
        admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            if backend == "postgresql":
                if not conn.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first():
                    conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
            else:
                conn.exec_driver_sql(f"CREATE DATABASE IF NOT EXISTS `{name}`")
        admin.dispose()
        url = base.set(database=name).render_as_string(hide_password=False)
    return Target("bench", parse_url(url, "bench"), "bench")


def fill(target: Target, runs: int, changes: int, rows: int) -> dict[str, Any]:
    """Runs, audit rows and batch timelines, through the Ledger (skipped when already there)."""
    init_target(target)
    conn = connect(target)
    ledger = conn.ledger
    have = ledger.page_runs(0, 1)[1]
    if have >= runs:
        print(f"  reusing the ledger: {have:,} runs")
        return {"apply": ledger.page_runs(0, 1, kind="apply")[0][0].run_id}
    rng = random.Random(7)
    applies = runs // 3
    per_apply = changes // applies
    started = time.perf_counter()
    now = dt.datetime(2026, 1, 1)
    last_apply = ""
    with conn.engine.begin() as tx:
        for i in range(runs - applies - 1):
            ledger.create_run(Run(run_id=new_run_id(), kind="plan", target="bench", environment="bench",
                                  operator="bench", status="planned", job=f"job{i % 7}", table_name=TABLE,
                                  counts={"rows": 1000, "writes": per_apply}, created_at=now), tx)
    written = 0
    for i in range(applies):
        run_id = new_run_id()
        last_apply = run_id
        with conn.engine.begin() as tx:
            ledger.create_run(Run(run_id=run_id, kind="apply", target="bench", environment="bench",
                                  operator="bench", status="succeeded", job=f"job{i % 7}", table_name=TABLE,
                                  args={"key": ["id"]}, counts={"applied": per_apply, "conflicts": 0, "errors": 0},
                                  checkpoint=per_apply, total=per_apply, created_at=now, started_at=now,
                                  finished_at=now), tx)
            items = [(f"[{rng.randrange(rows)}]", "email", "update", "null", f'"user{j}@example.com"')
                     for j in range(per_apply)]
            ledger.insert_changes(tx, run_id, TABLE, f"job{i % 7}", now, items)
            for b in range(5):
                ledger.record_batch(tx, run_id, done=(b + 1) * per_apply // 5, rows=per_apply // 5,
                                    writes=per_apply // 5, elapsed_ms=40.0, committed_at=now)
        written += per_apply
        if i % 200 == 0:
            print(f"  {i:,} applies, {written:,} audit rows ({time.perf_counter() - started:.0f}s)", flush=True)
    print(f"  filled {runs:,} runs and {written:,} audit rows in {time.perf_counter() - started:.0f}s")
    return {"apply": last_apply}


def write_plan(path: Path, lines: int) -> None:
    """A plan file of ``lines`` lines (changes, with a disagreement every 1000), via PlanWriter."""
    if path.exists():
        return
    writer = PlanWriter(path.parent)
    for i in range(lines):
        if i % 1000 == 999:
            writer.disagreement((i,), "email", f"old{i}@x.org", f"user{i}@example.com")
        else:
            writer.change((i,), "email", None, f"user{i}@example.com")
    header = PlanHeader(plan_id=new_run_id(), job="bench", job_fingerprint="bench", table=TABLE, key=["id"],
                        columns={"email": {"policy": "fill_missing"}}, target="bench", environment="bench",
                        database_id="bench", dialect="sqlite", created_at=dt.datetime.now(dt.UTC).isoformat(),
                        operator="bench")
    writer.finish(header, path)


def timed(client: TestClient, url: str, repeat: int, expect: str) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        response = client.get(url)
        times.append((time.perf_counter() - started) * 1000)
        if response.status_code != 200 or expect not in response.text:
            raise SystemExit(f"{url}: {response.status_code}, {expect!r} not on the page")
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "mysql"), default="sqlite")
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--changes", type=int, default=10_000_000)
    parser.add_argument("--rows", type=int, default=1_000_000, help="distinct row keys the changes touch")
    parser.add_argument("--plan-lines", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "fillgate-bench-web")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    import fillgate

    print(f"fillgate {fillgate.__file__}; backend {args.backend}; {args.runs:,} runs, {args.changes:,} audit rows, "
          f"plan of {args.plan_lines:,} lines; in {args.dir}")
    target = _target(args.backend, args.dir)
    known = fill(target, args.runs, args.changes, args.rows)
    plan = args.dir / f"plan-{args.plan_lines}.plan"
    started = time.perf_counter()
    write_plan(plan, args.plan_lines)
    cfg = args.dir / "fillgate.toml"
    cfg.write_text(f'[targets.bench]\nurl = "{target.url.render_as_string(hide_password=False)}"\n')
    board = Dashboard(cfg, None, args.dir / "cache")
    client = TestClient(create_app(Settings(cfg, None, args.dir / "cache"), board), base_url="http://127.0.0.1")
    client.get("/plan", params={"path": str(plan)})
    board.plans.wait()
    print(f"  plan file written, verified and indexed in {time.perf_counter() - started:.0f}s "
          f"({plan.stat().st_size / 1e6:.0f} MB)")
    total_runs = board.runs_page("bench", 1, None, None, None)[1]
    last_page = (total_runs + 49) // 50
    key = "[123]"
    pages = [
        ("runs list, first page", "/t/bench/runs", "Runs 1"),
        (f"runs list, last page ({last_page})", f"/t/bench/runs?page={last_page}", "of"),
        ("runs list, filtered (kind=apply, job=job3)", "/t/bench/runs?kind=apply&job=job3", "Runs 1"),
        ("run page (an apply)", f"/t/bench/runs/{known['apply']}", "Batch timeline"),
        ("history of one key", f"/t/bench/history?table={TABLE}&key={key}", "people"),
        ("plan, page 1", f"/plan?path={plan}", "Lines 1"),
        ("plan, middle page", f"/plan?path={plan}&page={args.plan_lines // 100}", "Lines"),
        ("plan, last page", f"/plan?path={plan}&page={(args.plan_lines + 49) // 50}", "Lines"),
        ("plan, disagreements, page 10", f"/plan?path={plan}&kind=disagreement&page=10", "Lines"),
        ("plan, one key", f"/plan?path={plan}&key=4242", "about key"),
        ("targets", "/", "bench"),
        ("/metrics", "/metrics", "fillgate_changes_applied_total"),
    ]
    print(f"\n{'page':<46} {'best ms':>9} {'median ms':>10}")
    worst = 0.0
    for label, url, expect in pages:
        best, median = timed(client, url, args.repeat, expect)
        worst = max(worst, median)
        print(f"{label:<46} {best:>9.1f} {median:>10.1f}")
    verdict = "PASS" if worst < LIMIT_MS else "FAIL"
    print(f"\nslowest median {worst:.1f} ms; target < {LIMIT_MS:.0f} ms per page: {verdict}")


if __name__ == "__main__":
    main()
