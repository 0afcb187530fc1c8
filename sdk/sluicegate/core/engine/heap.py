"""Keep freed blob memory in the heap while engines run, so the next blob's bytes do not fault in fresh pages.

An uncached epoch allocates every blob anew and frees the blobs the memory tier evicts. By default glibc
hands the heap's free top back to the kernel once it passes a small threshold (M_TRIM_THRESHOLD, 128 KiB
to a few MB). Each new blob then page-faults fresh, zeroed pages before a byte is read into them. On the
engine's own read-and-verify function this costs a third of its speed: 9.3-9.9k items/s of 100 KB
against 14.7-15.8k with the heap kept (3 paired runs over ``bench/gil.py``'s blobs). While engines run,
the threshold is their memory budgets together, which they may hold anyway. When the last one closes,
the threshold goes back to glibc's default and the heap is trimmed. Where there is no glibc, there is no
such knob, and this does nothing.
"""

from __future__ import annotations

import ctypes
import threading
from collections import Counter

__all__ = ["hold", "release"]

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter number
_DEFAULT_TRIM = 128 * 1024  # glibc's default threshold (DEFAULT_TRIM_THRESHOLD)
_MAX = 2**31 - 1  # mallopt takes an int

_lock = threading.Lock()
_held: Counter[int] = Counter()  # budget -> engines holding it


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
    except OSError:  # pragma: no cover - no dynamic C library
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


_LIBC = _libc()


def _set(total: int) -> None:
    assert _LIBC is not None
    _LIBC.mallopt(_M_TRIM_THRESHOLD, min(_MAX, max(_DEFAULT_TRIM, total)))


def hold(budget: int) -> None:
    """An engine with a ``budget``-byte memory tier starts: keep that much more freed heap."""
    if _LIBC is None:
        return
    with _lock:
        _held[budget] += 1
        _set(sum(b * n for b, n in _held.items()))


def release(budget: int) -> None:
    """The engine that called :func:`hold` with ``budget`` closed; the last one trims the heap."""
    if _LIBC is None:
        return
    with _lock:
        if _held[budget] <= 0:
            return
        _held[budget] -= 1
        if _held[budget] == 0:
            del _held[budget]
        _set(sum(b * n for b, n in _held.items()))
        if not _held:
            _LIBC.malloc_trim(0)
