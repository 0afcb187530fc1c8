"""One byte-quantity grammar: whatever the CRD's pattern accepts, the daemons parse (and nothing else)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sluicegate.core.quantity import QUANTITY_PATTERN, parse_bytes


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0", 0), ("512Mi", 512 * 2**20), ("2G", 2 * 10**9), ("1.5Gi", 3 * 2**29), ("1Pi", 2**50), ("3k", 3000)],
)
def test_kubernetes_quantities_parse_to_bytes(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected
    assert re.match(QUANTITY_PATTERN, text)


@pytest.mark.parametrize("text", ["", "-1", "12XB", "Mi", "1 Gi", "1e3", "0x10"])
def test_anything_else_is_refused_naming_the_value(text: str) -> None:
    assert not re.match(QUANTITY_PATTERN, text)
    with pytest.raises(ValueError, match="not a byte quantity"):
        parse_bytes(text)


@given(st.from_regex(QUANTITY_PATTERN, fullmatch=True))
def test_every_string_the_crd_accepts_parses(text: str) -> None:
    assert parse_bytes(text) >= 0
