"""Lossless JSON encoding of column values and row keys.

Plans and the audit log store values as JSON. Types JSON lacks are tagged so they come back
as the same Python value: ``{"$datetime": ...}``, ``{"$date": ...}``, ``{"$time": ...}``,
``{"$decimal": ...}``, ``{"$bytes": <base64>}``, ``{"$uuid": ...}``.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import decimal
import json
import uuid
from collections.abc import Sequence
from json.encoder import encode_basestring  # type: ignore[attr-defined]
from typing import Any

from fillgate.errors import UsageError


def _default(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return {"$datetime": value.isoformat()}
    if isinstance(value, dt.date):
        return {"$date": value.isoformat()}
    if isinstance(value, dt.time):
        return {"$time": value.isoformat()}
    if isinstance(value, decimal.Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, uuid.UUID):
        return {"$uuid": str(value)}
    raise UsageError(
        f"value {value!r} of type {type(value).__name__} cannot be stored in a plan; "
        "return str, int, float, bool, None, date/datetime, Decimal, bytes or UUID."
    )


_DECODERS = {
    "$datetime": dt.datetime.fromisoformat,
    "$date": dt.date.fromisoformat,
    "$time": dt.time.fromisoformat,
    "$decimal": decimal.Decimal,
    "$bytes": lambda s: base64.b64decode(s.encode("ascii")),
    "$uuid": uuid.UUID,
}


def _hook(obj: dict[str, Any]) -> Any:
    if len(obj) == 1:
        ((tag, raw),) = obj.items()
        decoder = _DECODERS.get(tag)
        if decoder is not None:
            return decoder(raw)
    return obj


_encoder = json.JSONEncoder(default=_default, ensure_ascii=False, separators=(",", ":"))
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
    return _encoder.encode(value)


def loads(text: str) -> Any:
    """JSON back to Python values; only text holding a ``"$`` tag pays for the tag hook.

    The C scanner is called directly (a plan is decoded line by line, millions of times);
    anything unusual (leading whitespace, trailing data, bad JSON) takes ``decode`` for its
    exact error message."""
    decoder = _decoder if '"$' in text else _plain_decoder
    try:
        value, end = decoder.scan_once(text, 0)
    except (StopIteration, ValueError):
        return decoder.decode(text)
    if end != len(text) and text[end:].strip():
        return decoder.decode(text)
    return value


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
            parsed = loads(raw)
        except ValueError:
            raise UsageError(f"key {raw!r} starts with '[' but is not a JSON list.") from None
        if not isinstance(parsed, list) or not parsed:
            raise UsageError(f"key {raw!r} must be a non-empty JSON list.")
        return [encode_key(parsed)]
    readings: list[list[Any]] = [[]]
    for part in (p.strip() for p in raw.split(",")):
        options: list[Any] = [part]
        try:
            options.insert(0, int(part))
        except ValueError:
            with contextlib.suppress(ValueError):
                options.insert(0, float(part))
        readings = [[*prefix, option] for prefix in readings for option in options]
    return [encode_key(r) for r in readings]
