"""The rules of a stream's epoch progress (operator/progress.py): who may report what, and re-cuts."""

from __future__ import annotations

import pytest
from sluicegate.core.partition import Progress, ShardSpec, per_rank
from sluicegate.core.protocol import ProgressReport
from sluicegate_operator import progress as rules
from sluicegate_operator.access import Refused
from sluicegate_operator.models import StreamProgress

N = 40
SPEC = ShardSpec(seed=3)
BASIS = rules.basis(1, ("labels.car > 0",), SPEC)


def _length(progress: Progress) -> int:
    assert progress.segment == 0
    return per_rank(N, progress.current.world_size, SPEC.remainder)


def _report(rank: int, world: int, consumed: tuple[tuple[int, ...], ...], segment: int = 0) -> ProgressReport:
    return ProgressReport(epoch=0, segment=segment, world_size=world, rank=rank, consumed=consumed)


def _take(
    stored: StreamProgress | None, report: ProgressReport, rank: int, world: int, pod: str
) -> StreamProgress | None:
    return rules.take_report(
        stored, report, basis=BASIS, rank=rank, world_size=world, pod=pod, length=_length
    )


def test_reports_grow_the_progress_and_a_new_world_size_recuts_it() -> None:
    stored = _take(None, _report(1, 4, ((3, 1),)), 1, 4, "pod-1")
    assert stored is not None
    assert stored.segments[0].consumed == [[], [[3, 1]], [], []]  # a worker one batch ahead
    assert stored.owners == ["", "pod-1", "", ""]
    stored = _take(stored, _report(0, 4, ((3,),)), 0, 4, "pod-0")
    assert stored is not None
    assert _take(stored, _report(0, 4, ((3,),)), 0, 4, "pod-0") is None, "the same report changes nothing"
    plan = rules.for_plan(stored, basis=BASIS, rank=0, world_size=2, pod="new-0")
    assert plan.progress is not None
    assert (plan.progress.segment, plan.progress.current.world_size) == (1, 2)
    assert plan.write is not None
    assert plan.write.owners == ["new-0", ""]
    assert rules.for_plan(plan.write, basis=BASIS, rank=0, world_size=2, pod="new-0").write is None
    other = rules.basis(2, ("labels.car > 0",), SPEC)
    assert rules.for_plan(stored, basis=other, rank=0, world_size=2, pod="x").progress is None


def test_a_pod_reports_only_its_own_rank_and_never_lowers() -> None:
    stored = _take(None, _report(0, 4, ((5,),)), 0, 4, "pod-0")
    with pytest.raises(Refused, match="rank 0 of 4") as info:
        _take(stored, _report(1, 4, ((9,),)), 0, 4, "pod-0")
    assert info.value.status == 403
    with pytest.raises(Refused, match="consumed less") as info:
        _take(stored, _report(0, 4, ((4,),)), 0, 4, "pod-0")
    assert info.value.status == 409
    with pytest.raises(Refused, match="does not fit") as info:
        _take(stored, _report(0, 4, ((99,),)), 0, 4, "pod-0")
    assert info.value.status == 400
    # Another pod of rank 0 takes over with a plan: the first one's reports stop counting.
    plan = rules.for_plan(stored, basis=BASIS, rank=0, world_size=4, pod="pod-0b")
    assert plan.write is not None
    with pytest.raises(Refused, match="another pod"):
        _take(plan.write, _report(0, 4, ((6,),)), 0, 4, "pod-0")
    assert _take(plan.write, _report(0, 4, ((6,),)), 0, 4, "pod-0b") is not None
    # After a re-cut, a pod of the old world size reports into a closed segment.
    recut = rules.for_plan(stored, basis=BASIS, rank=0, world_size=2, pod="new-0").write
    with pytest.raises(Refused, match="closed") as info:
        _take(recut, _report(1, 4, ((6,),)), 1, 4, "pod-1")
    assert info.value.status == 409


def test_a_new_epoch_starts_afresh_and_an_old_one_is_over() -> None:
    stored = _take(None, _report(0, 4, ((5,),)), 0, 4, "pod-0")
    newer = ProgressReport(epoch=1, segment=0, world_size=4, rank=2, consumed=((1,),))
    fresh = _take(stored, newer, 2, 4, "pod-2")
    assert fresh is not None
    assert (fresh.epoch, fresh.segments[0].consumed[0]) == (1, [])
    with pytest.raises(Refused, match="is over"):
        _take(fresh, _report(0, 4, ((6,),)), 0, 4, "pod-0")


def test_progress_stays_bounded() -> None:
    huge = ProgressReport(epoch=0, segment=0, world_size=4096, rank=0, consumed=((1,),))
    stored = rules.take_report(
        None, huge, basis=BASIS, rank=0, world_size=4096, pod="p" * 36, length=lambda _: 10
    )
    assert stored is not None
    many = [f"{i:036d}" for i in range(4096)]
    with pytest.raises(Refused, match="bytes"):
        rules._bounded(stored.model_copy(update={"owners": many}))


def test_a_mix_basis_changes_with_any_source_weight_or_epoch_length() -> None:
    spec = ShardSpec(seed=3)
    parts = [rules.basis(1, ("labels.car > 0",), spec), rules.basis(2, ("",), spec)]
    base = rules.mix_basis(parts, [0.75, 0.25], "first_exhausted")
    assert base == rules.mix_basis(list(parts), [0.75, 0.25], "first_exhausted")
    changed = [
        rules.mix_basis([parts[0], rules.basis(3, ("",), spec)], [0.75, 0.25], "first_exhausted"),
        rules.mix_basis(parts, [0.7, 0.3], "first_exhausted"),
        rules.mix_basis(parts, [0.75, 0.25], "all_exhausted"),
        rules.mix_basis(parts[::-1], [0.75, 0.25], "first_exhausted"),
    ]
    assert base not in changed
    assert len(set(changed)) == len(changed)
