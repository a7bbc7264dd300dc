"""A database's stamp read through its driver alone, before SQLAlchemy and the rest of
fillgate are imported: the command line refuses a target whose database is stamped as another
environment in a fraction of the time a full connect takes (docs/performance.md, "A fast CLI
start").

This only ever *refuses early*. When the stamp cannot be read this way (no ledger, a URL form
or option it does not know, a driver that is not installed, a server that does not answer
within two seconds, any error at all), it says nothing and the full check of
:func:`fillgate.stamp.connect` decides, as it always does afterwards too. It writes nothing:
SQLite files are opened read-only, and a server gets one SELECT in an autocommit session.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote, unquote

from fillgate.errors import StampMismatchError

CONNECT_TIMEOUT_S = 2
_QUERY = "SELECT value FROM fillgate_meta WHERE name = 'environment'"

# SQLAlchemy's own URL grammar (sqlalchemy.engine.url._parse_url), so that the database read
# here is the one the full connect reaches
_URL = re.compile(
    r"""
        (?P<name>[\w\+]+)://
        (?:
            (?P<username>[^:/]*)
            (?::(?P<password>[^@]*))?
        @)?
        (?:
            (?:
                \[(?P<ipv6host>[^/\?]+)\] |
                (?P<ipv4host>[^/:\?]+)
            )?
            (?::(?P<port>[^/\?]*))?
        )?
        (?:/(?P<database>[^\?]*))?
        (?:\?(?P<query>.*))?
    """,
    re.X,
)


def check_stamp(target_name: str, environment: str, stamped: str | None) -> None:
    """The stamp check itself: the database must be stamped with the target's environment."""
    if stamped != environment:
        raise StampMismatchError(
            f"target '{target_name}' points at a database stamped '{stamped}', but the target "
            f"declares environment '{environment}'. Nothing was done. Check the target's "
            "url; if the stamp itself is wrong, re-stamp with: "
            f"fillgate init --target {target_name} --force-stamp"
        )


def refuse_if_stamped_otherwise(target_name: str, environment: str, url: str) -> None:
    """Raise :class:`StampMismatchError` when the database at ``url`` could be read and is
    stamped as another environment than ``environment``; otherwise do nothing."""
    stamped = stamped_environment(url)
    if stamped is not None:
        check_stamp(target_name, environment, stamped)


def stamped_environment(url: str) -> str | None:
    """The environment the database at ``url`` is stamped with, or None when it cannot be
    read through the driver alone (the full connect then decides)."""
    found = _URL.fullmatch(url)
    if found is None or found["query"] is not None:  # driver options: left to the full connect
        return None
    parts = {k: (unquote(v) if v is not None and k in ("username", "password", "database") else v)
             for k, v in found.groupdict().items()}
    kind = parts["name"].partition("+")[0].lower()
    try:
        if kind == "sqlite":
            return _sqlite(parts)
        if kind in ("postgresql", "postgres"):
            return _postgresql(parts)
        if kind in ("mysql", "mariadb"):
            return _mysql(parts)
    except Exception:  # anything at all: the full connect decides (and reports it)
        return None
    return None


def _host(parts: dict[str, Any]) -> str | None:
    host = parts["ipv4host"] or parts["ipv6host"]
    return str(host) if host else None


def _login(parts: dict[str, Any], database: str) -> dict[str, Any]:
    """A server driver's connect arguments from the URL's parts (``database``: the driver's
    name for it); a part the URL leaves out is left to the driver's default, as SQLAlchemy does."""
    given = {"host": _host(parts), "port": int(parts["port"]) if parts["port"] else None,
             "user": parts["username"], "password": parts["password"], database: parts["database"]}
    return {k: v for k, v in given.items() if v is not None}


def _sqlite(parts: dict[str, Any]) -> str | None:
    import sqlite3

    path = parts["database"]
    if _host(parts) or not path or path == ":memory:" or path.startswith("file:"):
        return None
    # mode=ro: a missing file is an error, never created; nothing is written
    raw = sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True, timeout=CONNECT_TIMEOUT_S)
    try:
        row = raw.execute(_QUERY).fetchone()
    finally:
        raw.close()
    return None if row is None else str(row[0])


def _postgresql(parts: dict[str, Any]) -> str | None:
    import psycopg

    with psycopg.connect(**_login(parts, "dbname"), autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as raw:
        row = raw.execute(_QUERY).fetchone()
    return None if row is None else str(row[0])


def _mysql(parts: dict[str, Any]) -> str | None:
    import pymysql  # type: ignore[import-untyped]  # no stubs shipped

    raw = pymysql.connect(**_login(parts, "database"), connect_timeout=CONNECT_TIMEOUT_S, autocommit=True)
    try:
        with raw.cursor() as cursor:
            cursor.execute(_QUERY)
            row = cursor.fetchone()
    finally:
        raw.close()
    return None if row is None else str(row[0])
