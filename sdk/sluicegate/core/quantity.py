"""Byte quantities in the Kubernetes grammar (``512Mi``, ``2G``, ``1.5Gi``): one pattern for the CRD's
schema and one parser for every daemon that reads what the CRD accepted."""

from __future__ import annotations

import re

__all__ = ["QUANTITY_PATTERN", "parse_bytes"]

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
_UNITS: dict[str, int] = {"": 1, **_BINARY, **_DECIMAL}
QUANTITY_PATTERN = rf"^[0-9]+(\.[0-9]+)?({'|'.join(u for u in _UNITS if u)})?$"
_MATCH = re.compile(QUANTITY_PATTERN)


def parse_bytes(value: str | int) -> int:
    """Bytes from a quantity or a plain number; ValueError, naming the value, for anything else."""
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value} is negative; a byte quantity is 0 or more")
        return value
    text = value.strip()
    m = _MATCH.match(text)
    if m is None:
        raise ValueError(f"{value!r} is not a byte quantity; write e.g. 536870912, 512Mi or 2Gi")
    unit = m.group(2) or ""
    return int(float(text[: len(text) - len(unit)]) * _UNITS[unit])
