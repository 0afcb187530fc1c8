"""Pure reconciliation: conditions, version pinning, status patches."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pytest
from sluicegate_operator import status as st
from sluicegate_operator.models import ConditionStatus
from sluicegate_operator.pods import PodCounter

from .conftest import stream

T0 = datetime(2026, 1, 1, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)


def test_condition_transition_time_moves_only_on_status_change() -> None:
    first = st.set_condition(
        [], type_="Ready", status=ConditionStatus.FALSE, reason="A", message="a", generation=1, now=T0
    )
    same = st.set_condition(
        first, type_="Ready", status=ConditionStatus.FALSE, reason="B", message="b", generation=2, now=T1
    )
    flipped = st.set_condition(
        same, type_="Ready", status=ConditionStatus.TRUE, reason="Ready", message="", generation=2, now=T1
    )
    assert same[0].last_transition_time == T0
    assert same[0].reason == "B"
    assert same[0].observed_generation == 2
    assert len(flipped) == 1
    assert flipped[0].last_transition_time == T1


def test_latest_is_pinned_once_and_moves_only_when_spec_version_changes() -> None:
    calls: list[int] = []

    def latest() -> int:
        calls.append(1)
        return 7

    fresh = stream()
    assert st.pin_version(fresh, latest) == (7, "latest")
    pinned = stream(status={"resolvedVersion": 3, "pinnedFrom": "latest"})
    assert st.pin_version(pinned, latest) == (3, "latest")  # a restart or new Dataset version keeps the pin
    assert len(calls) == 1
    numbered = stream(version=2, status={"resolvedVersion": 3, "pinnedFrom": "latest"})
    assert st.pin_version(numbered, latest) == (2, "2")
    back_to_latest = stream(status={"resolvedVersion": 2, "pinnedFrom": "2"})
    assert st.pin_version(back_to_latest, latest) == (7, "latest")


def test_stream_ready_reports_shards_and_is_idempotent() -> None:
    s = stream(generation=4, sharding={"worldSize": 4, "remainder": "drop"})
    status = st.stream_ready(s, version=3, pinned_from="latest", matched=10, now=T0)
    assert (status.resolved_version, status.matched_items, status.shards, status.items_per_shard) == (
        3,
        10,
        4,
        2,
    )
    assert status.observed_generation == 4
    assert st.is_ready(status.conditions)
    again = stream(generation=4, sharding={"worldSize": 4, "remainder": "drop"}, status=status.wire())
    assert (
        st.status_patch(
            again.status, st.stream_ready(again, version=3, pinned_from="latest", matched=10, now=T1)
        )
        is None
    )


def test_failure_keeps_last_good_fields_and_patch_names_only_changes() -> None:
    good = st.stream_ready(stream(), version=3, pinned_from="latest", matched=10, now=T0)
    s = stream(generation=2, status=good.wire())
    bad = st.stream_failed(s, reason=st.Reason.INVALID_QUERY, message="unknown label", now=T1)
    assert bad.resolved_version == 3
    assert not st.is_ready(bad.conditions)
    patch = st.status_patch(s.status, bad)
    assert patch is not None
    assert set(patch) == {"observedGeneration", "conditions"}
    assert patch["conditions"][0]["reason"] == "InvalidQuery"  # type: ignore[index]


def test_label_summary_counts_items_with_each_label() -> None:
    table = pa.table(
        {
            "id": ["a", "b", "c"],
            "labels.car": pa.array([2, 0, 1], pa.int32()),
            "labels.dog": pa.array([0, 0, 1], pa.int32()),
        }
    )
    assert st.label_summary(table) == {"car": 2, "dog": 1}
    assert st.label_summary(table, limit=1) == {"car": 2}


@pytest.mark.parametrize(
    ("world", "remainder", "per_shard"), [(None, "pad", None), (3, "pad", 4), (3, "drop", 3)]
)
def test_items_per_shard(world: int | None, remainder: str, per_shard: int | None) -> None:
    sharding = {"remainder": remainder} | ({"worldSize": world} if world else {})
    status = st.stream_ready(stream(sharding=sharding), version=1, pinned_from="1", matched=10, now=T0)
    assert status.items_per_shard == per_shard


def test_pod_counter_reports_changes_once() -> None:
    counter = PodCounter()
    counter.observe("ns", "s", "a", alive=True, world_size=4)
    counter.observe("ns", "s", "b", alive=True, world_size=4)
    counter.observe("ns", "other", "c", alive=True)
    assert counter.take_changes() == {("ns", "s"): (2, 4), ("ns", "other"): (1, None)}
    assert counter.take_changes() == {}
    counter.observe("ns", "s", "a", alive=True, world_size=4)  # a repeated event changes nothing
    assert counter.take_changes() == {}
    counter.observe("ns", "s", "a", alive=False)
    assert counter.take_changes() == {("ns", "s"): (1, 4)}


def test_observed_pods_fill_in_shards_only_when_the_spec_leaves_them_open() -> None:
    open_world = stream(status={"matchedItems": 26})
    assert st.observed_pods(open_world, injected=4, world_size=4) == {
        "injectedPods": 4,
        "worldSize": 4,
        "shards": 4,
        "itemsPerShard": 7,
    }
    fixed = stream(sharding={"worldSize": 2}, status={"matchedItems": 26, "worldSize": 2, "shards": 2})
    assert st.observed_pods(fixed, injected=4, world_size=4) == {"injectedPods": 4}
    settled = stream(
        status={"matchedItems": 26, "injectedPods": 4, "worldSize": 4, "shards": 4, "itemsPerShard": 7}
    )
    assert st.observed_pods(settled, injected=4, world_size=4) is None
    # A later reconcile keeps the observed world size instead of erasing it.
    again = st.stream_ready(settled, version=1, pinned_from="latest", matched=26, now=T0)
    assert (again.shards, again.items_per_shard) == (4, 7)
