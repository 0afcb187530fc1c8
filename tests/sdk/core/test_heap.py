"""Freed blob memory stays in the heap while an engine runs and goes back to the kernel when it closes,
observed through glibc's own account of the heap (``mallinfo2``) in a fresh process."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from sluicegate import Store
from sluicegate.core.engine import Engine, EngineConfig, Plan, StoreUpstream, heap

from tests.sidecar.helpers import make_dataset

pytestmark = pytest.mark.skipif(heap._LIBC is None, reason="glibc's mallopt is not here")

# Allocates and frees 300 blobs of 100 KB, then reports the heap's releasable top (keepcost) in bytes.
_PROBE = """
import ctypes, json, os
from sluicegate.core.engine import heap

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info

def churn():
    blobs = [os.urandom(100_000) for _ in range(300)]
    del blobs
    return libc.mallinfo2().keepcost

out = {"default": churn()}
heap.hold(64 * 2**20)
out["held"] = churn()
heap.release(64 * 2**20)
out["released"] = libc.mallinfo2().keepcost
print(json.dumps(out))
"""


def test_freed_blobs_stay_in_the_heap_only_while_held() -> None:
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    top = json.loads(done.stdout)
    assert top["default"] < 8 * 2**20, top  # glibc trims the freed blobs back by default
    assert top["held"] > 25 * 2**20, top  # most of the 30 MB freed stays for the next blobs
    assert top["released"] < 8 * 2**20, top  # the last release trims it


def test_an_engine_holds_its_budget_from_first_fetch_until_closed(tmp_path: Path) -> None:
    make_dataset(str(tmp_path / "ds"), 10, size=1000)
    store = Store(tmp_path / "ds")
    plan = Plan(1, store.manifest(1)[0])
    budget = 7 * 2**20 + 1  # a budget no other engine in this process uses

    async def run() -> tuple[int, int, int]:
        engine = Engine(StoreUpstream(store), EngineConfig(memory_bytes=budget))
        before = heap._held[budget]
        await engine.get_many(plan.refs(range(10)))
        during = heap._held[budget]
        await engine.aclose()
        await engine.aclose()  # closing twice releases once
        return before, during, heap._held[budget]

    assert asyncio.run(run()) == (0, 1, 0)
