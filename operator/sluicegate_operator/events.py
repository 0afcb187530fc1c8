"""Events that explain refusals: `kubectl describe` of the stream (refused at admission) or of the pod
(refused by the broker) says who was refused and what permission is missing.

A refused sidecar retries every few seconds and a Job re-creates refused pods, so each (object, reason) is
announced at most once per ``every_s``; and the Event is written in the background, so a refusal is
answered as fast with Events as without.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from .kube import Kube

__all__ = ["Announcer", "object_ref", "pod_ref"]

log = logging.getLogger("sluicegate.events")

_MAX_KEYS = 10_000


def object_ref(api_version: str, kind: str, namespace: str, name: str, uid: str) -> dict[str, Any]:
    """What :meth:`Kube.event` needs of the object an Event is about."""
    return {
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {"namespace": namespace, "name": name, "uid": uid},
    }


def pod_ref(namespace: str, name: str, uid: str) -> dict[str, Any]:
    return object_ref("v1", "Pod", namespace, name, uid)


class Announcer:
    def __init__(
        self, kube: Kube, every_s: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._kube = kube
        self._every = every_s
        self._clock = clock
        self._last: OrderedDict[tuple[str, str, str], float] = OrderedDict()
        self._writing: set[asyncio.Task[None]] = set()

    def due(self, uid: str, reason: str, about: str = "") -> bool:
        """Whether (``uid``, ``reason``, ``about``) may be announced now; if so, not again for ``every_s``."""
        now, key = self._clock(), (uid, reason, about)
        last = self._last.get(key)
        if last is not None and now - last < self._every:
            return False
        self._last[key] = now
        self._last.move_to_end(key)
        while len(self._last) > _MAX_KEYS:
            self._last.popitem(last=False)
        return True

    def warn(self, obj: dict[str, Any], reason: str, message: str, *, about: str = "") -> None:
        """A Warning Event on ``obj``, unless one with this reason (and ``about``: whom it concerns, or why)
        was written lately."""
        if not self.due(obj["metadata"].get("uid", ""), reason, about):
            return
        task = asyncio.get_running_loop().create_task(
            self._kube.event(obj, type_="Warning", reason=reason, message=message)
        )
        self._writing.add(task)
        task.add_done_callback(self._writing.discard)
