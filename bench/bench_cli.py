"""How fast the ``fillgate`` command starts: ``--help``, a usage error, and a refusal.

Issue 9's target: under 0.25 s for ``fillgate --help`` and for a refusal. Each command runs N
times as a new process (medians of wall-clock and CPU seconds); the baseline is the same
Python starting and doing nothing (``python -c pass``), measured in the same run.

The refusal is the one the environment stamp exists for: a target that declares environment
``live`` but reaches a database stamped ``staging`` (``fillgate run JOB --target live``); it is
read through the driver before SQLAlchemy is imported (``fillgate.stampread``). For comparison,
``fillgate runs --target staging`` connects through SQLAlchemy and reads the ledger, as every
command that is not refused does.

    .venv/bin/python bench/bench_cli.py            # 20 runs of each
    .venv/bin/python bench/bench_cli.py --runs 50 --backend postgresql --postgres-url URL
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench_backfill import JOBS_FILE

TARGET_S = 0.25


def timed(argv: list[str], cwd: Path, runs: int) -> dict[str, Any]:
    """Median wall-clock and CPU seconds of ``argv`` run ``runs`` times, and its exit code."""
    walls: list[float] = []
    cpus: list[float] = []
    code = None
    for _ in range(runs):
        before = os.times()
        started = time.perf_counter()
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
        walls.append(time.perf_counter() - started)
        after = os.times()
        cpus.append(after.children_user - before.children_user + after.children_system - before.children_system)
        code = done.returncode
        last = done
    return {"wall": statistics.median(walls), "min": min(walls), "max": max(walls), "cpu": statistics.median(cpus),
            "code": code, "stderr": last.stderr.strip().splitlines()[-1:] if last.stderr.strip() else []}


def prepare(folder: Path, url: str, fillgate: str) -> None:
    """A database stamped 'staging', and a config whose target 'live' reaches it too."""
    (folder / "jobs.py").write_text(JOBS_FILE.format(where="", page_size=1000))  # bench_backfill.py's job
    (folder / "fillgate.toml").write_text(
        f'[targets.staging]\nurl = "{url}"\n\n[targets.live]\nurl = "{url}"\nenvironment = "live"\n'
    )
    init = subprocess.run([fillgate, "init", "--target", "staging"], cwd=folder, capture_output=True, text=True,
                          check=False)
    if init.returncode != 0:
        raise SystemExit(f"fillgate init failed: {init.stderr}")


@contextlib.contextmanager
def database(backend: str, folder: Path, server_url: str | None) -> Iterator[str]:
    """A database of its own for the run: a SQLite file, or a new database on the server
    (``fillgate_bench_cli_<pid>``, dropped afterwards)."""
    if backend == "sqlite":
        yield f"sqlite:///{folder / 'bench.db'}"
        return
    if not server_url:
        raise SystemExit(f"--backend {backend} needs its server's URL (--postgres-url / --mysql-url)")
    from sqlalchemy.engine import make_url

    url = make_url(server_url)
    name = f"fillgate_bench_cli_{os.getpid()}"
    if backend == "postgresql":
        import psycopg

        def admin(sql: str) -> None:
            admin_url = url.set(drivername="postgresql", database=url.database or "postgres")
            with psycopg.connect(admin_url.render_as_string(hide_password=False), autocommit=True) as con:
                con.execute(sql)

        admin(f'CREATE DATABASE "{name}"')
        drop = f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'
    else:
        import pymysql

        def admin(sql: str) -> None:
            con = pymysql.connect(host=url.host or "127.0.0.1", port=url.port or 3306, user=url.username or "root",
                                  password=url.password or "", autocommit=True)
            try:
                with con.cursor() as cursor:
                    cursor.execute(sql)
            finally:
                con.close()

        admin(f"CREATE DATABASE `{name}`")
        drop = f"DROP DATABASE IF EXISTS `{name}`"
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        admin(drop)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="runs of each command (medians are reported)")
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "mariadb"), default="sqlite")
    parser.add_argument("--postgres-url", default=os.environ.get("FILLGATE_TEST_POSTGRES_URL"),
                        help="the PostgreSQL server for --backend postgresql (a database of its own is made)")
    parser.add_argument("--mysql-url", default=os.environ.get("FILLGATE_TEST_MYSQL_URL"),
                        help="the MariaDB server for --backend mariadb (a database of its own is made)")
    args = parser.parse_args(argv)
    fillgate = str(Path(sys.executable).with_name("fillgate"))
    server = {"sqlite": None, "postgresql": args.postgres_url, "mariadb": args.mysql_url}[args.backend]
    with tempfile.TemporaryDirectory(prefix="fillgate-bench-cli-") as tmp, \
            database(args.backend, Path(tmp), server) as url:
        folder = Path(tmp)
        prepare(folder, url, fillgate)
        rows = [
            ("python -c pass (baseline)", [sys.executable, "-c", "pass"], 0),
            ("fillgate --help", [fillgate, "--help"], 0),
            ("fillgate run --no-such-option (usage error)", [fillgate, "run", "--no-such-option"], 2),
            ("fillgate run jobs.py:FillEmail --target live (refused by the stamp)",
             [fillgate, "run", "jobs.py:FillEmail", "--target", "live"], 3),
            ("fillgate runs --target staging (connects, reads the ledger)", [fillgate, "runs", "--target", "staging"],
             0),
        ]
        print(f"{args.backend}; {args.runs} runs of each, medians (wall-clock and CPU seconds of the process)")
        print(f"{'command':<72} {'wall':>7} {'min':>7} {'max':>7} {'cpu':>7}  exit")
        results: dict[str, dict[str, Any]] = {}
        for label, command, expected in rows:
            result = timed(command, folder, args.runs)
            results[label] = result
            flag = "" if result["code"] == expected else f"  (expected exit {expected}: {result['stderr']})"
            print(f"{label:<72} {result['wall']:>7.3f} {result['min']:>7.3f} {result['max']:>7.3f} "
                  f"{result['cpu']:>7.3f}  {result['code']}{flag}")
        base = results[rows[0][0]]["wall"]
        print()
        ok = True
        for label, _, _ in rows[1:4]:
            wall = results[label]["wall"]
            verdict = "PASS" if wall < TARGET_S else "FAIL"
            ok = ok and verdict == "PASS"
            print(f"{label}: {wall:.3f} s ({wall - base:.3f} s above Python's own start) < {TARGET_S} s: {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
