"""Leader election: the pure rule (expiry, renewal, takeover, skewed clocks, release) and the Elector and
the operator's leader loop against an in-memory Lease API with compare-and-swap, as the API server does."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import kopf
import pytest
from sluicegate_operator import __main__ as entry
from sluicegate_operator import handlers
from sluicegate_operator.leader import Action, Elector, LeaseSpec, Observed, Timing, decide, released
from sluicegate_operator.metrics import REGISTRY

T = Timing()  # 15 s lease, renewed every 5 s, looked at every 2 s
WALL = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


def held(holder: str, renewed: datetime = WALL, *, duration_s: int = 15, transitions: int = 3) -> LeaseSpec:
    return LeaseSpec(holder, duration_s, WALL - timedelta(hours=1), renewed, transitions)


def step(current: LeaseSpec | None, observed: Observed | None, now: float, me: str = "b") -> Any:
    return decide(current, observed, identity=me, now=now, wall=WALL, timing=T)


def test_no_lease_is_created_held_by_us() -> None:
    decision = step(None, None, 100.0)
    assert decision.action is Action.CREATE
    assert decision.write == LeaseSpec("b", 15, WALL, WALL, 0)


def test_another_holders_lease_is_taken_only_once_it_has_not_changed_for_its_duration() -> None:
    lease = held("a")
    first = step(lease, None, 100.0)
    assert first.action is Action.WAIT
    assert first.observed == Observed(lease, 100.0), "the count starts when we first see it"
    almost = step(lease, first.observed, 114.9)
    assert almost.action is Action.WAIT
    taken = step(lease, almost.observed, 115.0)
    assert taken.action is Action.ACQUIRE
    assert taken.write == LeaseSpec("b", 15, WALL, WALL, 4), "a new holder counts one more transition"


def test_a_renewing_holder_is_never_taken_over() -> None:
    observed: Observed | None = None
    for tick in range(0, 120, 2):  # a standby looking every 2 s for two minutes
        renewed = WALL + timedelta(seconds=5 * (tick // 5))  # the holder renews every 5 s
        decision = step(held("a", renewed), observed, 1000.0 + tick)
        assert decision.action is Action.WAIT, tick
        observed = decision.observed


def test_the_holders_clock_does_not_matter_only_when_we_saw_a_change() -> None:
    """Clocks of different nodes may disagree by any amount: a renewTime an hour ahead neither keeps the
    lease past its duration nor one a day behind cuts it short. The takeover is at most one duration after
    the last change this replica saw, by its own clock."""
    for skew in (timedelta(hours=1), -timedelta(days=1), timedelta(0)):
        lease = held("a", WALL + skew)
        seen = step(lease, None, 50.0).observed
        assert step(lease, seen, 64.0).action is Action.WAIT, skew
        assert step(lease, seen, 65.0).action is Action.ACQUIRE, skew
    # A standby whose own clock jumps (wall time) is unaffected: decisions use the monotonic clock only.
    lease = held("a")
    seen = step(lease, None, 50.0).observed
    late = decide(lease, seen, identity="b", now=51.0, wall=WALL + timedelta(days=3), timing=T)
    assert late.action is Action.WAIT


def test_the_lease_says_how_long_it_lasts() -> None:
    """A holder with a longer lease (say, mid-rollout to new settings) keeps it that long."""
    lease = held("a", duration_s=30)
    seen = step(lease, None, 0.0).observed
    assert step(lease, seen, 29.0).action is Action.WAIT
    assert step(lease, seen, 30.0).action is Action.ACQUIRE


def test_our_own_lease_is_renewed_keeping_its_term() -> None:
    lease = held("b", WALL - timedelta(seconds=4))
    decision = step(lease, None, 10.0)
    assert decision.action is Action.RENEW
    assert decision.write == LeaseSpec("b", 15, lease.acquired, WALL, 3)
    # A restarted container of the same pod (same identity) takes it back at once: the old one is gone.
    assert step(held("b", WALL - timedelta(seconds=14)), None, 0.0).action is Action.RENEW


def test_a_released_lease_is_taken_at_once() -> None:
    lease = released(held("a"), WALL)
    assert lease.holder == ""
    assert lease.duration_s == 1
    assert step(lease, None, 0.0).action is Action.ACQUIRE


def test_the_leader_stops_a_renew_period_before_anyone_may_take_over() -> None:
    assert T.deadline_s == 10.0
    assert T.deadline_s < T.lease_s
    # Leases count whole seconds: rounded up, never below what the holder's deadline assumes.
    assert Timing(lease_s=2.4, renew_s=0.1).duration_s == 3


def test_lease_spec_round_trips_through_the_api_form() -> None:
    lease = held("a")
    spec = lease.to_api()
    assert spec["renewTime"] == "2026-01-02T03:04:05.678901Z", "MicroTime: six digits, UTC"
    assert LeaseSpec.from_api(spec) == lease
    free = released(lease, WALL).to_api()
    assert "holderIdentity" not in free
    assert LeaseSpec.from_api({}) == LeaseSpec()


# ---- the Elector against an in-memory API -------------------------------------------------------------


class Leases:
    """One namespace's Leases as the API server keeps them: writes succeed only at the current
    resourceVersion. ``down`` holds the clients cut off from it (a partition, an API outage)."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.version = 0
        self.down: set[str] = set()

    def client(self, who: str) -> Any:
        leases = self

        class Client:
            def _check(self) -> None:
                if who in leases.down:
                    raise ConnectionError(f"{who} cannot reach the API server")

            async def get_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
                self._check()
                found = leases.objects.get(name)
                return None if found is None else {**found, "metadata": dict(found["metadata"])}

            async def create_lease(self, namespace: str, body: dict[str, Any]) -> bool:
                self._check()
                if body["metadata"]["name"] in leases.objects:
                    return False
                return leases.store(body)

            async def replace_lease(self, namespace: str, name: str, body: dict[str, Any]) -> bool:
                self._check()
                current = leases.objects.get(name)
                if current is None or current["metadata"]["resourceVersion"] != body["metadata"].get(
                    "resourceVersion"
                ):
                    return False
                return leases.store(body)

        return Client()

    def store(self, body: dict[str, Any]) -> bool:
        self.version += 1
        self.objects[body["metadata"]["name"]] = {
            **body,
            "metadata": {**body["metadata"], "resourceVersion": str(self.version)},
        }
        return True

    def holder(self, name: str = "lease") -> str:
        return str(self.objects[name]["spec"].get("holderIdentity", ""))


