"""Inference backends on the tiny fixture bundle: shapes, batching, quantization, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgecells.edge.backends import available_backends, backend_module, open_classifier
from edgecells.edge.backends.base import (
    check_batch,
    dequantize_output,
    quantize_input,
    to_probabilities,
)
from edgecells.edge.bundle import TensorSpec, load_bundle
from edgecells.edge.errors import EdgecellsError

TINY = Path(__file__).parent / "fixtures" / "bundle_tiny"
BACKENDS = ["litert", "onnxruntime", "openvino"]


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(TINY)


@pytest.fixture(scope="module")
def crops(bundle) -> np.ndarray:
    """Fixture cells prepared the device way (70 crops: all 48, then flipped ones)."""
    from edgecells.edge.imageio import list_images, read_image
    from edgecells.edge.preprocess import prepare_crop
    from edgecells.edge.stain import ReinhardNormalizer

    norm = ReinhardNormalizer(bundle.load_stain_target())
    files = list_images(Path(__file__).parent / "fixtures" / "pbc")
    x = np.stack([prepare_crop(read_image(f), norm, bundle.input_size) for f in files])
    return np.concatenate([x, x[: 70 - len(x), ::-1]])[:70]


def _need(name: str) -> None:
    if name not in available_backends():
        pytest.skip(f"{name} runtime not installed")


def test_available_backends_lists_installed_runtimes() -> None:
    names = available_backends()
    assert set(names) <= set(BACKENDS)
    assert "litert" in names  # ai-edge-litert is a core dependency


@pytest.mark.parametrize("name", BACKENDS)
def test_predict_shapes_probabilities_and_batching(bundle, crops, name: str) -> None:
    _need(name)
    clf = open_classifier(bundle, backend=name, threads=1, max_batch=32)
    assert clf.backend == name and clf.model.precision == "int8"
    p = clf.predict(crops)  # 70 crops: split into chunks of 32 inside
    assert p.shape == (70, 8) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=0.03)
    assert np.all(p >= 0)
    one_by_one = np.concatenate([clf.predict(crops[i : i + 1]) for i in range(5)])
    np.testing.assert_allclose(one_by_one, p[:5], atol=1e-5)
    assert clf.predict(crops[0]).shape == (1, 8)  # a single HxWx3 crop
    assert clf.predict(crops[:0]).shape == (0, 8)
    clf.close()


@pytest.mark.parametrize("name", BACKENDS)
def test_int8_close_to_float_reference(bundle, crops, name: str) -> None:
    _need(name)
    q = open_classifier(bundle, backend=name).predict(crops)
    f = open_classifier(bundle, backend=name, precision="float32").predict(crops)
    assert np.abs(q - f).max() < 0.15  # tiny model, 24 calibration images


def test_auto_picks_first_installed(bundle) -> None:
    clf = open_classifier(bundle)
    assert clf.backend == available_backends()[0]
    by_id = open_classifier(TINY, model_id="onnx-float32")
    assert by_id.model.id == "onnx-float32" and by_id.backend == "onnxruntime"


def test_bad_input_is_a_user_error(bundle) -> None:
    clf = open_classifier(bundle, backend="litert")
    with pytest.raises(EdgecellsError, match=r"crops must be \(N, 32, 32, 3\)"):
        clf.predict(np.zeros((2, 64, 64, 3), np.uint8))
    with pytest.raises(EdgecellsError, match="must be uint8"):
        clf.predict(np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(EdgecellsError, match="unknown backend"):
        open_classifier(bundle, backend="tensorrt-magic")
    with pytest.raises(EdgecellsError, match="no model"):
        open_classifier(bundle, model_id="nope")


def test_quantization_helpers() -> None:
    x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    i8 = TensorSpec((-1, 16, 16, 3), "int8", 1.0, -128)
    q = quantize_input(x, i8)
    assert q.dtype == np.int8
    np.testing.assert_array_equal(q.astype(np.int16), x.astype(np.int16) - 128)
    u8 = TensorSpec((-1, 16, 16, 3), "uint8", 1.0, 0)
    assert quantize_input(x, u8) is x
    odd = TensorSpec((-1, 16, 16, 3), "int8", 2.0, 5)  # generic path
    np.testing.assert_array_equal(
        quantize_input(x, odd), np.clip(np.round(x / 2.0) + 5, -128, 127).astype(np.int8)
    )
    assert quantize_input(x, TensorSpec((-1, 16, 16, 3), "float32")).dtype == np.float32
    out = TensorSpec((-1, 8), "int8", 1 / 256, -128)
    np.testing.assert_allclose(
        dequantize_output(np.array([[-128, 127]], np.int8), out), [[0.0, 255 / 256]]
    )
    binary = to_probabilities(np.array([[0.2], [0.9]], np.float32), 2)
    np.testing.assert_allclose(binary, [[0.8, 0.2], [0.1, 0.9]], atol=1e-6)
    with pytest.raises(EdgecellsError, match="columns"):
        to_probabilities(np.zeros((2, 3), np.float32), 8)
    with pytest.raises(EdgecellsError):
        check_batch(np.zeros((2, 32, 32), np.uint8), 32)


def test_backend_modules_are_lazy() -> None:
    mod = backend_module("onnx")
    assert mod.NAME == "onnxruntime" and mod.FORMAT == "onnx"
