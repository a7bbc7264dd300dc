"""The packed audit batch: finding one row's entries without decoding the batch gives exactly
what decoding the whole batch gives, whatever the keys and values hold."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from fillgate.ledger.store import _dump, find_rows, unpack
from fillgate.values import dumps, encode_key

TRICKY = ['["[', '\\"', '"', "],[", '["[1]",', "é🎉", "\n", "[1]", ""]

values = st.one_of(st.none(), st.integers(), st.sampled_from(TRICKY), st.text(max_size=12))
keys = st.lists(st.one_of(st.integers(-3, 3), st.sampled_from(TRICKY)), min_size=1, max_size=2)


def _batch(items: list[tuple[str, str, str, str, str]], chains: list[str] | None = None) -> Any:
    entries: list[Any] = [list(item) for item in items]
    if chains is not None:
        entries = [[*e, c] for e, c in zip(entries, chains, strict=True)]
    return SimpleNamespace(id=7, run_id="R", table_name="t", source="s", changed_at=None, first_seq=11,
                           n_changes=len(items), chain_sha256="head", changes=_dump(entries))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(keys, st.sampled_from(["a", "b", '"c"']), values, values), min_size=1, max_size=8),
       st.booleans())
def test_find_rows_is_unpack_filtered_by_key(changes: list[tuple[Any, ...]], chained: bool) -> None:
    items = [(encode_key(k), column, "update", dumps(old), dumps(new)) for k, column, old, new in changes]
    batch = _batch(items, [f"c{i}" for i in range(len(items))] if chained else None)
    every = list(unpack(batch))
    assert [r.seq for r in every] == list(range(11, 11 + len(items)))
    assert every[-1].chain_sha256 == (f"c{len(items) - 1}" if chained else "head")
    for key in {item[0] for item in items} | {encode_key(["absent"])}:
        assert sorted(find_rows(batch, [key])) == sorted(r for r in every if r.row_key == key)


def test_a_batch_not_written_by_fillgate_is_decoded_in_full() -> None:
    batch = _batch([(encode_key([1]), "a", "update", "null", "1")])
    batch.changes = json.dumps([[encode_key([1]), "a", "update", "null", "1"]])  # spaces: not fillgate's text
    assert [r.new_value for r in find_rows(batch, [encode_key([1])])] == ["1"]
