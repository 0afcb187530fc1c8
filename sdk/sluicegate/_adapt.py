"""What the PyTorch and TensorFlow adapters share, free of either framework.

Plain Python and NumPy, so both adapters (and their tests) use one implementation of label maps,
annotation rows and box conversion.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from sluicegate._exceptions import ConfigError
from sluicegate.core.manifest import Annotation

__all__ = ["LabelMap", "annotation_dicts", "detection_arrays"]


class LabelMap:
    """Class name -> integer index, from a list (index = position + ``start``) or an explicit mapping."""

    def __init__(self, labels: Sequence[str] | Mapping[str, int], *, start: int = 0) -> None:
        if isinstance(labels, str):
            raise ConfigError("labels must be a list of class names or a {name: index} mapping, not a string")
        if isinstance(labels, Mapping):
            self._index = {str(k): int(v) for k, v in labels.items()}
        else:
            self._index = {name: i + start for i, name in enumerate(labels)}
            if len(self._index) != len(labels):
                raise ConfigError(f"labels lists a class twice: {list(labels)}")

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, label: str) -> int:
        try:
            return self._index[label]
        except KeyError:
            known = ", ".join(sorted(self._index)[:20])
            raise ConfigError(
                f"label {label!r} is not in the label map (knows: {known}); add it, or slice the dataset "
                "to the classes the model knows"
            ) from None

    def as_dict(self) -> dict[str, int]:
        return dict(self._index)


def annotation_dicts(annotations: Sequence[Annotation]) -> list[dict[str, Any]]:
    """Annotations as plain dicts (picklable, collatable as lists)."""
    return [
        {
            "label": a.label,
            "bbox": list(a.bbox) if a.bbox is not None else None,
            "polygon": a.polygon,
            "iscrowd": a.iscrowd,
            "attributes": dict(a.attributes),
        }
        for a in annotations
    ]


def detection_arrays(
    annotations: Sequence[Mapping[str, Any]], labels: LabelMap | None
) -> tuple[npt.NDArray[np.float32], list[str], npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """Boxes as ``x1, y1, x2, y2`` float32 ``[N, 4]``, their class names, class indexes and crowd flags.

    ``annotations`` are :func:`annotation_dicts` rows. Those without a box, or whose box has no area, are
    left out: detection losses need positive-area boxes (torchvision asserts it). Without ``labels`` the
    class indexes are -1.
    """
    kept = [a for a in annotations if a["bbox"] is not None and a["bbox"][2] > 0 and a["bbox"][3] > 0]
    boxes = np.array([a["bbox"] for a in kept], dtype=np.float32).reshape(len(kept), 4)
    boxes[:, 2:] += boxes[:, :2]  # x, y, w, h -> x1, y1, x2, y2
    names = [str(a["label"]) for a in kept]
    ids = np.array([labels[n] for n in names] if labels is not None else [-1] * len(names), dtype=np.int64)
    crowd = np.array([bool(a["iscrowd"]) for a in kept], dtype=np.bool_)
    return boxes, names, ids, crowd
