"""A tiny classifier trained in seconds: for tests and the test bundle fixture.

``python -m edgecells.convert.tiny OUT_DIR`` trains it on ``tests/fixtures/pbc`` (training
split), builds a calibration set the device way and converts it to all three int8
formats: that is ``tests/fixtures/bundle_tiny``. It is not a useful classifier (48
images); it exercises every path of conversion, bundles and backends.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

TINY_SIZE = 32
TINY_EPOCHS = 60
TINY_SEED = 0


def build_tiny(num_classes: int, size: int = TINY_SIZE, binary: bool = False) -> Any:
    """A few-thousand-parameter CNN taking RGB 0..255 (Rescaling inside)."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(TINY_SEED)
    inp = keras.Input((size, size, 3), name="image")
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0)(inp)
    x = layers.Conv2D(8, 3, strides=2, padding="same")(x)
    x = layers.ReLU(6.0)(x)
    x = layers.DepthwiseConv2D(3, padding="same")(x)
    x = layers.ReLU(6.0)(x)
    x = layers.Conv2D(16, 1, strides=1)(x)
    x = layers.ReLU(6.0)(x)
    x = layers.GlobalAveragePooling2D()(x)
    if binary:
        out = layers.Dense(1, activation="sigmoid")(x)
    else:
        out = layers.Dense(num_classes, activation="softmax")(x)
    return keras.Model(inp, out, name="tiny")


def train_tiny(x: np.ndarray, y: np.ndarray, num_classes: int, epochs: int = TINY_EPOCHS) -> Any:
    import keras

    model = build_tiny(num_classes, x.shape[1])
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(x.astype(np.float32), y, epochs=epochs, batch_size=16, verbose=0)
    return model


def make_fixture_bundle(data: Path, out: Path, size: int = TINY_SIZE) -> Any:
    """Train on ``data`` (train split), calibrate and convert into bundle folder ``out``."""
    from edgecells.calibration.calibset import build_calibset
    from edgecells.calibration.datasets import fit_stain_target, load_dataset, load_split
    from edgecells.convert.pipeline import convert_model
    from edgecells.convert.source import load_source
    from edgecells.edge.mappings import load_mapping

    mapping = load_mapping("pbc8")
    ds = load_dataset(data, mapping=mapping)
    work = Path(tempfile.mkdtemp(prefix="edgecells-tiny-"))
    target, _ = fit_stain_target(ds, "train", cache_dir=work)
    train = load_split(ds, "train", size, target, use_cache=False)
    test = load_split(ds, "test", size, target, use_cache=False)
    model = train_tiny(train.x, train.y, len(mapping.classes))
    # a relative data path keeps machine paths out of the manifest
    calib = build_calibset(Path(os.path.relpath(data)), target, size, per_class=3, mapping=mapping)
    keras_path = work / "tiny.keras"
    model.save(keras_path)
    src = load_source(keras_path)
    res = convert_model(
        src,
        calib,
        out,
        classes=list(mapping.classes),
        mapping=mapping.to_dict(),
        val_x=test.x,
        val_y=test.y,
        val_desc=f"{data.name} test split ({test.x.shape[0]} images)",
        max_drop=100.0,
        name="tiny-test",
    )
    shutil.rmtree(work, ignore_errors=True)
    return res


if __name__ == "__main__":  # pragma: no cover - fixture generator
    root = Path(__file__).resolve().parents[1]
    res = make_fixture_bundle(root / "tests" / "fixtures" / "pbc", Path(sys.argv[1]))
    import json

    print(json.dumps(res.to_dict(), indent=2))
