"""Real databases for every test.

SQLite always runs. PostgreSQL and MariaDB run when ``FILLGATE_TEST_POSTGRES_URL`` /
``FILLGATE_TEST_MYSQL_URL`` are set (``.ci/run`` sets both). Each test gets an empty
database: a new SQLite file, or a per-worker PostgreSQL database whose ``public`` schema is
recreated, or a per-worker MariaDB database that is dropped and recreated.
"""

from __future__ import annotations

import importlib.util
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from fillgate.config import Target, parse_url
from fillgate.database import dispose_all

PG_URL = os.environ.get("FILLGATE_TEST_POSTGRES_URL")
MY_URL = os.environ.get("FILLGATE_TEST_MYSQL_URL")
BACKENDS = ["sqlite"] + (["postgresql"] if PG_URL else []) + (["mysql"] if MY_URL else [])
SRC = Path(__file__).resolve().parents[1] / "src"


@dataclass
class TestDB:
    """A fresh database for one test, and helpers to look inside it."""

    backend: str
    url: str
    engine: sa.Engine
    tmp_path: Path

    __test__ = False

    def target(self, name: str = "staging", environment: str | None = None, protected: bool = False) -> Target:
        return Target(name, parse_url(self.url, "test"), environment or name, protected)

    def execute(self, sql: str, params: Any = None) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.text(sql), params or {})

    def rows(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(sql), params or {})]

    def scalar(self, sql: str, params: Any = None) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(sa.text(sql), params or {}).scalar()

    def create_people(self, n: int = 100, with_email_every: int = 2) -> None:
        """``people(id, name, email, kind)``: every ``with_email_every``-th person has an email."""
        self.execute(
            "CREATE TABLE people (id INTEGER NOT NULL PRIMARY KEY, name VARCHAR(100) NOT NULL, "
            "email VARCHAR(200), kind VARCHAR(20))"
        )
        data = [
            {"id": i, "name": f"Person{i}", "email": f"old{i}@x.org" if i % with_email_every == 0 else None,
             "kind": None}
            for i in range(1, n + 1)
        ]
        if data:
            self.execute("INSERT INTO people (id, name, email, kind) VALUES (:id, :name, :email, :kind)", data)

    def config(self, targets: dict[str, dict[str, Any]] | None = None, name: str = "fillgate.toml") -> Path:
        """Write a config file declaring ``targets`` (default: staging -> this database)."""
        targets = targets or {"staging": {}}
        lines = []
        for tname, opts in targets.items():
            lines.append(f"[targets.{tname}]")
            lines.append(f'url = "{opts.get("url", self.url)}"')
            for key, value in opts.items():
                if key == "url":
                    continue
                lines.append(f"{key} = {str(value).lower() if isinstance(value, bool) else repr(value)}")
        path = self.tmp_path / name
        path.write_text("\n".join(lines).replace("'", '"') + "\n")
        return path


