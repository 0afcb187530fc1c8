"""The examples run for real on small data: a few steps each, checking that training does something."""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _examples_importable() -> Iterator[None]:
    # The examples import each other as scripts in one folder do (keras_fit uses demo's digits).
    sys.path.insert(0, str(EXAMPLES))
    yield
    sys.path.remove(str(EXAMPLES))


def _example(name: str) -> ModuleType:
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> str:
    demo = _example("demo")
    root = tmp_path_factory.mktemp("digits")
    return str(demo.import_digits(demo.prepare_digits(root / "digits"), root / "store"))


def test_demo_trains_well_above_chance_on_the_streamed_slice(digits: str) -> None:
    accuracy = _example("demo").train(digits, epochs=2)
    assert accuracy > 0.85


def test_faster_rcnn_trains_on_streamed_coco(tmp_path: Path) -> None:
    losses = _example("detection_fasterrcnn").main(
        ["--steps", "3", "--images", "8", "--batch-size", "2", "--work-dir", str(tmp_path)]
    )
    assert len(losses) == 3
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]


def test_keras_fit_accuracy_rises(digits: str, tmp_path: Path) -> None:
    history = _example("keras_fit").fit(digits, epochs=2, steps=12)
    assert all(math.isfinite(v) for v in history["loss"])
    assert history["accuracy"][1] > history["accuracy"][0]
    assert history["loss"][1] < history["loss"][0]
