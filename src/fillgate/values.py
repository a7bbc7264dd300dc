"""Lossless JSON encoding of column values and row keys.

Plans and the audit log store values as JSON. Types JSON lacks are tagged so they come back
as the same Python value: ``{"$datetime": ...}``, ``{"$date": ...}``, ``{"$time": ...}``,
``{"$timedelta": ...}``, ``{"$decimal": ...}``, ``{"$bytes": <base64>}``, ``{"$uuid": ...}``, and
the floats JSON has no literal for, ``{"$float": "NaN"}``, ``"Infinity"`` and ``"-Infinity"`` (so
every line is strict JSON).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import decimal
import json
import math
import re
import uuid
from collections.abc import Mapping, Sequence
from json.encoder import encode_basestring
from typing import Any

from orjson import loads as _fast_loads

from fillgate.errors import UsageError


def _default(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return {"$datetime": value.isoformat()}
    if isinstance(value, dt.date):
        return {"$date": value.isoformat()}
    if isinstance(value, dt.time):
        return {"$time": value.isoformat()}
    if isinstance(value, dt.timedelta):
        return {"$timedelta": str(value)}
    if isinstance(value, decimal.Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, uuid.UUID):
        return {"$uuid": str(value)}
    raise UsageError(
        f"value {value!r} of type {type(value).__name__} cannot be stored in a plan; "
        "return str, int, float, bool, None, date/datetime/time/timedelta, Decimal, bytes or UUID."
    )


_TIMEDELTA = re.compile(r"(?:(-?\d+) days?, )?(\d+):(\d\d):(\d\d)(?:\.(\d{6}))?")


def _timedelta(text: str) -> dt.timedelta:
    """The inverse of ``str(timedelta)``: ``[-]D day[s], H:MM:SS[.ffffff]``."""
    match = _TIMEDELTA.fullmatch(text)
    if match is None:
        raise ValueError(f"not a timedelta: {text!r}")
    days, hours, minutes, seconds, micros = match.groups()
    return dt.timedelta(days=int(days or 0), hours=int(hours), minutes=int(minutes), seconds=int(seconds),
                        microseconds=int(micros or 0))


_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _float_tag(value: float) -> dict[str, str]:
    return {"$float": "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")}


def _tag_nonfinite(value: Any) -> Any:
    """``value`` with every NaN or infinity inside it replaced by its ``$float`` tag."""
    if type(value) is float:
        return value if math.isfinite(value) else _float_tag(value)
    if isinstance(value, dict):
        return {k: _tag_nonfinite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_tag_nonfinite(v) for v in value]
    return value


_DECODERS = {
    "$datetime": dt.datetime.fromisoformat,
    "$date": dt.date.fromisoformat,
    "$time": dt.time.fromisoformat,
    "$timedelta": _timedelta,
    "$float": lambda s: _NONFINITE[s],
    "$decimal": decimal.Decimal,
    "$bytes": lambda s: base64.b64decode(s.encode("ascii")),
    "$uuid": uuid.UUID,
}


def _hook(obj: dict[str, Any]) -> Any:
    if len(obj) == 1:
        ((tag, raw),) = obj.items()
        decoder = _DECODERS.get(tag)
        if decoder is not None:
            try:
                return decoder(raw)  # type: ignore[no-untyped-call]  # (decoders of mixed signatures)
            except (ValueError, TypeError, KeyError, ArithmeticError) as exc:
                raise ValueError(f"{tag} value {raw!r} is malformed ({exc!r})") from None
    return obj


# allow_nan=False: a NaN or an infinity raises, and dumps tags it instead
_encoder = json.JSONEncoder(default=_default, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
_decoder = json.JSONDecoder(object_hook=_hook)
_plain_decoder = json.JSONDecoder()


def dumps(value: Any) -> str:
    """Compact JSON; scalars take a fast path with exactly the encoder's output."""
    kind = type(value)
    if kind is str:
        return encode_basestring(value)
    if kind is int:
        return int.__repr__(value)
    if value is None:
        return "null"
    if kind is float:
        return float.__repr__(value) if math.isfinite(value) else _encoder.encode(_float_tag(value))
    try:
        return _encoder.encode(value)
    except ValueError:  # a NaN or an infinity inside a list or dict
        return _encoder.encode(_tag_nonfinite(value))