FAST = Timing(lease_s=1.0, renew_s=0.2, retry_s=0.05)  # whole seconds, as Leases count


def elector(leases: Leases, who: str, timing: Timing = FAST) -> Elector:
    return Elector(leases.client(who), "sg", "lease", who, timing)


async def _timed(coro: Any) -> float:
    started = time.monotonic()
    await coro
    return time.monotonic() - started


def test_one_leader_and_a_crashed_one_is_replaced_after_the_lease() -> None:
    async def scenario() -> None:
        leases = Leases()
        a, b = elector(leases, "a"), elector(leases, "b")
        await asyncio.wait_for(a.acquire(), 1)
        holding = asyncio.create_task(a.hold())
        standing_by = asyncio.create_task(b.acquire())
        await asyncio.sleep(1.5)  # more than a lease: a renews, b waits
        assert not standing_by.done()
        assert leases.holder() == "a"
        holding.cancel()  # a crashes: no more renewals, no release
        crashed = time.monotonic()
        await asyncio.wait_for(standing_by, 2)
        took = time.monotonic() - crashed
        assert leases.holder() == "b"
        # b saw a's last renewal at most renew_s before the crash, and looks every retry_s.
        assert FAST.lease_s - FAST.renew_s - 0.05 <= took <= FAST.lease_s + 2 * FAST.retry_s + 0.2, took

    asyncio.run(scenario())


