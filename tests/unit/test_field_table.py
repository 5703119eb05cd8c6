"""bridge.field_table writes table entries exactly as pika's `encode_table` does, and
reads them back; what it cannot write, it leaves to pika (None)."""

from __future__ import annotations

import pika
import pytest
from hypothesis import given, settings, strategies as st

from bridge import field_table

_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=80)   # no lone surrogates
_scalars = st.one_of(_text, st.booleans(), st.integers(-2**63, 2**63 - 1))
_values = st.one_of(_scalars, st.lists(_scalars, max_size=5))
_headers = st.dictionaries(st.text(st.characters(exclude_categories=("Cs",)), min_size=1,
                                   max_size=60), _values, max_size=8)


def pika_table(headers: dict) -> bytes:
    pieces: list[bytes] = []
    pika.data.encode_table(pieces, headers)
    return b"".join(pieces)


@settings(max_examples=300, deadline=None)
@given(_headers)
def test_a_table_is_pikas_and_reads_back(headers):
    assert field_table.table(field_table.entries(headers)) == pika_table(headers)
    assert field_table.decode(field_table.entries(headers)) == headers


@pytest.mark.parametrize("value", [None, b"bytes", 1.5, {"a": 1}, [None], 2**63, -2**63 - 1,
                                   ["ok", b"not"]])
def test_a_value_it_does_not_write_is_left_to_pika(value):
    assert field_table.value(value) is None
    assert field_table.entries({"a": "b", "k": value}) is None


def test_a_name_over_255_bytes_is_left_to_pika():
    assert field_table.entry("é" * 128, "v") is None          # 256 bytes in UTF-8
    assert field_table.entry("é" * 127 + "e", "v") is not None


def test_decode_refuses_a_type_it_never_writes():
    raw = field_table.name("f") + b"d" + b"\x00" * 8            # a double
    with pytest.raises(ValueError, match="field type 'd'"):
        field_table.decode(raw)
