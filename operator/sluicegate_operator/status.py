"""Pure reconciliation: what a Dataset's or DatasetStream's status should be, given what was observed.

No I/O here: ``handlers`` gathers the facts (the Dataset, the store's latest version, the query
result) and these functions turn them into status objects, so restarts and repeats compute the same
answer and tests can check every branch directly.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import pyarrow as pa
import pyarrow.compute as pc
from sluicegate.core.manifest import LABEL_PREFIX
from sluicegate.core.partition import per_rank

from .models import (
    Condition,
    ConditionStatus,
    Dataset,
    DatasetStatus,
    DatasetStream,
    DatasetStreamStatus,
)

READY = "Ready"
LABEL_SUMMARY_LIMIT = 50


class Reason:
    """Machine-readable reasons of the Ready condition."""

    READY = "Ready"
    DATASET_NOT_FOUND = "DatasetNotFound"
    DATASET_NOT_READY = "DatasetNotReady"
    CREDENTIALS_INVALID = "CredentialsInvalid"
    STORE_UNREACHABLE = "StoreUnreachable"
    STORE_EMPTY = "StoreEmpty"
    VERSION_NOT_FOUND = "VersionNotFound"
    INVALID_QUERY = "InvalidQuery"
    SOURCE_NOT_ALLOWED = "SourceNotAllowed"
    MANIFEST_TOO_LARGE = "ManifestTooLarge"


def set_condition(
    conditions: list[Condition],
    *,
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    generation: int,
    now: datetime,
) -> list[Condition]:
    """``conditions`` with ``type_`` set; lastTransitionTime moves only when the status changes."""
    previous = next((c for c in conditions if c.type == type_), None)
    since = previous.last_transition_time if previous is not None and previous.status == status else now
    new = Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=since,
        observed_generation=generation,
    )
    return [c for c in conditions if c.type != type_] + [new]


def _set_ready(
    obj: Dataset | DatasetStream, status: ConditionStatus, reason: str, message: str, now: datetime
) -> list[Condition]:
    """``obj``'s conditions with Ready set as observed at its current generation."""
    return set_condition(
        obj.status.conditions,
        type_=READY,
        status=status,
        reason=reason,
        message=message,
        generation=obj.metadata.generation,
        now=now,
    )


def ready_condition(conditions: list[Condition]) -> Condition | None:
    return next((c for c in conditions if c.type == READY), None)


def is_ready(conditions: list[Condition]) -> bool:
    cond = ready_condition(conditions)
    return cond is not None and cond.status is ConditionStatus.TRUE


# -- Dataset -------------------------------------------------------------------------------------------


def label_summary(table: pa.Table, limit: int = LABEL_SUMMARY_LIMIT) -> dict[str, int]:
    """Items carrying each label (count > 0), the ``limit`` most common ones."""
    counts: dict[str, int] = {}
    for name in table.column_names:
        if name.startswith(LABEL_PREFIX):
            counts[name[len(LABEL_PREFIX) :]] = int(pc.sum(pc.greater(table.column(name), 0)).as_py() or 0)
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]
    return dict(sorted(top))


def dataset_ready(
    ds: Dataset, *, latest_version: int, items: int, labels: dict[str, int], now: datetime
) -> DatasetStatus:
    message = f"version {latest_version} holds {items} items"
    return DatasetStatus(
        observed_generation=ds.metadata.generation,
        latest_version=latest_version,
        items=items,
        labels=labels,
        conditions=_set_ready(ds, ConditionStatus.TRUE, Reason.READY, message, now),
    )


def dataset_failed(ds: Dataset, *, reason: str, message: str, now: datetime) -> DatasetStatus:
    """Not ready; the last good observations stay so that ``kubectl get`` still shows them."""
    return ds.status.model_copy(
        update={
            "observed_generation": ds.metadata.generation,
            "conditions": _set_ready(ds, ConditionStatus.FALSE, reason, message, now),
        }
    )


# -- DatasetStream -------------------------------------------------------------------------------------


def pin_version(stream: DatasetStream, latest: Callable[[], int]) -> tuple[int, str]:
    """The version to stream and the ``spec.version`` it was pinned from.

    A number is used as is. ``latest`` is resolved once and kept across restarts and Dataset updates;
    it is resolved again only when ``spec.version`` is edited (the pin records what it came from).
    """
    wanted = stream.spec.version
    if isinstance(wanted, int):
        return wanted, str(wanted)
    pinned = stream.status.resolved_version
    if pinned is not None and stream.status.pinned_from == wanted:
        return pinned, wanted
    return latest(), wanted


def stream_ready(
    stream: DatasetStream, *, version: int, pinned_from: str, matched: int | None, now: datetime
) -> DatasetStreamStatus:
    """Ready at ``version``; ``matched`` is ``None`` when counts are withheld (the Dataset has row-level
    policies, so a count before them would say what some subjects may not see)."""
    sharding = stream.spec.sharding
    # Without spec.sharding.worldSize, the world size is what the injected pods were admitted with.
    world = sharding.world_size or stream.status.world_size
    per_shard = per_rank(matched, world, sharding.remainder) if world and matched is not None else None
    if matched is None:
        message = (
            f"version {version}: the query fits; counts are withheld because the Dataset has row-level "
            "policies (each pod's plan reports its own)"
        )
    elif world:
        message = f"version {version}: {matched} items match, {world} shards of {per_shard}"
    else:
        message = (
            f"version {version}: {matched} items match; shards are cut when pods report their world size"
        )
    return stream.status.model_copy(
        update={
            "observed_generation": stream.metadata.generation,
            "resolved_version": version,
            "pinned_from": pinned_from,
            "matched_items": matched,
            "world_size": world,
            "shards": world,
            "items_per_shard": per_shard,
            "conditions": _set_ready(stream, ConditionStatus.TRUE, Reason.READY, message, now),
        }
    )


def stream_failed(stream: DatasetStream, *, reason: str, message: str, now: datetime) -> DatasetStreamStatus:
    return stream.status.model_copy(
        update={
            "observed_generation": stream.metadata.generation,
            "conditions": _set_ready(stream, ConditionStatus.FALSE, reason, message, now),
        }
    )


def observed_pods(
    stream: DatasetStream, *, injected: int, world_size: int | None
) -> dict[str, object] | None:
    """The status patch for the injected pods: their count and, when the spec leaves the world size
    open, the world size they were admitted with (and so the shards)."""
    update: dict[str, object] = {"injected_pods": injected}
    matched = stream.status.matched_items
    if world_size and stream.spec.sharding.world_size is None and matched is not None:
        update |= {
            "world_size": world_size,
            "shards": world_size,
            "items_per_shard": per_rank(matched, world_size, stream.spec.sharding.remainder),
        }
    return status_patch(stream.status, stream.status.model_copy(update=update))


def status_patch(
    before: DatasetStatus | DatasetStreamStatus, after: DatasetStatus | DatasetStreamStatus
) -> dict[str, object] | None:
    """The merge patch that turns ``before`` into ``after``, or ``None`` when nothing changed (idempotence:
    a repeated reconcile writes nothing)."""
    old, new = before.wire(), after.wire()
    if old == new:
        return None
    patch: dict[str, object] = {key: value for key, value in new.items() if old.get(key) != value}
    patch.update({key: None for key in old if key not in new})
    return patch
