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
from collections.abc import Sequence
from json.encoder import encode_basestring
from typing import Any

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
    "column":C,"old":O,"new":N}``, decoded in one scan: ``(key, column, old, new, key_text,
    old_text, new_text)``, each text exactly as the line holds it (what the audit log stores:
    nothing is encoded again). None for any other line (decode it with ``loads``)."""
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
    for part in (p.strip() for p in raw.split(",")):
        options: list[Any] = [part]
        try:
            options.insert(0, int(part))
        except ValueError:
            with contextlib.suppress(ValueError):
                options.insert(0, float(part))
        readings = [[*prefix, option] for prefix in readings for option in options]
    return [encode_key(r) for r in readings]
