"""TensorFlow adapter: a sluicegate dataset as a ``tf.data.Dataset``.

The pipeline, built from ``ds.to_tensorflow(...)``:

1. a Python generator walks this rank's epoch order with read-ahead (the data path fetches many items
   concurrently) and yields *chunks* of items as one element each, under an explicit
   ``output_signature`` (boxes and class names as ``tf.RaggedTensorSpec``), so Python runs once per
   chunk, not once per tensor;
2. ``unbatch`` to samples, then decoding (``tf.io.decode_image``) in parallel with ``AUTOTUNE``;
3. optional batching (``ragged_batch``: fixed-shape features stay dense, boxes become ragged), an
   optional ``(x, y)`` mapping for ``keras.Model.fit``, and ``prefetch(AUTOTUNE)``.

Each pass over the returned dataset is one epoch: the first follows ``ds``'s current epoch, every new
pass (a new ``fit`` epoch) the next one, so shuffled datasets reshuffle like ``DistributedSampler``.

This is the only sluicegate module that imports tensorflow.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from itertools import islice
from typing import Any, Literal

import numpy as np
import tensorflow as tf

from sluicegate._adapt import LabelMap, annotation_dicts, detection_arrays
from sluicegate._dataset import Item
from sluicegate._exceptions import ConfigError
from sluicegate._mix import Mix, Readable

__all__ = ["to_tensorflow"]

Decode = Literal["bytes", "image"]
_CHANNELS = {"RGB": 3, "L": 1}


class _Chunks:
    """The generator behind the pipeline: one call per pass, one element per chunk of items."""

    def __init__(self, ds: Readable, chunk: int, labels: LabelMap | None) -> None:
        self._ds = ds
        self._chunk = chunk
        self._labels = labels
        self._next_epoch = ds.epoch
        self._sourced = isinstance(ds, Mix)  # a mix's samples say which source they came from

    def signature(self) -> dict[str, tf.TypeSpec]:
        spec: dict[str, tf.TypeSpec] = {
            "id": tf.TensorSpec([None], tf.string),
            "index": tf.TensorSpec([None], tf.int64),
            "data": tf.TensorSpec([None], tf.string),
            "width": tf.TensorSpec([None], tf.int32),
            "height": tf.TensorSpec([None], tf.int32),
            "boxes": tf.RaggedTensorSpec([None, None, 4], tf.float32, ragged_rank=1),
            "classes": tf.RaggedTensorSpec([None, None], tf.string, ragged_rank=1),
        }
        if self._labels is not None:
            spec["class_ids"] = tf.RaggedTensorSpec([None, None], tf.int64, ragged_rank=1)
            spec["label"] = tf.TensorSpec([None], tf.int64)
        if self._sourced:
            spec["source"] = tf.TensorSpec([None], tf.string)
        return spec

    def __call__(self) -> Iterator[dict[str, Any]]:
        epoch, self._next_epoch = self._next_epoch, self._next_epoch + 1
        self._ds.set_epoch(epoch)
        order = self._ds.epoch_positions()
        items = self._ds._iter_epoch(order=order)  # recorded when the ledger is on
        for start in range(0, len(order), self._chunk):
            batch = list(islice(items, self._chunk))
            yield self._element(batch, order[start : start + len(batch)])

    def _element(self, items: Sequence[Item], positions: np.ndarray[Any, Any]) -> dict[str, Any]:
        rows = [detection_arrays(annotation_dicts(item.annotations), self._labels) for item in items]
        lengths = np.array([len(r[0]) for r in rows], dtype=np.int64)
        element: dict[str, Any] = {
            "id": np.array([item.id for item in items], dtype=object),
            "index": np.asarray(positions, dtype=np.int64),
            "data": np.array([item.data for item in items], dtype=object),
            "width": np.array([-1 if item.width is None else item.width for item in items], dtype=np.int32),
            "height": np.array(
                [-1 if item.height is None else item.height for item in items], dtype=np.int32
            ),
            "boxes": tf.RaggedTensor.from_row_lengths(
                np.concatenate([r[0] for r in rows]) if rows else np.zeros((0, 4), np.float32), lengths
            ),
            "classes": tf.RaggedTensor.from_row_lengths(
                np.array([name.encode() for r in rows for name in r[1]], dtype=object), lengths
            ),
        }
        if self._labels is not None:
            labels = self._labels
            element["class_ids"] = tf.RaggedTensor.from_row_lengths(
                np.concatenate([r[2] for r in rows]) if rows else np.zeros(0, np.int64), lengths
            )
            # The item's class for classification: its first annotation's (boxes or not), -1 if none.
            element["label"] = np.array(
                [labels[item.annotations[0].label] if item.annotations else -1 for item in items],
                dtype=np.int64,
            )
        if self._sourced:
            element["source"] = np.array([item.source or "" for item in items], dtype=object)
        return element


def to_tensorflow(
    ds: Readable,
    *,
    batch_size: int | None = 32,
    decode: Decode = "bytes",
    image_mode: Literal["RGB", "L"] = "RGB",
    image_size: tuple[int, int] | None = None,
    labels: Sequence[str] | Mapping[str, int] | None = None,
    label_key: str | None = None,
    xy: Callable[[dict[str, Any]], Any] | None = None,
    drop_remainder: bool = False,
    chunk_size: int = 256,
) -> tf.data.Dataset:
    """``ds`` as a ``tf.data.Dataset`` of sample dicts (or ``(x, y)`` pairs for Keras).

    A sample has ``id``, ``index``, ``data`` (the file's bytes, ``tf.string``) or with
    ``decode="image"`` an ``image`` (``uint8 [H, W, C]`` in ``image_mode``, resized to ``image_size``
    when given), ``width``/``height`` (-1 unknown), ``boxes`` (``float32 [N, 4]``, x1 y1 x2 y2) and
    ``classes`` (the boxes' class names). With ``labels`` (class names, index = position, or a mapping)
    it also has ``class_ids`` per box and ``label``, the item's first annotation's class index. Over a
    mix (``sluicegate.mix``), ``source`` is the name of the source each sample came from.

    ``batch_size`` batches with ``ragged_batch`` (``None``: unbatched samples); images batch densely only
    with a fixed ``image_size``. For ``keras.Model.fit``, ``label_key`` maps samples to
    ``(image or data, sample[label_key])``, or ``xy`` maps them with any callable. ``chunk_size`` is how
    many items one generator step hands to TensorFlow.
    """
    if decode not in ("bytes", "image"):
        raise ConfigError(f"decode must be 'bytes' or 'image', got {decode!r}")
    if image_mode not in _CHANNELS:
        raise ConfigError(f"image_mode must be 'RGB' or 'L', got {image_mode!r}")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1 or None, got {batch_size}")
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
    if image_size is not None and (decode != "image" or len(image_size) != 2 or min(image_size) < 1):
        raise ConfigError(
            f"image_size must be (height, width) >= 1 and needs decode='image', got {image_size}"
        )
    if label_key is not None and xy is not None:
        raise ConfigError("pass label_key or xy, not both")
    label_map = LabelMap(labels) if labels is not None else None
    if label_key in ("label", "class_ids") and label_map is None:
        raise ConfigError(f"label_key={label_key!r} needs labels=[class names] to map names to indexes")

    chunks = _Chunks(ds, chunk_size, label_map)
    data = tf.data.Dataset.from_generator(chunks, output_signature=chunks.signature()).unbatch()
    if decode == "image":
        data = data.map(_decoder(_CHANNELS[image_mode], image_size), num_parallel_calls=tf.data.AUTOTUNE)
    count = len(ds)
    if batch_size is not None:
        data = data.ragged_batch(batch_size, drop_remainder=drop_remainder)
        count = count // batch_size if drop_remainder else -(-count // batch_size)
    if label_key is not None:
        x_key = "image" if decode == "image" else "data"
        key = label_key
        data = data.map(lambda s: (s[x_key], s[key]), num_parallel_calls=tf.data.AUTOTUNE)
    elif xy is not None:
        data = data.map(xy, num_parallel_calls=tf.data.AUTOTUNE)
    # A known length gives Keras its progress bar and steps per epoch.
    return data.apply(tf.data.experimental.assert_cardinality(count)).prefetch(tf.data.AUTOTUNE)


def _decoder(
    channels: int, size: tuple[int, int] | None
) -> Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]]:
    def decode(sample: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        out = dict(sample)
        image = tf.io.decode_image(out.pop("data"), channels=channels, expand_animations=False)
        if size is not None:
            resized = tf.image.resize(image, size)
            image = tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
            image.set_shape([size[0], size[1], channels])
        out["image"] = image
        return out

    return decode