# The slow tier: end-to-end tests that start processes, kill them or drive whole examples.
SLOW_MODULES = {
    "test_crash", "test_interrupts", "test_example_albums", "test_example_identity", "test_example_pipeline",
    "test_example_stale", "test_docs", "test_distributed_dask",
}
DATABASE_FIXTURES = {"db", "sqlite_db"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Sort every test into a tier a newcomer can run on its own: ``unit`` (no database),
    ``integration`` (real databases, per backend: ``-k sqlite``, ``-k postgresql``, ``-k mysql``)
    and ``slow`` (end-to-end; the browser tests are ``e2e`` too)."""
    for item in items:
        module = item.module.__name__.rpartition(".")[2] if isinstance(item, pytest.Function) else ""
        if item.get_closest_marker("e2e") or module in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
        elif DATABASE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
        else:
            item.add_marker(pytest.mark.unit)


def pytest_sessionstart(session: pytest.Session) -> None:
    """A database URL that is set must work: fail the run rather than skip its tests."""
    for var, url in (("FILLGATE_TEST_POSTGRES_URL", PG_URL), ("FILLGATE_TEST_MYSQL_URL", MY_URL)):
        if not url:
            continue
        try:
            engine = sa.create_engine(parse_url(url, var))
            with engine.connect():
                pass
            engine.dispose()
        except Exception as exc:
            pytest.exit(f"{var} is set but that database is unreachable: {exc}", returncode=3)


_BACKEND_VARS = {"postgresql": "FILLGATE_TEST_POSTGRES_URL", "mysql": "FILLGATE_TEST_MYSQL_URL"}
_BACKEND_ID = re.compile(r"\[(?:[^\]]*-)?(sqlite|postgresql|mysql)(?:-[^\]]*)?\]$")


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """Say which database backends the run covered, and why any was left out (a run without
    the two variables tests SQLite only, which is easy to miss). Works under xdist: the
    controller sees every worker's reports."""
    ran: dict[str, set[str]] = {backend: set() for backend in ("sqlite", "postgresql", "mysql")}
    for category in ("passed", "failed", "error", "xfailed", "xpassed"):
        for report in terminalreporter.stats.get(category, []):
            match = _BACKEND_ID.search(getattr(report, "nodeid", ""))
            if match:
                ran[match.group(1)].add(report.nodeid)
    parts = []
    for backend, tests in ran.items():
        if backend in BACKENDS:
            parts.append(f"{backend}: {len(tests)} tests ran")
        else:
            parts.append(f"{backend}: SKIPPED ({_BACKEND_VARS[backend]} is not set)")
    terminalreporter.write_sep("-", "database backends")
    terminalreporter.write_line("; ".join(parts))
    if len(BACKENDS) < 3:
        terminalreporter.write_line(
            "Set FILLGATE_TEST_POSTGRES_URL and FILLGATE_TEST_MYSQL_URL to run every backend (README: Development)."
        )


def _worker() -> str:
    """Unique per pytest session and worker, so concurrent sessions never share a database."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    return f"{os.getppid()}_{worker}" if worker else f"{os.getpid()}_main"


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Drop this session's (or worker's) test databases, and the extra ones tests made
    beside them (named with the same prefix)."""
    prefix = f"fillgate_t_{_worker()}"
    dispose_all()
    if PG_URL:
        admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            names = conn.execute(
                sa.text("SELECT datname FROM pg_database WHERE starts_with(datname, :p)"), {"p": prefix}
            ).scalars().all()
            for name in names:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()
    if MY_URL:
        admin = sa.create_engine(parse_url(MY_URL, "FILLGATE_TEST_MYSQL_URL"))
        with admin.begin() as conn:
            names = conn.execute(
                sa.text("SELECT schema_name FROM information_schema.schemata WHERE schema_name LIKE :p"),
                {"p": prefix.replace("_", "\\_") + "%"},
            ).scalars().all()
            for name in names:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
        admin.dispose()


def _fresh_postgres() -> str:
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")  # type: ignore[arg-type]
    name = f"fillgate_t_{_worker()}"
    with admin.connect() as conn:
        exists = conn.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first()
        if not exists:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    admin.dispose()
    url = sa.make_url(parse_url(PG_URL, "FILLGATE_TEST_POSTGRES_URL")).set(database=name)  # type: ignore[arg-type]
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql("DROP SCHEMA IF EXISTS public CASCADE")
        conn.exec_driver_sql("CREATE SCHEMA public")
    engine.dispose()
    return url.render_as_string(hide_password=False)


def _fresh_mysql() -> str:
    base = parse_url(MY_URL, "FILLGATE_TEST_MYSQL_URL")  # type: ignore[arg-type]
    admin = sa.create_engine(base)
    name = f"fillgate_t_{_worker()}"
    with admin.begin() as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
        conn.exec_driver_sql(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    admin.dispose()
    return base.set(database=name).render_as_string(hide_password=False)


@pytest.fixture(params=BACKENDS)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TestDB]:
    dispose_all()
    backend = request.param
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'test.db'}"
    elif backend == "postgresql":
        url = _fresh_postgres()
    else:
        url = _fresh_mysql()
    engine = sa.create_engine(parse_url(url, "test"))
    yield TestDB(backend, url, engine, tmp_path)
    engine.dispose()
    dispose_all()


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[TestDB]:
    """Only SQLite: for behaviour that does not depend on the backend (parsing, config)."""
    dispose_all()
    url = f"sqlite:///{tmp_path / 'test.db'}"
    engine = sa.create_engine(url)
    yield TestDB("sqlite", url, engine, tmp_path)
    engine.dispose()
    dispose_all()


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test sees the developer's DATABASE_URL, config or working directory."""
    for var in ("DATABASE_URL", "FILLGATE_CONFIG", "FILLGATE_OPERATOR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def cli() -> CliRunner:
    return CliRunner()


def run_cli(runner: CliRunner, config: Path | None, *args: str) -> Any:
    """Invoke the CLI in-process; returns the click Result (exit_code, stdout, stderr)."""
    from fillgate.cli import app

    argv = (["--config", str(config)] if config else []) + list(args)
    dispose_all()
    return runner.invoke(app, argv, catch_exceptions=False)


def load_module(path: Path, name: str, *, shared: bool = False) -> ModuleType:
    """Import the file at ``path`` as module ``name``. Examples have generic file names
    (jobs.py, before.py), so each test imports them under a name of its own; ``shared`` reuses
    a module already imported under that name (an example's world module, which its other
    files import by that name)."""
    if shared and name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def second_database(db: TestDB, suffix: str) -> str:
    """The URL of an empty second database beside ``db``: on a server, ``<db's name>_<suffix>``
    (dropped at the end of the session with the rest of this worker's databases); on SQLite,
    the file ``<suffix>.db`` in the test's folder."""
    if db.backend == "sqlite":
        return f"sqlite:///{db.tmp_path / f'{suffix}.db'}"
    url = sa.make_url(parse_url(db.url, "test"))
    name = f"{url.database}_{suffix}"
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        quoted = f'"{name}"' if db.backend == "postgresql" else f"`{name}`"
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {quoted}")
        conn.exec_driver_sql(f"CREATE DATABASE {quoted}")
    admin.dispose()
    return url.set(database=name).render_as_string(hide_password=False)


def dashboard_client(cfg: Path, tmp_path: Path, **settings: Any) -> tuple[Any, Any]:
    """The dashboard of ``cfg`` behind Starlette's TestClient, and its data layer (``Dashboard``),
    with its plan-index cache in ``tmp_path``; ``settings``: more ``Settings`` fields."""
    from starlette.testclient import TestClient

    from fillgate.web.app import Settings, create_app
    from fillgate.web.data import Dashboard

    board = Dashboard(cfg, None, tmp_path / "cache")
    app = create_app(Settings(cfg, None, tmp_path / "cache", **settings), board)
    return TestClient(app, base_url="http://127.0.0.1"), board


def fillgate_subprocess(args: Sequence[str], cwd: Path, **kwargs: Any) -> subprocess.Popen[str]:
    """Start ``fillgate ARGS`` in a separate process (for kill -9 and concurrency tests)."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.Popen(
        [sys.executable, "-m", "fillgate", *args], cwd=cwd, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs,
    )


# --- kill -9 tests: one plan applied by a child process, killed, resumed ---------------------


def current_apply(db: TestDB) -> tuple[str, str, int] | None:
    """(run id, status, checkpoint) of the only apply run, or None before it exists."""
    runs = db.rows("SELECT run_id, status, checkpoint FROM fillgate_runs WHERE kind = 'apply'")
    assert len(runs) <= 1, runs
    return runs[0] if runs else None


def start_apply(cfg: Path, cwd: Path, plan: str, run_id: str | None, options: Sequence[str]) -> subprocess.Popen[str]:
    """``fillgate apply PLAN`` (or ``resume RUN`` once the run exists) in a child process."""
    args = ["apply", plan] if run_id is None else ["resume", run_id]
    return fillgate_subprocess(["--config", str(cfg), *args, *options], cwd=cwd)


def kill_when(proc: subprocess.Popen[str], when: Any, rng: random.Random) -> str:
    """Wait until ``when()`` says so (or the process ends), then SIGKILL it a few ms later."""
    while proc.poll() is None and not when():
        time.sleep(0.005)
    if proc.poll() is None:
        time.sleep(rng.uniform(0, 0.03))  # somewhere inside a batch transaction, or between
        proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    return "killed" if proc.returncode == -signal.SIGKILL else f"exited {proc.returncode}"


def finish_apply(db: TestDB, cfg: Path, plan: str, options: Sequence[str], context: Any) -> None:
    """Apply (or resume) in-process until the run succeeded; a killed process's lock may take
    a moment to be released. ``context`` goes into every assertion message (seed, log)."""
    deadline = time.monotonic() + 15
    while True:
        run = current_apply(db)
        if run is not None and run[1] == "succeeded":
            return
        result = run_cli(CliRunner(), cfg, *(["apply", plan] if run is None else ["resume", run[0]]), *options)
        if result.exit_code == 3 and "already running" in result.stderr and time.monotonic() < deadline:
            time.sleep(0.1)
            continue
        assert result.exit_code == 0, (context, result.output)


JOBS = '''
from fillgate import Job, FillMissing, Promote, Overwrite, Param


class FillEmail(Job):
    table = "people"
    key = ("id",)
    columns = {"email": FillMissing()}
    source = "SELECT id, name, email FROM people"

    def compute(self, row, ctx):
        if row["name"] == "boom":
            raise RuntimeError("cannot compute email for boom")
        return {"email": row["name"].lower() + "@example.com"}


class OverwriteEmail(Job):
    table = "people"
    key = ("id",)
    columns = {"email": Overwrite()}
    source = "SELECT id, name, email FROM people"
    params = {"domain": Param(str, default="example.com")}

    def compute(self, row, ctx):
        return {"email": row["name"].lower() + "@" + self.args["domain"]}


class FillKind(Job):
    table = "people"
    key = ("id",)
    columns = {"kind": Promote(unknown=["unknown"])}
    source = "SELECT id, name, kind FROM people"

    def compute(self, row, ctx):
        return {"kind": "even" if row["id"] % 2 == 0 else "odd"}
'''


@pytest.fixture
def jobs_file(tmp_path: Path) -> Path:
    """A jobs.py with FillEmail, OverwriteEmail and FillKind on the people table."""
    path = tmp_path / "jobs.py"
    path.write_text(JOBS)
    return path
