"""The architecture zoo: published input sizes and heads; one converts in CI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgecells.convert import zoo
from edgecells.edge.errors import EdgecellsError

pytest.importorskip("tensorflow")


def test_registry_matches_the_publications() -> None:
    sizes = {name: (e.app, e.size, e.num_classes) for name, e in zoo.ZOO.items()}
    assert sizes == {
        "inception-resnet-v2-180": ("InceptionResNetV2", 180, 1),
        "resnet50-64": ("ResNet50", 64, 8),
        "resnet50-224": ("ResNet50", 224, 8),
        "resnet101-64": ("ResNet101", 64, 8),
        "resnet101-224": ("ResNet101", 224, 8),
        "vgg19-224": ("VGG19", 224, 8),
    }
    with pytest.raises(EdgecellsError, match="unknown zoo model"):
        zoo.get("alexnet")
    classes, mapping, task = zoo.classes_and_mapping("inception-resnet-v2-180")
    assert classes == ["normal", "abnormal"] and task == "binary"
    assert [c["abnormal"] for c in mapping["classes"]] == [False, True]


def test_binary_head_and_rescaling_front() -> None:
    m = zoo.build("inception-resnet-v2-180")
    assert m.input_shape == (None, 180, 180, 3) and m.output_shape == (None, 1)
    assert m.layers[1].name == "rescale"
    p = m.predict(np.full((1, 180, 180, 3), 255.0, np.float32), verbose=0)
    assert 0.0 <= float(p[0, 0]) <= 1.0


@pytest.mark.slow
def test_resnet50_64_converts_to_tflite_and_onnx(tmp_path: Path) -> None:
    """CI conversion of the smallest published architecture (TFLite + ONNX: the OpenVINO
    path runs in benchmarks/bench_convert.py with every zoo model)."""
    from edgecells.convert.pipeline import convert_model
    from edgecells.convert.source import from_keras
    from edgecells.edge.backends import open_classifier
    from edgecells.edge.bundle import load_bundle

    name = "resnet50-64"
    classes, mapping, task = zoo.classes_and_mapping(name)
    calib = zoo.synthetic_calibration(64, 16)
    assert calib.x.shape == (16, 64, 64, 3)
    res = convert_model(
        from_keras(zoo.build(name), Path(f"{name}.keras")),
        calib,
        tmp_path / "b",
        ["tflite", "onnx"],
        classes=classes,
        mapping=mapping,
        task=task,
        keep_float=False,
        continue_on_error=True,
        analyse_layers=False,
    )
    for r in res.formats:
        assert r.error is None
        assert r.int8_bytes <= 0.30 * r.float32_bytes  # int8 is about a quarter
        assert r.validation is not None and r.validation.n == 16
    b = load_bundle(tmp_path / "b")
    assert [m.id for m in b.models] == ["tflite-int8", "onnx-int8"]
    assert open_classifier(b, backend="onnxruntime").predict(calib.x[:3]).shape == (3, 8)
