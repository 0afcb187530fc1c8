"""Pure rank grants: what admission decided about a pod, sealed so that nobody else can forge or edit it.

The webhook decides a pod's rank and world size (from the stream and the Job) and writes them with a
MAC over everything the decision depends on: the namespace, the ServiceAccount (immutable in a pod), the
stream's name and UID, the rank and the world size. The broker honours only a grant whose MAC checks out
under the operator's key, for the pod's own namespace, ServiceAccount and stream. So labelling a pod after
creation, editing its annotations, or adding an own ``sluicegate-sidecar`` container gets nothing: what
admission did not decide, the broker refuses. (The pod's UID does not exist yet when a mutating webhook
runs, so a grant is bound to those facts instead; a copied grant only ever repeats a decision admission
made for the same ServiceAccount and stream.)
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

GRANT_ANNOTATION = "sluicegate.io/grant"
_VERSION = "v1"


class GrantInvalid(Exception):
    """The pod carries no grant, or one that admission did not issue for it."""


@dataclass(frozen=True)
class Grant:
    rank: int
    world_size: int


def _mac(key: bytes, who: tuple[str, str, str, str], rank: int, world: int) -> str:
    """HMAC over (namespace, ServiceAccount, stream, stream UID), rank and world size."""
    message = "\0".join((_VERSION, *who, str(rank), str(world)))
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


def seal(
    key: bytes,
    *,
    namespace: str,
    service_account: str,
    stream: str,
    stream_uid: str,
    rank: int,
    world_size: int,
) -> str:
    """The grant annotation's value for this decision."""
    mac = _mac(key, (namespace, service_account, stream, stream_uid), rank, world_size)
    return f"{_VERSION}:{rank}:{world_size}:{mac}"


def open_grant(
    key: bytes, value: str | None, *, namespace: str, service_account: str, stream: str, stream_uid: str
) -> Grant:
    """The rank and world size sealed in ``value``, or :class:`GrantInvalid` saying why not."""
    if not value:
        raise GrantInvalid(
            f"the pod carries no {GRANT_ANNOTATION} annotation: it was not admitted by sluicegate"
        )
    parts = value.split(":")
    if len(parts) != 4 or parts[0] != _VERSION or not parts[1].isdigit() or not parts[2].isdigit():
        raise GrantInvalid(f"the pod's {GRANT_ANNOTATION} annotation is malformed")
    rank, world = int(parts[1]), int(parts[2])
    expected = _mac(key, (namespace, service_account, stream, stream_uid), rank, world)
    if not hmac.compare_digest(expected, parts[3]):
        raise GrantInvalid(
            f"the pod's {GRANT_ANNOTATION} annotation was not issued for this pod's ServiceAccount and "
            "stream, or was edited: recreate the pod so that admission decides its rank"
        )
    if not 0 <= rank < world:
        raise GrantInvalid(f"the grant's rank {rank} is outside its world size {world}")
    return Grant(rank, world)
