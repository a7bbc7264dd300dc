"""Per-database behaviour, one module per backend (see ``base.Backend``).

``backend_for(engine)`` returns the backend of an engine, a connection, a dialect or a dialect
name; adding a database means adding a module here and listing its class below.
"""

from __future__ import annotations

from typing import Any

from fillgate.backends.base import PROBE, Backend, ColumnType, Unstorable, ValueChecker, same_value
from fillgate.backends.mysql import MySQLBackend
from fillgate.backends.postgresql import PostgreSQLBackend
from fillgate.backends.sqlite import SQLiteBackend

BACKENDS: tuple[type[Backend], ...] = (SQLiteBackend, PostgreSQLBackend, MySQLBackend)

_instances: dict[str, Backend] = {}

__all__ = [
    "BACKENDS", "PROBE", "Backend", "ColumnType", "MySQLBackend", "PostgreSQLBackend", "SQLiteBackend",
    "Unstorable", "ValueChecker", "backend_for", "same_value", "supported_dialects", "url_drivers",
]


def backend_for(thing: Any) -> Backend:
    """The backend of an Engine, a Connection, a Dialect, or a dialect name (``"sqlite"``,
    ``"postgresql"``, ``"mysql"``, ``"mariadb"``)."""
    if isinstance(thing, str):
        name = thing
    else:
        dialect = getattr(thing, "dialect", thing)
        found = getattr(dialect, "name", None)
        if not isinstance(found, str):
            raise TypeError(f"no database dialect in {thing!r}")
        name = found
    backend = _instances.get(name)
    if backend is None:
        cls = next((c for c in BACKENDS if name in c.dialects), None)
        if cls is None:
            raise ValueError(f"fillgate has no backend for the {name!r} dialect")
        backend = _instances[name] = cls()
    return backend


def supported_dialects() -> tuple[str, ...]:
    """Every SQLAlchemy dialect name fillgate has a backend for."""
    return tuple(name for cls in BACKENDS for name in cls.dialects)


def url_drivers() -> dict[str, tuple[str, str, str]]:
    """URL schemes that name only the database kind, and the driver fillgate gives them:
    ``{"postgresql": ("postgresql+psycopg", "psycopg", "postgres"), ...}`` (SQLAlchemy driver,
    Python module, the extra that installs it)."""
    return {scheme: driver for cls in BACKENDS for scheme, driver in cls.drivers.items()}
