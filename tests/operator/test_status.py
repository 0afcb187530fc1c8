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
    assert st.pin_version(fresh.parts()[0], latest) == (7, "latest")
    pinned = stream(status={"resolvedVersion": 3, "pinnedFrom": "latest"})
    assert st.pin_version(pinned.parts()[0], latest) == (
        3,
        "latest",
    )  # a restart or new Dataset version keeps the pin
    assert len(calls) == 1
    numbered = stream(version=2, status={"resolvedVersion": 3, "pinnedFrom": "latest"})
    assert st.pin_version(numbered.parts()[0], latest) == (2, "2")
    back_to_latest = stream(status={"resolvedVersion": 2, "pinnedFrom": "2"})
    assert st.pin_version(back_to_latest.parts()[0], latest) == (7, "latest")


def test_stream_ready_reports_shards_and_is_idempotent() -> None:
    s = stream(generation=4, sharding={"worldSize": 4, "remainder": "drop"})
    status = st.stream_ready(s, [st.Resolved(3, "latest", 10)], now=T0)
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
        st.status_patch(again.status, st.stream_ready(again, [st.Resolved(3, "latest", 10)], now=T1)) is None
    )


def test_failure_keeps_last_good_fields_and_patch_names_only_changes() -> None:
    good = st.stream_ready(stream(), [st.Resolved(3, "latest", 10)], now=T0)
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
    status = st.stream_ready(stream(sharding=sharding), [st.Resolved(1, "1", 10)], now=T0)
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
    again = st.stream_ready(settled, [st.Resolved(1, "latest", 26)], now=T0)
    assert (again.shards, again.items_per_shard) == (4, 7)


MIX = [
    {"name": "coco", "dataset": {"name": "coco", "namespace": "data"}, "weight": 0.7},
    {"name": "web", "dataset": {"name": "web"}, "query": "labels.car > 0", "weight": 0.3},
]


def test_a_mix_is_ready_with_each_sources_counts_and_its_epoch_per_rank() -> None:
    s = stream(sources=MIX, sharding={"worldSize": 2})
    status = st.stream_ready(s, [st.Resolved(3, "latest", 100), st.Resolved(1, "latest", 60)], now=T0)
    # Per rank 50 and 30 items; first exhausted: min(50 / 0.7, 30 / 0.3) = 71, split 0.7 : 0.3 by largest
    # remainder (49.7, 21.3 -> 50, 21).
    assert (status.resolved_version, status.matched_items, status.items_per_shard) == (None, 160, 71)
    assert status.sources is not None
    got = [
        (x.name, x.resolved_version, x.pinned_from, x.matched_items, x.items_per_shard, x.items_per_epoch)
        for x in status.sources
    ]
    assert got == [("coco", 3, "latest", 100, 50, 50), ("web", 1, "latest", 60, 30, 21)]
    ready = st.ready_condition(status.conditions)
    assert ready is not None
    assert ready.message == "coco version 3, web version 1: 160 items match, 2 shards of 71 items per epoch"
    # The pins are kept per source, and a repeat writes nothing.
    again = stream(sources=MIX, sharding={"worldSize": 2}, status=status.wire())
    assert [st.pin_version(p, lambda: 9) for p in again.parts()] == [(3, "latest"), (1, "latest")]
    repeat = st.stream_ready(again, [st.Resolved(3, "latest", 100), st.Resolved(1, "latest", 60)], now=T1)
    assert st.status_patch(again.status, repeat) is None


def test_a_mix_takes_its_world_size_from_its_pods_and_withholds_counts_under_policies() -> None:
    sharding = {"remainder": "drop", "seed": 3}
    s = stream(sources=MIX, sharding=sharding)
    ready = st.stream_ready(s, [st.Resolved(3, "latest", 100), st.Resolved(1, "latest", 60)], now=T0)
    open_world = stream(sources=MIX, sharding=sharding, status=ready.wire())
    assert open_world.status.items_per_shard is None
    patch = st.observed_pods(open_world, injected=3, world_size=3)
    assert patch is not None
    # 33 and 20 per rank: min(33 / 0.7, 20 / 0.3) = 47 -> 33, 14.
    assert (patch["worldSize"], patch["itemsPerShard"]) == (3, 47)
    assert [(x["name"], x["itemsPerShard"], x["itemsPerEpoch"]) for x in patch["sources"]] == [  # type: ignore[union-attr]
        ("coco", 33, 33),
        ("web", 20, 14),
    ]
    withheld = st.stream_ready(s, [st.Resolved(3, "latest", None), st.Resolved(1, "latest", 60)], now=T0)
    assert (withheld.matched_items, withheld.items_per_shard) == (None, None)
    assert withheld.sources is not None
    assert withheld.sources[0].matched_items is None
    ready = st.ready_condition(withheld.conditions)
    assert ready is not None
    assert "counts are withheld" in ready.message
