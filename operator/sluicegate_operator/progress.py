"""Pure progress rules: how a stream's epoch in progress (``status.progress``) answers a pod's plan and
takes a pod's report. No I/O: the broker reads the stream, calls these, and writes what they return.

The arithmetic is the SDK's (:mod:`sluicegate.core.partition`); these functions decide who may change
what. A pod reports only for the rank and world size sealed in its grant, only for the epoch's current
segment, only as the rank's current reader (``owners``: the pod that last got a plan for that rank), and
only growing what the rank consumed. A plan for another world size than the current segment's re-cuts
the epoch (the old segment closes: late reports of its pods are refused from then on).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sluicegate import ConfigError
from sluicegate.core import partition as _partition
from sluicegate.core.partition import Progress, ShardSpec
from sluicegate.core.protocol import ProgressReport

from .access import Refused
from .models import MAX_PROGRESS_WORLD, StreamProgress

MAX_PROGRESS_BYTES = 128 * 1024  # status.progress, as JSON: well within what one object may hold


def basis(version: int, queries: Sequence[str], spec: ShardSpec) -> str:
    """A digest of everything a stream's cut depends on but the world size: progress of another basis
    (the version or the query was changed) is of another selection, and is started afresh."""
    text = "\0".join([str(version), *queries, str(spec.seed), str(spec.shuffle), spec.remainder.value])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def mix_basis(parts: Sequence[str], weights: Sequence[float], epoch_length: object) -> str:
    """The basis of a mix's progress: every source's (:func:`basis`), the weights and the epoch length."""
    text = "\0".join(["mix", *parts, *(repr(float(w)) for w in weights), str(epoch_length)])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class PlanProgress:
    """What a plan continues (``progress``; None: a fresh epoch) and what to write first (None: nothing)."""

    progress: Progress | None
    write: StreamProgress | None


def for_plan(
    stored: StreamProgress | None, *, basis: str, rank: int, world_size: int, pod: str
) -> PlanProgress:
    """The progress a pod's plan continues: the stream's epoch in progress, re-cut for the pod's world
    size if it is another; the pod becomes its rank's reader."""
    if stored is None or stored.basis != basis:
        return PlanProgress(None, None)
    progress = stored.core()
    owners = _owners(stored.owners, progress.current.world_size)
    if progress.current.world_size != world_size:
        try:
            progress = progress.recut(world_size)
        except ConfigError as exc:
            raise Refused(409, "progress_full", str(exc)) from exc
        owners = [""] * world_size
    if owners[rank] == pod and stored.segments[-1].world_size == world_size:
        return PlanProgress(progress, None)
    owners[rank] = pod
    return PlanProgress(progress, _bounded(StreamProgress.of(progress, basis, owners)))


def take_report(
    stored: StreamProgress | None,
    report: ProgressReport,
    *,
    basis: str,
    rank: int,
    world_size: int,
    pod: str,
    length: Callable[[Progress], int],
) -> StreamProgress | None:
    """The stream's progress with ``report`` taken (None: it changes nothing), or :class:`Refused`.
    ``length(progress)`` is the rank's count in the progress' current segment."""
    if (report.rank, report.world_size) != (rank, world_size):
        raise Refused(
            403,
            "not_own_rank",
            f"this pod was admitted as rank {rank} of {world_size} and reports for that rank only, not for "
            f"rank {report.rank} of {report.world_size}",
        )
    if world_size > MAX_PROGRESS_WORLD:
        raise Refused(409, "progress_full", f"progress is kept for at most {MAX_PROGRESS_WORLD} ranks")
    fresh = stored is None or stored.basis != basis or report.epoch > stored.epoch
    if fresh:
        if report.segment != 0:
            raise Refused(
                409, "stale_progress", f"segment {report.segment} of epoch {report.epoch} is not the stream's"
            )
        progress, owners = Progress.start(report.epoch, world_size), [""] * world_size
    else:
        assert stored is not None
        progress = stored.core()
        owners = _owners(stored.owners, progress.current.world_size)
        if report.epoch < stored.epoch:
            raise Refused(
                409, "stale_progress", f"the stream is in epoch {stored.epoch}; epoch {report.epoch} is over"
            )
        current = progress.current
        if report.segment != progress.segment or current.world_size != world_size:
            raise Refused(
                409,
                "stale_progress",
                f"segment {report.segment} of epoch {report.epoch} is closed: the stream re-cut the epoch "
                f"for world size {current.world_size} (segment {progress.segment})",
            )
        if owners[rank] and owners[rank] != pod:
            raise Refused(
                409,
                "rank_taken_over",
                f"another pod ({owners[rank]}) reads rank {rank} now: this pod's reports no longer count",
            )
    count = length(progress)
    try:
        passes = _partition.normalize(count, report.consumed)
        grows = _partition.covers(count, passes, progress.current.consumed[rank])
    except ConfigError as exc:
        raise Refused(400, "bad_progress", f"the report does not fit rank {rank}'s plan: {exc}") from exc
    if not grows:
        raise Refused(
            409,
            "progress_lowered",
            f"the report says rank {rank} consumed less than the stream already holds: what was consumed "
            "stays consumed",
        )
    old = progress.current.consumed[rank]
    if not fresh and passes == old and owners[rank] == pod:
        return None
    owners[rank] = pod
    return _bounded(StreamProgress.of(progress.consumed_by(rank, passes), basis, owners))


def _owners(owners: Sequence[str], world_size: int) -> list[str]:
    return (list(owners) + [""] * world_size)[:world_size]


def _bounded(progress: StreamProgress) -> StreamProgress:
    size = len(progress.model_dump_json(by_alias=True, exclude_none=True))
    if size > MAX_PROGRESS_BYTES:
        raise Refused(
            409,
            "progress_full",
            f"the stream's progress would take {size} bytes, more than the {MAX_PROGRESS_BYTES} kept: too "
            "many ranks, re-cuts or restarts in one epoch",
        )
    return progress
