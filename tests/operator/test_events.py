"""Refusal Events are announced once per object, reason and subject a minute, however often refused."""

from __future__ import annotations

from typing import Any, cast

from sluicegate_operator.events import Announcer


def test_one_event_per_object_reason_and_subject_per_interval() -> None:
    now = [0.0]
    announcer = Announcer(cast(Any, None), every_s=60, clock=lambda: now[0])
    assert announcer.due("uid-1", "PodRefused", "sa-a")
    assert not announcer.due("uid-1", "PodRefused", "sa-a"), "a Job re-creating refused pods says it once"
    assert announcer.due("uid-1", "PodRefused", "sa-b"), "another ServiceAccount is news"
    assert announcer.due("uid-2", "PodRefused", "sa-a"), "another stream is news"
    assert announcer.due("uid-1", "BrokerRefused", "sa-a")
    now[0] = 59.9
    assert not announcer.due("uid-1", "PodRefused", "sa-a")
    now[0] = 60.0
    assert announcer.due("uid-1", "PodRefused", "sa-a"), "still refused a minute later: said again"