def loads(text: str) -> Any:
    """JSON back to Python values; only text holding a ``"$`` tag pays for the tag hook.

    The C scanner is called directly (a plan is decoded line by line, millions of times);
    anything unusual (leading whitespace, trailing data, bad JSON) takes ``decode`` for its
    exact error message."""
    decoder = _decoder if '"$' in text else _plain_decoder
    try:
        value, end = decoder.scan_once(text, 0)  # type: ignore[attr-defined]  # set by JSONDecoder.__init__
    except (StopIteration, ValueError):
        return decoder.decode(text)
    if end != len(text) and text[end:].strip():
        return decoder.decode(text)
    return value


_CHANGE_PARTS = ('{"kind":"change","key":', ',"column":', ',"old":', ',"new":')


def scan_change_line(line: str) -> tuple[Any, ...] | None:
    """A plan's change line as ``PlanWriter.change`` writes it, ``{"kind":"change","key":K,
    "column":C,"old":O,"new":N}``, decoded: ``(key, column, old, new, key_text, old_text,
    new_text)``, the texts as fillgate writes them (what the audit log stores). None for any
    other line (decode it with ``loads``).

    A line of plain JSON (no tagged value) is decoded by orjson, about a microsecond less per
    line than Python's scanner, and its texts encoded again; they are used only if together
    they make up the very line (as they do for every line ``PlanWriter.change`` wrote of values
    JSON carries exactly). Anything else (a tagged value, an integer past 64 bits, which orjson
    reads as a float, a lone surrogate, which it refuses) takes the scanner, which keeps each
    text exactly as the line holds it."""
    if '"$' not in line and line.startswith(_CHANGE_PARTS[0]):
        try:
            record = _fast_loads(line)
        except ValueError:  # orjson.JSONDecodeError
            record = None
        if type(record) is dict and len(record) == 5:
            key, column = record.get("key"), record.get("column")
            if type(key) is list and key and type(column) is str and "old" in record and "new" in record:
                old, new = record["old"], record["new"]
                # dumps(), inlined for the commonest values: this runs once per planned change
                old_text = "null" if old is None else encode_basestring(old) if type(old) is str else dumps(old)
                new_text = "null" if new is None else encode_basestring(new) if type(new) is str else dumps(new)
                key_text = encode_key(key)
                # taken only if the texts make up the very line (orjson reads an integer past 64
                # bits as a float, for one): anything else is read by the scanner
                if line == (f'{_CHANGE_PARTS[0]}{key_text}{_CHANGE_PARTS[1]}{encode_basestring(column)}'
                            f'{_CHANGE_PARTS[2]}{old_text}{_CHANGE_PARTS[3]}{new_text}}}\n'):
                    return tuple(key), column, old, new, key_text, old_text, new_text
    decoder = _decoder if '"$' in line else _plain_decoder
    scan = decoder.scan_once  # type: ignore[attr-defined]  # set by JSONDecoder.__init__
    out: list[Any] = []
    spans: list[str] = []
    at = 0
    try:
        for part in _CHANGE_PARTS:
            if not line.startswith(part, at):
                return None
            start = at + len(part)
            value, at = scan(line, start)
            out.append(value)
            spans.append(line[start:at])
    except (StopIteration, ValueError):
        return None
    if line[at:].rstrip("\r\n") != "}" or type(out[0]) is not list or type(out[1]) is not str:
        return None
    return (tuple(out[0]), out[1], out[2], out[3], spans[0], spans[2], spans[3])


