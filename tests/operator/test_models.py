"""The custom resources' models: what a DatasetStream may say, and the parts it reads."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError
from sluicegate_operator.models import DatasetStream


def _stream(**spec: Any) -> DatasetStream:
    return DatasetStream.model_validate(
        {"metadata": {"name": "mix", "namespace": "team"}, "spec": spec, "status": {}}
    )


def _source(name: str, weight: float = 1.0, **extra: Any) -> dict[str, Any]:
    return {"name": name, "dataset": {"name": name}, "weight": weight, **extra}


def test_a_stream_reads_one_dataset_or_a_mix_of_sources() -> None:
    one = _stream(dataset={"name": "coco", "namespace": "data"}, query="labels.car > 0", version=3)
    [part] = one.parts()
    assert (part.name, part.namespace, part.dataset, part.version, part.query) == (
        None, "data", "coco", 3, "labels.car > 0",
    )  # fmt: skip
    assert part.label() == "Dataset data/coco"
    mix = _stream(sources=[_source("coco", 0.7, version=2), _source("web", 0.3, query="labels.x > 1")])
    assert mix.is_mix
    parts = mix.parts()
    assert [(p.index, p.name, p.namespace, p.version, p.weight) for p in parts] == [
        (0, "coco", "team", 2, 0.7),
        (1, "web", "team", "latest", 0.3),
    ]
    assert parts[1].label() == "source web (Dataset team/web)"
    assert mix.part("web") == parts[1]
    assert mix.part("other") is None
    assert mix.part(None) is None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({}, "exactly one of spec.dataset and spec.sources"),
        ({"dataset": {"name": "a"}, "sources": [_source("a"), _source("b")]}, "exactly one"),
        ({"sources": [_source("a"), _source("b")], "query": "labels.x > 0"}, "each source has its own query"),
        ({"sources": [_source("a"), _source("b")], "version": 2}, "each source has its own query"),
        ({"sources": [_source("a"), _source("a")]}, "names must be unique"),
        ({"sources": [_source("a")]}, "at least 2"),
        ({"sources": [_source("a", 0), _source("b")]}, "greater than 0"),
        ({"sources": [_source("A_b"), _source("b")]}, "should match pattern"),
    ],
)
def test_a_stream_that_says_something_impossible_is_refused_saying_what(
    spec: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        _stream(**spec)
