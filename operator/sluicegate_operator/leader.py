"""Leader election among the operator's replicas: one coordination.k8s.io/v1 Lease, client-go's rules.

Every replica serves the webhooks and the broker; the one holding the Lease also reconciles. A free Lease
(none yet, or released) is taken at once; one held by another replica is taken only once it has not
changed for its ``leaseDurationSeconds``, measured by this replica's own clock from when it saw the
change, never from the holder's ``renewTime``: clocks of different nodes may disagree by any amount, and
the takeover still comes at most one duration and two looks after the holder's last renewal. The holder
renews every ``renew_s`` and stops reconciling once it has not renewed for ``deadline_s`` (the duration
less one renew period), so it has stopped before any other replica can take over.

:func:`decide` is the whole rule, pure; :class:`Elector` runs it against the API (``kube.Kube``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

log = logging.getLogger("sluicegate.leader")
Json = dict[str, Any]
# Leases carry MicroTime: RFC 3339 with exactly six fractional digits.
_MICRO = "%Y-%m-%dT%H:%M:%S.%fZ"


def _format(at: datetime | None) -> str | None:
    return None if at is None else at.astimezone(UTC).strftime(_MICRO)


def _parse(text: Any) -> datetime | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None  # informational only: decisions never read the holder's times


@dataclass(frozen=True)
class Timing:
    """How long a lease lasts, how often its holder renews it, how often the others look."""

    lease_s: float = 15.0
    renew_s: float = 5.0
    retry_s: float = 2.0  # how often a standby looks (and a leader retries a failed renewal): client-go's

    @property
    def deadline_s(self) -> float:
        """The holder stops reconciling this long after its last renewal it sent: a renew period
        before anyone else may take over, which covers a request in flight and clocks running at
        slightly different rates."""
        return self.lease_s - self.renew_s

    @property
    def duration_s(self) -> int:
        """``leaseDurationSeconds`` as written: whole seconds, rounded up, so never shorter than the
        ``lease_s`` the holder's deadline is counted against."""
        return max(1, math.ceil(self.lease_s))


@dataclass(frozen=True)
class LeaseSpec:
    """The spec of a Lease; ``holder`` is empty when it is free (released)."""

    holder: str = ""
    duration_s: int = 0
    acquired: datetime | None = None
    renewed: datetime | None = None
    transitions: int = 0

    @classmethod
    def from_api(cls, spec: Json) -> LeaseSpec:
        return cls(
            holder=str(spec.get("holderIdentity") or ""),
            duration_s=int(spec.get("leaseDurationSeconds") or 0),
            acquired=_parse(spec.get("acquireTime")),
            renewed=_parse(spec.get("renewTime")),
            transitions=int(spec.get("leaseTransitions") or 0),
        )

    def to_api(self) -> Json:
        spec: Json = {"leaseDurationSeconds": self.duration_s, "leaseTransitions": self.transitions}
        if self.holder:
            spec["holderIdentity"] = self.holder
        for key, at in (("acquireTime", self.acquired), ("renewTime", self.renewed)):
            if at is not None:
                spec[key] = _format(at)
        return spec


@dataclass(frozen=True)
class Observed:
    """The Lease as this replica last saw it, and when it first saw it so (its monotonic clock)."""

    spec: LeaseSpec
    since: float


class Action(StrEnum):
    CREATE = "create"  # no Lease yet: create it, held by us
    ACQUIRE = "acquire"  # free, or expired: take it over
    RENEW = "renew"  # ours: renew it
    WAIT = "wait"  # another replica's, still valid


@dataclass(frozen=True)
class Decision:
    action: Action
    observed: Observed | None  # to pass to the next decide()
    write: LeaseSpec | None = None  # what to write, unless WAIT


def decide(
    current: LeaseSpec | None,
    observed: Observed | None,
    *,
    identity: str,
    now: float,
    wall: datetime,
    timing: Timing,
) -> Decision:
    """What this replica (``identity``) does with the Lease it just read (``current``, ``None`` if there is
    none), given what it saw before; ``now`` is its monotonic clock, ``wall`` the time it writes."""
    if current is None:
        spec = LeaseSpec(identity, timing.duration_s, wall, wall, 0)
        return Decision(Action.CREATE, None, spec)
    if observed is None or observed.spec != current:
        observed = Observed(current, now)  # a change restarts the count, whatever times it carries
    if current.holder == identity:
        # Ours, also when a restarted container of the same pod finds it: the old process is gone.
        spec = replace(current, duration_s=timing.duration_s, renewed=wall)
        return Decision(Action.RENEW, observed, spec)
    expired = now >= observed.since + (current.duration_s or timing.duration_s)
    if current.holder and not expired:
        return Decision(Action.WAIT, observed)
    spec = LeaseSpec(identity, timing.duration_s, wall, wall, current.transitions + 1)
    return Decision(Action.ACQUIRE, observed, spec)


def released(current: LeaseSpec, wall: datetime) -> LeaseSpec:
    """``current`` handed back on a clean shutdown: free, so a standby takes it at its next look."""
    return replace(current, holder="", duration_s=1, renewed=wall)


# ---- running it against the API ------------------------------------------------------------------------


