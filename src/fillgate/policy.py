"""Write policies and the preserve guard.

A policy decides, for one column of one row, what to do with a proposed value given the
stored one. Under every policy a NULL, "unknown" or failed new value never replaces a known
stored value: such fields are *preserved* (the silent-corruption guard).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from fillgate.values import format_value


class Decision(StrEnum):
    WRITE = "write"
    UNCHANGED = "unchanged"
    SKIPPED = "skipped"
    DISAGREEMENT = "disagreement"
    PRESERVED = "preserved"


@dataclass(frozen=True)
class Failed:
    """A value the job could not compute (a probe that timed out, a lookup that failed).

    Return ``Failed("why")`` for a column instead of ``None``: it is never written, and the
    reason is kept in the plan so review can see it.
    """

    reason: str = "failed"


class Policy:
    """Base class: how one column may be written."""

    name = "policy"
    _all_known = False  # set by __init__

    def __init__(self, unknown: Iterable[Any] = ()) -> None:
        self.unknown: frozenset[Any] = frozenset(unknown)
        # every value but None and Failed is known: decide() need not ask is_known of a new value
        self._all_known = not self.unknown and type(self).is_known is Policy.is_known

    def is_known(self, value: Any) -> bool:
        """A value that carries information: not NULL, not failed, not an 'unknown' marker."""
        if value is None or isinstance(value, Failed):
            return False
        try:
            return value not in self.unknown
        except TypeError:  # unhashable values are never in the unknown set
            return True

    def decide(self, old: Any, new: Any) -> Decision:
        """Decide what to do with ``new`` given the stored ``old``."""
        if new is not None and self._all_known and not isinstance(new, Failed):  # the common case, in short:
            if old is not None and _same(old, new):  # what the steps below decide for a known new value
                return Decision.UNCHANGED
            return self._known_new(old, new)
        if isinstance(new, Failed):
            return Decision.PRESERVED if self.is_known(old) else Decision.SKIPPED
        if _same(old, new):
            return Decision.UNCHANGED
        if not self.is_known(new):
            # The preserve guard: nothing unknown ever replaces something known.
            if self.is_known(old):
                return Decision.PRESERVED
            return self._unknown_over_unknown(old, new)
        return self._known_new(old, new)

    def _unknown_over_unknown(self, old: Any, new: Any) -> Decision:
        # A NULL stored value may become an explicit "unknown" marker; an unknown marker
        # never becomes NULL or another unknown marker.
        if old is None and new is not None:
            return Decision.WRITE
        return Decision.SKIPPED

    def _known_new(self, old: Any, new: Any) -> Decision:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"policy": self.name}
        if self.unknown:
            out["unknown"] = sorted(map(format_value, self.unknown))  # as fillgate shows values
        return out

    def __repr__(self) -> str:
        if self.unknown:
            return f"{type(self).__name__}(unknown={sorted(self.unknown, key=repr)!r})"
        return f"{type(self).__name__}()"


class FillMissing(Policy):
    """Write only where the stored value is NULL (additive enrichment)."""

    name = "fill_missing"

    def _known_new(self, old: Any, new: Any) -> Decision:
        return Decision.WRITE if old is None else Decision.SKIPPED


class Promote(Policy):
    """Write where the stored value is NULL or unknown; a known, different value is a
    *disagreement*: recorded, never flipped."""

    name = "promote"

    def __init__(self, unknown: Iterable[Any] = ("unknown",)) -> None:
        super().__init__(unknown)

    def _known_new(self, old: Any, new: Any) -> Decision:
        if not self.is_known(old):
            return Decision.WRITE
        return Decision.DISAGREEMENT


class Overwrite(Policy):
    """Write whenever the value differs (the explicit reconcile backfill)."""

    name = "overwrite"

    def _known_new(self, old: Any, new: Any) -> Decision:
        return Decision.WRITE


def _same(old: Any, new: Any) -> bool:
    if old is None or new is None:
        return old is new
    try:
        return bool(old == new) or (old != old and new != new)  # NaN is stored as NaN: unchanged
    except Exception:
        return False