def encode_key(key: Sequence[Any]) -> str:
    """The canonical text of a row key, as stored in plans and the audit log."""
    if len(key) == 1:
        return "[" + dumps(key[0]) + "]"
    return dumps(list(key))


def decode_key(text: str) -> tuple[Any, ...]:
    return tuple(loads(text))


def key_candidates(raw: str) -> list[str]:
    """Encoded keys a user-typed key may mean: ``42``, ``a,b`` or a JSON list ``[1, "x"]``.

    A part that looks like a number may be stored as a number or as text, so every reading
    is returned; the audit log decides which one exists.
    """
    raw = raw.strip()
    if raw.startswith("["):
        try:
            _plain_decoder.decode(raw)
        except (ValueError, RecursionError):
            raise UsageError(f"key {raw!r} starts with '[' but is not a JSON list.") from None
        try:
            parsed = loads(raw)
        except (ValueError, TypeError, ArithmeticError, RecursionError) as exc:  # a tag that does not decode
            raise UsageError(f"key {raw!r} holds a value fillgate cannot read: {exc}.") from None
        if not isinstance(parsed, list) or not parsed:
            raise UsageError(f"key {raw!r} must be a non-empty JSON list.")
        return [encode_key(parsed)]
    readings: list[list[Any]] = [[]]
    for part, quoted in split_key(raw):
        options: list[Any] = [part]
        if not quoted:
            try:
                options.insert(0, int(part))
            except ValueError:
                with contextlib.suppress(ValueError):
                    options.insert(0, float(part))
        readings = [[*prefix, option] for prefix in readings for option in options]
    return [encode_key(r) for r in readings]


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'"}


def _quoted_part(raw: str, start: int) -> tuple[str, int] | None:
    """The text of a quoted key part at ``start`` (``'it''s'``, or ``E'a\\nb'`` with escapes, as
    :func:`format_key` writes them) and where it ends; None when it is not one (no closing quote)."""
    escaped = raw.startswith("E'", start)
    i = start + (2 if escaped else 1)
    out: list[str] = []
    while i < len(raw):
        c = raw[i]
        if escaped and c == "\\" and i + 1 < len(raw):
            nxt = raw[i + 1]
            if nxt == "x" and i + 3 < len(raw):
                with contextlib.suppress(ValueError):
                    out.append(chr(int(raw[i + 2:i + 4], 16)))
                    i += 4
                    continue
            out.append(_ESCAPES.get(nxt, nxt))
            i += 2
        elif c == "'" and not escaped and raw.startswith("''", i):
            out.append("'")
            i += 2
        elif c == "'":
            return "".join(out), i + 1
        else:
            out.append(c)
            i += 1
    return None


def split_key(raw: str) -> list[tuple[str, bool]]:
    """The parts of a typed key ``42, 'a,b', E'x\\ty'``: (text, quoted). A part quoted as
    :func:`format_key` shows it (a SQL literal, which may hold commas) is text; a bare part may
    also be a number. A quote that does not close is part of a bare part (``O'Brien``)."""
    parts: list[tuple[str, bool]] = []
    i, n = 0, len(raw)
    while True:
        while i < n and raw[i] == " ":
            i += 1
        found = _quoted_part(raw, i) if raw.startswith(("'", "E'"), i) else None
        if found is not None:
            after = found[1]
            while after < n and raw[after] == " ":
                after += 1
            if after == n or raw[after] == ",":
                parts.append((found[0], True))
                if after == n:
                    return parts
                i = after + 1
                continue
        end = raw.find(",", i)
        parts.append((raw[i:n if end < 0 else end].strip(), False))
        if end < 0:
            return parts
        i = end + 1


# --- values: one way to show them (the CLI, the dashboard, plan headers) ---------------------

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_WORDS = {"null", "true", "false", "nan", "infinity", "-infinity", "+infinity"}