class LeaseAPI(Protocol):
    """The Lease calls of ``kube.Kube``."""

    async def get_lease(self, namespace: str, name: str) -> Json | None: ...
    async def create_lease(self, namespace: str, body: Json) -> bool: ...
    async def replace_lease(self, namespace: str, name: str, body: Json) -> bool: ...


def _now() -> datetime:
    return datetime.now(UTC)


class Elector:
    """This replica's side of the election: :meth:`acquire`, then :meth:`hold` until it is lost, and
    :meth:`release` on a clean shutdown."""

    def __init__(
        self,
        api: LeaseAPI,
        namespace: str,
        name: str,
        identity: str,
        timing: Timing,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = _now,
    ) -> None:
        self._api = api
        self.namespace, self.name, self.identity, self.timing = namespace, name, identity, timing
        self._clock, self._wall = clock, wall
        self._observed: Observed | None = None
        self._renewed_at = 0.0  # our clock when the last successful write was started
        self._waiting_on = ""  # the holder last reported as such, so standing by is logged once
        self._taken_from = ""  # the holder before our last successful write

    @property
    def holder(self) -> str:
        """Who held the Lease when it was last read ('' if nobody)."""
        return self._observed.spec.holder if self._observed else ""

    async def _attempt(self) -> Action | None:
        """One read, decide, write; the action taken (WAIT: another replica holds it), ``None`` when the
        write lost a race (another replica wrote first)."""
        started = self._clock()
        lease = await self._api.get_lease(self.namespace, self.name)
        current = None if lease is None else LeaseSpec.from_api(lease.get("spec") or {})
        decision = decide(
            current,
            self._observed,
            identity=self.identity,
            now=started,
            wall=self._wall(),
            timing=self.timing,
        )
        self._observed = decision.observed
        if decision.write is None:
            return decision.action
        previous = current.holder if current else ""
        metadata: Json = {"name": self.name, "namespace": self.namespace}
        if lease is not None:
            metadata["resourceVersion"] = lease["metadata"]["resourceVersion"]
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": metadata,
            "spec": decision.write.to_api(),
        }
        if decision.action is Action.CREATE:
            written = await self._api.create_lease(self.namespace, body)
        else:
            written = await self._api.replace_lease(self.namespace, self.name, body)
        if not written:
            return None
        # Counted from before the read: no other replica can have seen this renewal any earlier.
        self._renewed_at = started
        self._taken_from = previous
        self._observed = Observed(decision.write, started)
        return decision.action

    async def _try(self, timeout_s: float) -> Action | None:
        try:
            return await asyncio.wait_for(self._attempt(), timeout_s)
        except TimeoutError:
            log.warning("Lease %s/%s: no answer within %.1f s", self.namespace, self.name, timeout_s)
        except Exception as exc:  # the API unreachable, refusing, or answering nonsense: try again
            log.warning("Lease %s/%s: %s", self.namespace, self.name, exc)
        return None

    async def acquire(self) -> None:
        """Return once this replica holds the Lease (looking every ``retry_s``)."""
        while True:
            action = await self._try(self.timing.lease_s)
            if action in (Action.CREATE, Action.ACQUIRE, Action.RENEW):
                before = self._taken_from
                log.info(
                    "acquired the Lease %s/%s as %s (%s); reconciling",
                    self.namespace,
                    self.name,
                    self.identity,
                    f"held by {before} before" if before and before != self.identity else "it was free",
                )
                self._waiting_on = ""
                return
            if action is Action.WAIT and self.holder != self._waiting_on:
                self._waiting_on = self.holder
                log.info(
                    "the Lease %s/%s is held by %s; standing by (serving webhooks and the broker)",
                    self.namespace,
                    self.name,
                    self.holder,
                )
            await asyncio.sleep(self.timing.retry_s)

    async def hold(self) -> str:
        """Renew every ``renew_s`` (failed renewals every ``retry_s``) while this replica holds the Lease;
        return why it was lost: taken over, or not renewed within ``deadline_s``."""
        wait = self.timing.renew_s
        while True:
            deadline = self._renewed_at + self.timing.deadline_s
            await asyncio.sleep(max(0.0, min(wait, deadline - self._clock())))
            left = deadline - self._clock()
            if left <= 0:
                return f"not renewed for {self.timing.deadline_s:g} s"
            action = await self._try(left)
            if action is Action.WAIT:
                return f"taken over by {self.holder}"
            wait = self.timing.retry_s if action is None else self.timing.renew_s

    async def release(self, timeout_s: float = 5.0) -> None:
        """Hand the Lease back if this replica still holds it (best effort: on failure it expires)."""

        async def give_back() -> bool:
            lease = await self._api.get_lease(self.namespace, self.name)
            if lease is None:
                return False
            current = LeaseSpec.from_api(lease.get("spec") or {})
            if current.holder != self.identity:
                return False
            body = {**lease, "spec": released(current, self._wall()).to_api()}
            return await self._api.replace_lease(self.namespace, self.name, body)

        try:
            if await asyncio.wait_for(give_back(), timeout_s):
                log.info("released the Lease %s/%s", self.namespace, self.name)
        except Exception as exc:
            log.warning(
                "could not release the Lease %s/%s (it expires instead): %s",
                self.namespace,
                self.name,
                exc or type(exc).__name__,
            )