def test_a_leader_cut_off_stops_before_another_takes_over() -> None:
    async def scenario() -> None:
        leases = Leases()
        a, b = elector(leases, "a"), elector(leases, "b")
        await a.acquire()
        holding = asyncio.create_task(a.hold())
        standing_by = asyncio.create_task(b.acquire())
        await asyncio.sleep(0.4)
        leases.down.add("a")
        why = await asyncio.wait_for(holding, 2)
        assert why == "not renewed for 0.8 s"
        assert not standing_by.done(), "a stopped leading before b could start"
        await asyncio.wait_for(standing_by, 2)
        assert leases.holder() == "b"
        # Reconnected, a finds b's lease and stands by; b's renewals keep it.
        leases.down.clear()
        again = asyncio.create_task(a.acquire())
        kept = asyncio.create_task(b.hold())
        await asyncio.sleep(1.0)
        assert not again.done()
        assert not kept.done()
        for task in (again, kept):
            task.cancel()

    asyncio.run(scenario())


def test_a_leader_learns_at_its_next_renewal_that_it_was_taken_over() -> None:
    async def scenario() -> None:
        leases = Leases()
        a = elector(leases, "a")
        await a.acquire()
        holding = asyncio.create_task(a.hold())
        body = leases.objects["lease"]
        leases.store({**body, "spec": {**body["spec"], "holderIdentity": "intruder"}})
        assert await asyncio.wait_for(holding, 1) == "taken over by intruder"

    asyncio.run(scenario())


def test_a_released_lease_passes_on_at_the_next_look() -> None:
    async def scenario() -> None:
        leases = Leases()
        slow = Timing(lease_s=30, renew_s=5, retry_s=0.05)
        a, b = elector(leases, "a", slow), elector(leases, "b", slow)
        await a.acquire()
        standing_by = asyncio.create_task(b.acquire())
        await asyncio.sleep(0.2)
        assert not standing_by.done()
        await a.release()
        assert await asyncio.wait_for(_timed(standing_by), 1) < 0.2
        assert leases.holder() == "b"
        assert leases.objects["lease"]["spec"]["leaseTransitions"] == 1
        await a.release()  # not a's any more: left alone
        assert leases.holder() == "b"

    asyncio.run(scenario())


def test_the_operator_reconciles_only_while_it_holds_the_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    """The leader loop of ``__main__``: kopf (here a stand-in) runs while leading, is cancelled at once
    when the Lease is lost, starts again when it is won back, and a stop hands the Lease back."""
    terms: list[str] = []

    async def operator(*, stop_flag: asyncio.Event, ready_flag: asyncio.Event, **_: Any) -> None:
        terms.append("start")
        ready_flag.set()
        try:
            await asyncio.Event().wait()
        finally:
            terms.append("stop" if stop_flag.is_set() else "stop without the flag")

    async def idle(_: Any) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(kopf, "operator", operator)
    monkeypatch.setattr(handlers, "flush_pod_counts", idle)
    monkeypatch.setattr(handlers, "resync", idle)

    async def scenario() -> None:
        leases = Leases()
        me = elector(leases, "me")
        stopping = asyncio.Event()
        no_term: Any = lambda: (None, None)  # noqa: E731 - what kopf and the handlers would get
        loop = asyncio.create_task(entry.reconcile_while_leader(me, stopping, no_term))
        await asyncio.sleep(0.2)
        assert terms == ["start"]
        assert REGISTRY.get_sample_value("sluicegate_leader") == 1
        leases.down.add("me")
        await asyncio.sleep(FAST.deadline_s + 0.2)
        assert terms == ["start", "stop"], "stopped once it could not renew"
        assert REGISTRY.get_sample_value("sluicegate_leader") == 0
        leases.down.clear()
        await asyncio.sleep(0.3)  # its own lease, still unexpired: taken back at the next look
        assert terms == ["start", "stop", "start"]
        stopping.set()
        await asyncio.wait_for(loop, 1)
        assert terms[-1] == "stop"
        assert leases.holder() == "", "released on the way out"

    asyncio.run(scenario())
