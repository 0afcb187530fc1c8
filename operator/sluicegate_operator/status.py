"""Pure reconciliation: what a Dataset's or DatasetStream's status should be, given what was observed.

No I/O here: ``handlers`` gathers the facts (the Dataset, the store's latest version, the query
result) and these functions turn them into status objects, so restarts and repeats compute the same
answer and tests can check every branch directly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import pyarrow as pa
import pyarrow.compute as pc
from sluicegate.core.manifest import LABEL_PREFIX
from sluicegate.core.mix import apportion, mix_length, weight_fractions
from sluicegate.core.partition import per_rank

from .models import (
    Condition,
    ConditionStatus,
    Dataset,
    DatasetStatus,
    DatasetStream,
    DatasetStreamStatus,
    Part,
    SourceStatus,
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


def pin_version(part: Part, latest: Callable[[], int]) -> tuple[int, str]:
    """The version of ``part`` (a stream's Dataset, or one source of its mix) to stream and the version it
    was pinned from.

    A number is used as is. ``latest`` is resolved once and kept across restarts and Dataset updates;
    it is resolved again only when the version asked for is edited (the pin records what it came from).
    """
    wanted = part.version
    if isinstance(wanted, int):
        return wanted, str(wanted)
    pinned = part.status.resolved_version
    if pinned is not None and part.status.pinned_from == wanted:
        return pinned, wanted
    return latest(), wanted


@dataclass(frozen=True)
class Resolved:
    """What reconciling one part found: its version, what it was pinned from, how many items match
    (``None``: withheld, because its Dataset has row-level policies and a count before them would say
    what some subjects may not see)."""

    version: int
    pinned_from: str
    matched: int | None


def _shards(stream: DatasetStream, world: int | None, matched: Sequence[int | None]) -> dict[str, object]:
    """The status fields that follow from the world size and each part's count: shards, items per rank
    per epoch, and for a mix what each source gives a rank's shard and epoch (core.mix's arithmetic)."""
    sharding = stream.spec.sharding
    lengths = [per_rank(m, world, sharding.remainder) if world and m is not None else None for m in matched]
    fields: dict[str, object] = {"world_size": world, "shards": world}
    if not stream.is_mix:
        return fields | {"matched_items": matched[0], "items_per_shard": lengths[0]}
    parts = stream.parts()
    known = [n for n in lengths if n is not None]
    epoch: int | None = None
    counts: list[int | None] = [None] * len(parts)
    if len(known) == len(lengths):
        shares = weight_fractions([p.weight for p in parts])
        epoch = mix_length(known, shares, stream.spec.epoch_length)
        counts = [int(c) for c in apportion(epoch, shares)]
    sources = [
        SourceStatus(
            name=p.name or "",
            resolved_version=p.status.resolved_version,
            pinned_from=p.status.pinned_from,
            matched_items=m,
            items_per_shard=n,
            items_per_epoch=c,
        )
        for p, m, n, c in zip(parts, matched, lengths, counts, strict=True)
    ]
    total = None if None in matched else sum(m for m in matched if m is not None)
    return fields | {"matched_items": total, "items_per_shard": epoch, "sources": sources}


def stream_ready(
    stream: DatasetStream, resolved: Sequence[Resolved], *, now: datetime
) -> DatasetStreamStatus:
    """Ready with each of ``stream.parts()`` resolved as ``resolved`` says (one per part, in order)."""
    parts = stream.parts()
    assert len(resolved) == len(parts)
    # Without spec.sharding.worldSize, the world size is what the injected pods were admitted with.
    world = stream.spec.sharding.world_size or stream.status.world_size
    # The parts as resolved now: _shards reads their versions from them.
    pinned = stream.status.model_copy(
        update={
            "resolved_version": None if stream.is_mix else resolved[0].version,
            "pinned_from": None if stream.is_mix else resolved[0].pinned_from,
            "sources": [
                SourceStatus(name=p.name or "", resolved_version=r.version, pinned_from=r.pinned_from)
                for p, r in zip(parts, resolved, strict=True)
            ]
            if stream.is_mix
            else None,
        }
    )
    current = stream.model_copy(update={"status": pinned})
    fields = _shards(current, world, [r.matched for r in resolved])
    per_shard = fields["items_per_shard"]
    versions = (
        ", ".join(f"{p.name} version {r.version}" for p, r in zip(parts, resolved, strict=True))
        if stream.is_mix
        else f"version {resolved[0].version}"
    )
    matched = fields["matched_items"]
    if matched is None:
        message = (
            f"{versions}: the queries fit; counts are withheld because a Dataset has row-level "
            "policies (each pod's plan reports its own)"
        )
    elif world:
        each = "items per epoch" if stream.is_mix else "items"
        message = f"{versions}: {matched} items match, {world} shards of {per_shard} {each}"
    else:
        message = f"{versions}: {matched} items match; shards are cut when pods report their world size"
    return pinned.model_copy(
        update={
            "observed_generation": stream.metadata.generation,
            **fields,
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
    matched = [p.status.matched_items for p in stream.parts()]
    if world_size and stream.spec.sharding.world_size is None and None not in matched:
        update |= _shards(stream, world_size, matched)
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
