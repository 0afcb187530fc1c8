"""The webhook's memory of recent answers: yes reused for a while, no never, one call per burst."""

from __future__ import annotations

import asyncio
from functools import partial

import pytest
from sluicegate_operator.webhook import Recent

from tests.clock import Clock


class Lookup:
    """An async lookup that counts its calls and answers what ``answers`` holds for the key."""

    def __init__(self, answers: dict[str, bool], delay_s: float = 0.0) -> None:
        self.answers = answers
        self.delay_s = delay_s
        self.calls: list[str] = []

    async def __call__(self, key: str) -> bool:
        self.calls.append(key)
        await asyncio.sleep(self.delay_s)
        if key == "boom":
            raise RuntimeError("API down")
        return self.answers[key]


def test_yes_is_reused_until_it_expires_and_no_is_never_kept() -> None:
    clock = Clock()
    recent: Recent[str, bool] = Recent(5.0, lambda allowed: allowed, clock=clock)
    lookup = Lookup({"alice": True, "bob": False})

    async def scenario() -> None:
        assert await recent.get("alice", lambda: lookup("alice")) is True
        assert await recent.get("bob", lambda: lookup("bob")) is False
        clock.now += 2.9  # not yet due for renewal
        assert await recent.get("alice", lambda: lookup("alice")) is True
        assert await recent.get("bob", lambda: lookup("bob")) is False
        assert lookup.calls == ["alice", "bob", "bob"]
        lookup.answers["alice"] = False  # revoked: seen once the yes has expired
        clock.now += 2.2
        assert await recent.get("alice", lambda: lookup("alice")) is False
        assert lookup.calls == ["alice", "bob", "bob", "alice"]

    asyncio.run(scenario())


def test_a_key_in_use_is_renewed_in_the_background_and_a_revocation_drops_it() -> None:
    clock = Clock()
    recent: Recent[str, bool] = Recent(5.0, lambda allowed: allowed, clock=clock)
    lookup = Lookup({"alice": True}, delay_s=0.01)

    async def scenario() -> None:
        await recent.get("alice", lambda: lookup("alice"))
        clock.now += 3.5  # within the last 40 % of its 5 s: answered at once, renewed behind the scenes
        assert await recent.get("alice", lambda: lookup("alice")) is True
        await asyncio.sleep(0.05)
        assert lookup.calls == ["alice", "alice"]
        lookup.answers["alice"] = False  # revoked
        clock.now += 4.0  # 7.5 s: the renewed yes (until 8.5 s) still holds, and is due for renewal again
        assert await recent.get("alice", lambda: lookup("alice")) is True
        await asyncio.sleep(0.05)
        assert await recent.get("alice", lambda: lookup("alice")) is False, "the renewal's no counts at once"
        assert lookup.calls == ["alice"] * 4

    asyncio.run(scenario())


def test_concurrent_lookups_of_one_key_share_one_call_and_its_failure() -> None:
    recent: Recent[str, bool] = Recent(5.0, lambda allowed: allowed)
    lookup = Lookup({"alice": True}, delay_s=0.05)

    async def scenario() -> None:
        answers = await asyncio.gather(*(recent.get("alice", lambda: lookup("alice")) for _ in range(16)))
        assert answers == [True] * 16
        assert lookup.calls == ["alice"]
        failures = await asyncio.gather(
            *(recent.get("boom", lambda: lookup("boom")) for _ in range(3)), return_exceptions=True
        )
        assert [str(f) for f in failures] == ["API down"] * 3
        assert lookup.calls == ["alice", "boom"], "one failed call for the burst"
        with pytest.raises(RuntimeError, match="API down"):
            await recent.get("boom", lambda: lookup("boom"))
        assert lookup.calls == ["alice", "boom", "boom"], "a failure is not remembered"

    asyncio.run(scenario())


def test_a_caller_giving_up_does_not_fail_the_others() -> None:
    recent: Recent[str, bool] = Recent(5.0, lambda allowed: allowed)
    lookup = Lookup({"alice": True}, delay_s=0.05)

    async def scenario() -> None:
        impatient = asyncio.ensure_future(recent.get("alice", lambda: lookup("alice")))
        patient = asyncio.ensure_future(recent.get("alice", lambda: lookup("alice")))
        await asyncio.sleep(0.01)
        impatient.cancel()
        assert await patient is True
        assert impatient.cancelled()
        assert lookup.calls == ["alice"]

    asyncio.run(scenario())


def test_zero_ttl_keeps_nothing_and_size_is_bounded() -> None:
    lookup = Lookup({"a": True, "b": True, "c": True})
    off: Recent[str, bool] = Recent(0.0, lambda allowed: allowed)
    small: Recent[str, bool] = Recent(60.0, lambda allowed: allowed, max_entries=2)

    async def scenario() -> None:
        for _ in range(2):
            await off.get("a", lambda: lookup("a"))
        assert lookup.calls == ["a", "a"]
        for key in ("a", "b", "c", "b", "a"):
            await small.get(key, partial(lookup, key))
        # a was evicted by c (oldest first), b stayed: a, b, c, then a again.
        assert lookup.calls[2:] == ["a", "b", "c", "a"]

    asyncio.run(scenario())
