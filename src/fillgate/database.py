"""Engines for targets: the only way fillgate opens a database."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from fillgate.config import Target
from fillgate.errors import ConfigError
from fillgate.redact import mask_secrets

_engines: dict[tuple[str, str], Engine] = {}
_lock = threading.Lock()

# The attribute that marks an engine as belonging to a target (used by the run guard).
TARGET_ATTR = "_fillgate_target"


def _sqlite_setup(engine: Engine) -> None:
    """Make pysqlite's transactions real (SAVEPOINT works inside them).

    This is SQLAlchemy's documented recipe: disable the driver's own transaction handling
    and emit BEGIN ourselves.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cur = dbapi_connection.cursor()
        cur.execute("PRAGMA busy_timeout = 10000")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN")


def engine_for(target: Target) -> Engine:
    """The (cached) engine of ``target``."""
    cache_key = (target.name, target.url.render_as_string(hide_password=False))
    with _lock:
        engine = _engines.get(cache_key)
        if engine is None:
            kwargs: dict[str, Any] = {}
            if target.dialect != "sqlite":
                kwargs.update(pool_pre_ping=True, pool_size=5, max_overflow=5)
            engine = create_engine(target.url, **kwargs)
            if target.dialect == "sqlite":
                _sqlite_setup(engine)
            setattr(engine, TARGET_ATTR, target.name)
            _engines[cache_key] = engine
        return engine


def missing_sqlite_file(target: Target) -> Path | None:
    """The file of a SQLite target that does not exist yet (connecting would create it)."""
    database = target.url.database
    if target.dialect != "sqlite" or not database or database == ":memory:" or target.url.query.get("uri"):
        return None
    path = Path(database)
    return None if path.exists() else path


def check_reachable(target: Target, create: bool = False) -> Engine:
    """Open ``target`` and fail with a clear message if it cannot be reached. A SQLite file
    that does not exist is an error unless ``create`` (init): a typo never conjures a file."""
    missing = None if create else missing_sqlite_file(target)
    if missing is not None:
        raise ConfigError(
            f"cannot connect to target '{target.name}' ({target.safe_url}): the SQLite file {missing} "
            f"does not exist. Check the target's url, or create it with: fillgate init --target {target.name}"
        )
    engine = engine_for(target)
    try:
        with engine.connect():
            pass
    except (OperationalError, DBAPIError) as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise ConfigError(
            f"cannot connect to target '{target.name}' ({target.safe_url}): {mask_secrets(reason)}"
        ) from None
    except (TypeError, ValueError) as exc:  # the driver refused a query parameter of the url
        raise ConfigError(
            f"cannot connect to target '{target.name}' ({target.safe_url}): the driver refused the url's "
            f"parameters: {mask_secrets(str(exc))}"
        ) from None
    return engine


def dispose_all() -> None:
    """Close every pooled connection (tests, and before a process exits)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
