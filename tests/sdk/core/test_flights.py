from __future__ import annotations

import asyncio

import pytest
from sluicegate.core.flights import Flights


def test_callers_of_any_key_share_one_task_which_leaves_when_it_ends() -> None:
    async def scenario() -> None:
        flights: Flights[str, int] = Flights()
        started = 0
        gate = asyncio.Event()

        async def work() -> int:
            nonlocal started
            started += 1
            await gate.wait()
            return 7

        task = flights.start(["a", "b"], work())
        assert flights.get("a") is task
        assert flights.get("b") is task
        assert "c" not in flights
        gate.set()
        assert await task == 7
        await asyncio.sleep(0)
        assert started == 1
        assert "a" not in flights
        assert "b" not in flights

        async def fail() -> int:
            raise RuntimeError("store down")

        failing = flights.start(["a"], fail())
        with pytest.raises(RuntimeError):
            await failing
        await asyncio.sleep(0)
        assert flights.get("a") is None, "a failed flight does not stay in the table"

        # A newer flight for a key is not removed when an older one ends.
        first = flights.start(["k"], asyncio.sleep(0.01, result=1))
        second = flights.start(["k"], asyncio.sleep(0.05, result=2))
        await first
        await asyncio.sleep(0)
        assert flights.get("k") is second
        await second

    asyncio.run(scenario())