def quoted(text: str) -> str:
    """A SQL string literal: 'it''s'; with control characters, an escape string E'a\\nb'."""
    if not any(ord(c) < 32 or 127 <= ord(c) < 160 for c in text):
        return "'" + text.replace("'", "''") + "'"
    escaped = text.replace("\\", "\\\\").replace("'", "\\'")
    escaped = "".join({"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(c) or
                      (f"\\x{ord(c):02x}" if ord(c) < 32 or 127 <= ord(c) < 160 else c) for c in escaped)
    return "E'" + escaped + "'"


def _needs_quotes(text: str) -> bool:
    """A string that would read as something else when shown bare: empty, NULL, a number, a
    boolean, JSON, padded with spaces, holding control characters, or starting with a quote."""
    return (
        not text or text.strip() != text or text.lower() in _WORDS or bool(_NUMBER.match(text))
        or text[0] in "'[{" or text.startswith(("\\x", "E'"))
        or any(ord(c) < 32 or 127 <= ord(c) < 160 for c in text)
    )


def _interval(value: dt.timedelta) -> str:
    """A timedelta as PostgreSQL shows an interval: ``400 days 00:00:05``, ``-01:30:00``,
    ``1 day 00:00:00.250000`` (not Python's ``400 days, 0:00:05``)."""
    micros = abs(value) // dt.timedelta(microseconds=1)
    days, rest = divmod(micros, 86_400_000_000)
    seconds, fraction = divmod(rest, 1_000_000)
    clock = f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    clock += f".{fraction:06d}" if fraction else ""
    sign = "-" if value < dt.timedelta(0) else ""
    return f"{sign}{days} day{'s' if days != 1 else ''} {clock}" if days else f"{sign}{clock}"


def format_value(value: Any) -> str:
    """A column value as the database would show it, whole: NULL, 42, 1.20 (a Decimal keeps
    its digits), 2013-01-01 05:17:00, \\x00ff (bytes), true; a string bare unless it would
    read as something else (then quoted as a SQL literal: '42', 'NULL', '', ' padded')."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return repr(value)
    if isinstance(value, decimal.Decimal):
        return format(value, "f") if value.is_finite() else str(value)
    if isinstance(value, dt.datetime):
        return value.isoformat(" ")
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return _interval(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return "\\x" + bytes(value).hex()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, str):
        return quoted(value) if _needs_quotes(value) else value
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value, ensure_ascii=False, default=format_value)
    return str(value)


def in_words(value: Any) -> str:
    """A value inside a sentence (an error or conflict message): as :func:`format_value` shows
    it, a string always quoted as a SQL literal so that it reads apart from the words around it."""
    return quoted(value) if isinstance(value, str) else format_value(value)


def format_key(key: Sequence[Any]) -> str:
    """A row key, each part as :func:`format_value` shows it; a part holding a comma is
    quoted so that the parts stay apart."""
    parts = []
    for part in key:
        text = format_value(part)
        parts.append(quoted(text) if "," in text and not text.startswith(("'", "E'")) else text)
    return ", ".join(parts)


def format_policy(described: Any) -> str:
    """A column's policy as a plan header records it (``Policy.describe``), as text:
    ``promote (unknown: 'unknown', 0)``. Anything else (a hand-edited header) is shown as JSON."""
    if isinstance(described, Mapping) and isinstance(described.get("policy"), str):
        extra = {k: v for k, v in described.items() if k != "policy"}
        unknown = extra.pop("unknown", None)
        parts = []
        if isinstance(unknown, list) and all(isinstance(u, str) for u in unknown):
            parts.append("unknown: " + ", ".join(unknown))
        elif unknown is not None:
            extra["unknown"] = unknown
        parts += [f"{k}: {format_value(v)}" for k, v in extra.items()]
        return str(described["policy"]) + (f" ({'; '.join(parts)})" if parts else "")
    return json.dumps(described, ensure_ascii=False, default=str)
