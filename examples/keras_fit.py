"""Keras ``fit`` on a sluicegate dataset streamed as a ``tf.data.Dataset``.

Uses the demo's digits (``examples/demo.py`` writes and imports them; re-running is idempotent):
the ``meta.split = "train"`` slice trains, the ``"test"`` slice validates, both streamed with
``to_tensorflow(decode="image", labels=CLASSES, label_key="label")`` so ``fit`` gets ``(image, class)``.

    python examples/keras_fit.py --epochs 3
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up chatter out of the output

import keras
import sluicegate
from demo import CLASSES, DEMO, SIZE, import_digits, prepare_digits


def streamed(ds: sluicegate.Dataset, batch_size: int) -> object:
    return ds.to_tensorflow(
        batch_size=batch_size,
        decode="image",
        image_mode="L",
        image_size=(SIZE, SIZE),
        labels=CLASSES,
        label_key="label",
    )


def fit(uri: str, epochs: int, batch_size: int = 32, steps: int | None = None) -> dict[str, list[float]]:
    ds = sluicegate.open(uri)
    train = streamed(ds.slice('meta.split = "train"').shuffle(0), batch_size)
    test = streamed(ds.slice('meta.split = "test"'), 256)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((SIZE, SIZE, 1), dtype="uint8"),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Conv2D(16, 3, activation="relu", padding="same"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Conv2D(32, 3, activation="relu", padding="same"),
            keras.layers.MaxPooling2D(4),
            keras.layers.Flatten(),
            keras.layers.Dense(len(CLASSES), activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    history = model.fit(
        train, epochs=epochs, steps_per_epoch=steps, validation_data=test, shuffle=False, verbose=2
    )
    return {name: [float(v) for v in values] for name, values in history.history.items()}


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, help="batches per epoch (default: the whole train slice)")
    parser.add_argument("--work-dir", type=Path, default=DEMO, help="where the digits and the store live")
    args = parser.parse_args(argv)
    uri = import_digits(prepare_digits(args.work_dir / "digits"), args.work_dir / "store")
    history = fit(uri, args.epochs, steps=args.steps)
    print(f"accuracy by epoch: {', '.join(f'{a:.3f}' for a in history['accuracy'])}")
    print(f"held-out accuracy: {history['val_accuracy'][-1]:.1%}")
    return history


if __name__ == "__main__":
    main()
