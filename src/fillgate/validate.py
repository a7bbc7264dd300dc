"""A small typed validator for the documents fillgate reads: plan headers and fillgate.toml.

A schema maps each field name to a :class:`Field` (its type, whether it is required, and
any rule on its value). :func:`validate` checks a parsed document against it and raises the
caller's error class with one message naming the document, the field, what it must be and
what it is. Strings anywhere in the document must be valid Unicode text (no lone surrogates,
which JSON's ``\\ud800`` escapes can smuggle in and no output could print).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fillgate.errors import FillgateError

ULID = re.compile(r"^[0-7][0-9A-HJKMNP-TV-Z]{25}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")

# Python types -> what a user calls them in a message
_NAMES: dict[type, str] = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
                           list: "a list", dict: "a table", type(None): "null"}


def kind_of(value: Any) -> str:
    """What ``value`` is, as a user would call it (never the value itself: it may be huge)."""
    for kind in (bool, int, float, str, list, dict, type(None)):  # bool before int
        if isinstance(value, kind):
            return _NAMES[kind]
    return type(value).__name__


@dataclass(frozen=True)
class Field:
    """One field: its type (``items``: the type of a list's elements or a table's values),
    whether it is required, and a rule returning what is wrong with a value (or None)."""

    kind: type
    required: bool = True
    items: type | None = None
    rule: Callable[[Any], str | None] | None = None

    def describe(self) -> str:
        if self.items is None:
            return _NAMES.get(self.kind, self.kind.__name__)
        plural = {str: "strings", int: "integers", bool: "booleans"}.get(self.items, self.items.__name__)
        return f"{_NAMES[self.kind]} of {plural}"


def _is(value: Any, kind: type) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, kind)


def has_surrogate(text: str) -> bool:
    """True if ``text`` holds a lone surrogate (not encodable as UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _bad_text(value: Any) -> bool:
    if isinstance(value, str):
        return has_surrogate(value)
    if isinstance(value, dict):
        return any(_bad_text(k) or _bad_text(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_bad_text(v) for v in value)
    return False


def validate(data: Mapping[str, Any], schema: Mapping[str, Field], where: str,
             error: type[FillgateError], hint: str = "") -> None:
    """Check ``data`` against ``schema``; raise ``error`` naming the first problem.
    Keys the schema does not know are the caller's business (it may allow or refuse them)."""
    for name, spec in schema.items():
        if name not in data:
            if spec.required:
                raise error(f"{where} lacks {name} ({spec.describe()}){hint}")
            continue
        value = data[name]
        problem: str | None = None
        if not _is(value, spec.kind):
            problem = f"must be {spec.describe()}, not {kind_of(value)}"
        elif spec.items is not None:
            members = value if isinstance(value, list) else list(value.values())
            bad = [m for m in members if not _is(m, spec.items)]  # a list: the bad member may be None
            if bad or (isinstance(value, dict) and not all(isinstance(k, str) for k in value)):
                problem = f"must be {spec.describe()}, but holds {kind_of(bad[0]) if bad else 'a key that is not text'}"
        if problem is None and _bad_text(value):
            problem = "holds text that is not valid Unicode (a lone surrogate)"
        if problem is None and spec.rule is not None:
            problem = spec.rule(value)
        if problem is not None:
            raise error(f"{where}: {name} {problem}{hint}")


# --- rules ------------------------------------------------------------------------------------


def non_empty(value: Any) -> str | None:
    return "must not be empty" if not value or (isinstance(value, str) and not value.strip()) else None


def non_negative(value: Any) -> str | None:
    return f"must be 0 or more, not {value}" if value < 0 else None


def non_negative_values(value: Mapping[str, int]) -> str | None:
    bad = next((k for k, v in value.items() if v < 0), None)
    return None if bad is None else f"must hold counts of 0 or more ({bad} is {value[bad]})"


def shown(value: str) -> str:
    """A bad value for a message: quoted whole, or (if long) only its length; never cut."""
    return repr(value) if len(value) <= 64 else f"a string of {len(value)} characters"


def matches(pattern: re.Pattern[str], what: str) -> Callable[[Any], str | None]:
    def rule(value: Any) -> str | None:
        return None if pattern.match(value) else f"must be {what}, not {shown(value)}"

    return rule


def one_of(*allowed: Any) -> Callable[[Any], str | None]:
    def rule(value: Any) -> str | None:
        return None if value in allowed else f"must be one of {', '.join(map(str, allowed))}, not {shown(str(value))}"

    return rule


def all_of(*rules: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    def rule(value: Any) -> str | None:
        return next((p for p in (r(value) for r in rules) if p is not None), None)

    return rule
