"""Engines for targets: the only way fillgate opens a database."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from fillgate.backends import backend_for
from fillgate.backends.base import WRITES
from fillgate.config import Target
from fillgate.errors import ConfigError
from fillgate.redact import mask_secrets

_engines: dict[tuple[str, str], Engine] = {}
_lock = threading.Lock()

# The attribute that marks an engine as belonging to a target (used by the run guard).
TARGET_ATTR = "_fillgate_target"


def engine_for(target: Target) -> Engine:
    """The (cached) engine of ``target``."""
    cache_key = (target.name, target.url.render_as_string(hide_password=False))
    with _lock:
        engine = _engines.get(cache_key)
        if engine is None:
            backend = backend_for(target.dialect)
            engine = create_engine(target.url, **backend.engine_options())
            backend.prepare_engine(engine)
            setattr(engine, TARGET_ATTR, target.name)
            _engines[cache_key] = engine
        return engine


@contextmanager
def write_transaction(engine: Engine, timeout_s: float | None = None) -> Iterator[Connection]:
    """A transaction that will write (a batch: data, audit, checkpoint): on SQLite it takes the
    write lock when it begins, so it waits out another writer instead of failing. With
    ``timeout_s``, a statement of the transaction still running after that many seconds is
    cancelled (the backend's statement timeout; ``Backend.is_timeout`` knows its error)."""
    with engine.connect().execution_options(**{WRITES: True}) as conn:
        backend = backend_for(engine) if timeout_s else None
        try:
            with conn.begin():
                if backend is not None and timeout_s:
                    backend.set_batch_timeout(conn, timeout_s)
                yield conn
        finally:
            if backend is not None and not conn.invalidated:
                try:
                    backend.clear_batch_timeout(conn)
                except DBAPIError:  # the pool must not hand out a session with the timeout still set
                    conn.invalidate()


@contextmanager
def trial_transaction(engine: Engine, timeout_s: float | None = None) -> Iterator[Connection]:
    """A write transaction that is always rolled back, whatever happens inside (a trial batch)."""
    with engine.connect().execution_options(**{WRITES: True}) as conn:
        backend = backend_for(engine)
        tx = conn.begin()
        try:
            if timeout_s:
                backend.set_batch_timeout(conn, timeout_s)
            yield conn
        finally:
            tx.rollback()
            if timeout_s and not conn.invalidated:
                try:
                    backend.clear_batch_timeout(conn)
                except DBAPIError:
                    conn.invalidate()


def missing_database_file(target: Target) -> Path | None:
    """The file of a file database (SQLite) that does not exist yet: connecting would create it."""
    return backend_for(target.dialect).missing_file(target.url)


def check_reachable(target: Target, create: bool = False) -> Engine:
    """Open ``target`` and fail with a clear message if it cannot be reached. A SQLite file
    that does not exist is an error unless ``create`` (init): a typo never conjures a file."""
    missing = None if create else missing_database_file(target)
    if missing is not None:
        raise ConfigError(
            f"cannot connect to target '{target.name}' ({target.safe_url}): the SQLite file {missing} "
            f"does not exist. Check the target's url, or create it with: fillgate init --target {target.name}"
        )
    engine = engine_for(target)
    try:
        with engine.connect() as conn:
            backend_for(target.dialect).check_connection(conn)
    except (OperationalError, DBAPIError) as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise ConfigError(
            f"cannot connect to target '{target.name}' ({target.safe_url}): {mask_secrets(reason)}"
        ) from None
    except Exception as exc:  # the driver failed on the url itself (a query parameter it cannot use)
        params = ", ".join(sorted(target.url.query)) or "none"
        raise ConfigError(
            f"cannot connect to target '{target.name}' ({target.safe_url}): the driver refused the url "
            f"(its parameters: {params}): {type(exc).__name__}: {mask_secrets(str(exc))}"
        ) from None
    return engine


def dispose_all() -> None:
    """Close every pooled connection (tests, and before a process exits)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
