"""Inference backends: one small module per runtime, chosen by name or automatically.

>>> from edgecells.edge.backends import open_classifier
>>> clf = open_classifier(bundle, backend="auto", threads=4)
>>> probs = clf.predict(crops)          # uint8 (N, S, S, 3) -> float32 (N, C)

``available_backends()`` lists the runtimes importable here (checked without importing
them). ``backend="auto"`` takes the first of :data:`AUTO_ORDER` that is installed and
has a model in the bundle; before those, a TensorRT engine built on this Jetson
(``trt/engine.json``, see :mod:`.tensorrt`) when TensorRT and a CUDA device are present.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from edgecells.edge.backends.base import MAX_BATCH, BaseClassifier, Classifier, ViewAveraged
from edgecells.edge.bundle import Bundle, check_views, load_bundle
from edgecells.edge.errors import EdgecellsError

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "BaseClassifier",
    "Classifier",
    "ViewAveraged",
    "available_backends",
    "backend_module",
    "open_classifier",
]

# Backend name -> module; the runtime itself is imported only when a model is opened.
BACKENDS = {
    "litert": "edgecells.edge.backends.litert",
    "onnxruntime": "edgecells.edge.backends.onnxruntime",
    "openvino": "edgecells.edge.backends.openvino",
    "tensorrt": "edgecells.edge.backends.tensorrt",
}
# LiteRT first: smallest runtime, what a Pi has; ONNX Runtime (Jetson: TensorRT/CUDA) next.
AUTO_ORDER = ("litert", "onnxruntime", "openvino")
ALIASES = {"tflite": "litert", "onnx": "onnxruntime", "ov": "openvino", "trt": "tensorrt"}


def backend_module(name: str) -> ModuleType:
    key = ALIASES.get(name, name)
    if key not in BACKENDS:
        raise EdgecellsError(f"unknown backend {name!r} (choose from auto, {', '.join(BACKENDS)})")
    return importlib.import_module(BACKENDS[key])


def available_backends() -> list[str]:
    """Names of the backends whose runtime is installed (in AUTO_ORDER)."""
    return [n for n in AUTO_ORDER if backend_module(n).available()]


def open_classifier(
    bundle: Bundle | str | os.PathLike[str] | None = None,
    backend: str = "auto",
    threads: int | None = None,
    precision: str = "int8",
    model_id: str | None = None,
    max_batch: int = MAX_BATCH,
    views: list[str] | None = None,
) -> Classifier:
    """Open the bundle's model on a backend; ``bundle`` None = the shipped reference bundle.

    ``backend``: ``auto`` or one of :data:`BACKENDS` (aliases: tflite, onnx, ov).
    ``precision``: ``int8`` (deployed) or ``float32`` (reference models, if kept).
    ``model_id`` picks a model by its manifest id and overrides backend/precision.
    ``views``: test-time views to average (default: the bundle's
    ``preprocessing.test_time_views``; ``["identity"]`` = the raw model).
    """
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    v = b.test_time_views if views is None else check_views(list(views), "open_classifier", "views")
    clf = _open_raw(b, backend, threads, precision, model_id, max_batch)
    return clf if v == ["identity"] else ViewAveraged(clf, v)


def _open_raw(
    b: Bundle,
    backend: str,
    threads: int | None,
    precision: str,
    model_id: str | None,
    max_batch: int,
) -> Classifier:
    """The backend's classifier for the bundle's raw model (no test-time views)."""
    if model_id is not None:
        model = b.model(model_id=model_id)
        mod = backend_module(model.backend)
        if not mod.available():
            raise EdgecellsError(f"{model.backend}: runtime not installed for model {model_id!r}")
        return mod.open(b, model, threads=threads, max_batch=max_batch)
    if backend == "auto":
        trt = backend_module("tensorrt").auto_open(b, precision, threads, max_batch)
        if trt is not None:  # None unless an engine, TensorRT and a GPU are all present
            return trt
        have = set(b.formats(precision))
        for name in AUTO_ORDER:
            mod = backend_module(name)
            if mod.FORMAT in have and mod.available():
                return mod.open(
                    b, b.model(mod.FORMAT, precision), threads=threads, max_batch=max_batch
                )
        raise EdgecellsError(
            f"{b.source or b.root}: no installed runtime for its {precision} models "
            f"({', '.join(sorted(have)) or 'none'}); installed: "
            f"{', '.join(available_backends()) or 'none'}"
        )
    mod = backend_module(backend)
    if not mod.available():
        raise EdgecellsError(f"{mod.NAME}: runtime not installed")
    if mod.NAME == "tensorrt":  # the engine decides the model (int8, or fp16 from float32)
        model = mod.engine_model(b, precision)
    else:
        model = b.model(mod.FORMAT, precision)
    return mod.open(b, model, threads=threads, max_batch=max_batch)
