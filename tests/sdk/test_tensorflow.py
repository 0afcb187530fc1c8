"""The TensorFlow adapter: real ``tf.data`` pipelines over real datasets (local directory and S3 server)."""
# ruff: noqa: F811 - the fixtures imported from adapter_fixtures are test parameters here

from __future__ import annotations

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from sluicegate import ConfigError, Dataset

from tests.sdk.adapter_fixtures import N, ds, expected, images  # noqa: F401 - fixtures


def _ids(batch: dict[str, tf.Tensor]) -> list[str]:
    return [x.decode() for x in batch["id"].numpy()]


def test_each_pass_is_one_epoch_in_order_with_bytes(ds: Dataset, expected: dict[str, bytes]) -> None:
    view = ds.shuffle(5)
    data = view.to_tensorflow(batch_size=8, chunk_size=5)  # chunks and batches cut across each other
    assert isinstance(data.element_spec["boxes"], tf.RaggedTensorSpec)
    assert data.cardinality().numpy() == -(-N // 8)
    passes = []
    for epoch in (0, 1):
        view.set_epoch(epoch)
        want = [f"item{p:06d}" for p in view.epoch_positions()]
        got: list[str] = []
        for batch in data:
            ids = _ids(batch)
            assert [bytes(b) for b in batch["data"].numpy()] == [expected[i] for i in ids]
            assert batch["index"].numpy().tolist() == [int(i[4:]) for i in ids]
            got += ids
        assert got == want
        passes.append(got)
    assert passes[0] != passes[1]


def test_boxes_are_ragged_per_batch_in_corner_form(ds: Dataset) -> None:
    batch = next(iter(ds.to_tensorflow(batch_size=6, labels=["car"])))
    assert _ids(batch) == [f"item{i:06d}" for i in range(6)]
    # Item i has i % 3 boxes (x=1, y=2, w=3, h=4).
    assert batch["boxes"].row_lengths().numpy().tolist() == [0, 1, 2, 0, 1, 2]
    assert batch["boxes"].values.numpy().tolist()[0] == [1, 2, 4, 6]
    assert batch["class_ids"].row_lengths().numpy().tolist() == [0, 1, 2, 0, 1, 2]
    assert batch["classes"][2].numpy().tolist() == [b"car", b"car"]
    assert batch["label"].numpy().tolist() == [-1, 0, 0, -1, 0, 0]
    assert batch["width"].numpy().tolist() == [-1] * 6


def test_decoded_images_batch_densely_at_a_fixed_size(images: Dataset) -> None:
    data = images.slice("file.width = 20").to_tensorflow(batch_size=2, decode="image", image_size=(16, 20))
    spec = data.element_spec["image"]
    assert spec.shape.as_list() == [None, 16, 20, 3]
    assert spec.dtype == tf.uint8
    batch = next(iter(data))
    first = images.slice("file.width = 20")[0].data
    want = np.asarray(Image.open(io.BytesIO(first)).convert("RGB"))
    assert np.array_equal(batch["image"][0].numpy(), want)  # resizing to the same size changes nothing
    gray = next(iter(images.to_tensorflow(batch_size=None, decode="image", image_mode="L")))
    assert gray["image"].shape == (16, 20, 1)


def test_label_key_gives_keras_pairs(images: Dataset) -> None:
    data = images.to_tensorflow(
        batch_size=3, decode="image", image_size=(8, 8), labels=["cat", "dog"], label_key="label"
    )
    x, y = next(iter(data))
    assert x.shape == (3, 8, 8, 3)
    assert y.numpy().tolist() == [0, 0, 0]  # each image's first annotation is a cat
    pairs = images.to_tensorflow(batch_size=2, xy=lambda s: (s["data"], s["height"]))
    assert next(iter(pairs))[1].numpy().tolist() == [16, 16]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"decode": "pil"}, "decode must be"),
        ({"batch_size": 0}, "batch_size"),
        ({"image_size": (8, 8)}, "image_size"),
        ({"label_key": "label"}, "needs labels"),
        ({"label_key": "label", "labels": ["car"], "xy": lambda s: s}, "not both"),
        ({"labels": "car"}, "not a string"),
    ],
)
def test_bad_options_are_refused_up_front(ds: Dataset, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ds.to_tensorflow(**kwargs)


def test_unknown_labels_name_the_label(ds: Dataset) -> None:
    with pytest.raises(Exception, match="'car' is not in the label map"):
        next(iter(ds.to_tensorflow(labels=["bus"])))
