"""Builders for operator unit tests: custom resources as the API server would return them."""

from __future__ import annotations

from typing import Any

from sluicegate_operator.models import Dataset, DatasetStream


def stream(
    name: str = "train", *, generation: int = 1, status: dict[str, Any] | None = None, **spec: Any
) -> DatasetStream:
    # A mix (spec.sources) names its Datasets per source; any other stream reads data/coco.
    body = ({} if "sources" in spec else {"dataset": {"name": "coco", "namespace": "data"}}) | spec
    return DatasetStream.model_validate(
        {
            "metadata": {"name": name, "namespace": "team-a", "generation": generation, "uid": "u-1"},
            "spec": body,
            "status": status or {},
        }
    )


def dataset(**spec: Any) -> Dataset:
    return Dataset.model_validate(
        {
            "metadata": {"name": "coco", "namespace": "data", "generation": 1},
            "spec": {"source": {"uri": "s3://bucket/coco"}, **spec},
        }
    )
