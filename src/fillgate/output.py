"""The command line's output basics: the text of ``--json`` output, and the one line every
error becomes (``error:``, ``refused:`` or ``interrupted:`` on stderr; with ``--json`` also a
JSON object on stdout). Kept apart from :mod:`fillgate.report`, which imports the whole
library, so that a refusal or a usage error is printed without loading SQLAlchemy."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from rich.console import Console
from rich.markup import escape

from fillgate.errors import EXIT_INTERRUPTED, EXIT_REFUSED
from fillgate.redact import mask_secrets


def to_json(data: Any) -> str:
    """fillgate's ``--json`` output: indented, datetimes in ISO 8601 (naive ones are UTC: ``Z``)."""
    def default(value: Any) -> Any:
        if isinstance(value, dt.datetime):
            return value.isoformat() + ("Z" if value.tzinfo is None else "")
        if isinstance(value, dt.date | dt.time):
            return value.isoformat()
        return str(value)

    return json.dumps(data, default=default, indent=2, sort_keys=False)


def error_prefix(exit_code: int) -> str:
    """``refused:`` for a guard's refusal (exit 3), ``interrupted:`` for Ctrl-C (exit 130),
    ``error:`` for everything else."""
    return {EXIT_REFUSED: "refused:", EXIT_INTERRUPTED: "interrupted:"}.get(exit_code, "error:")


# control characters a message may carry from a file or a value (a column named "\n"): shown
# as escapes, so that an error is always one line
_VISIBLE = {c: f"\\x{c:02x}" for c in range(32) if chr(c) != "\t"} | {10: "\\n", 13: "\\r", 0x7F: "\\x7f"}


def print_error(console: Console, exit_code: int, message: str) -> None:
    """The one line every error becomes (passwords masked, control characters as escapes)."""
    line = mask_secrets(message).translate(_VISIBLE)
    console.print(f"[bold red]{error_prefix(exit_code)}[/] {escape(line)}", soft_wrap=True)


def error_json(exit_code: int, kind: str, message: str) -> dict[str, Any]:
    """What ``--json`` prints on stdout for an error."""
    return {"error": {"type": kind, "exit_code": exit_code, "message": mask_secrets(message)}}
