"""TFLite models on LiteRT: ai_edge_litert, else tflite_runtime, else tf.lite (lazily)."""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from edgecells.edge.backends.base import MAX_BATCH, BaseClassifier
from edgecells.edge.bundle import Bundle, ModelEntry
from edgecells.edge.errors import EdgecellsError

NAME = "litert"
FORMAT = "tflite"
_MODULES = ("ai_edge_litert.interpreter", "tflite_runtime.interpreter")


def interpreter_class() -> Any:
    """The first importable TFLite ``Interpreter`` class, or None."""
    for mod in _MODULES:
        try:
            return importlib.import_module(mod).Interpreter
        except ImportError:
            continue
    try:  # the full TensorFlow, host only; never required on a device
        import tensorflow as tf

        return tf.lite.Interpreter
    except ImportError:
        return None


def available() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(m.split(".")[0]) for m in _MODULES) or bool(
        importlib.util.find_spec("tensorflow")
    )


class LiteRTClassifier(BaseClassifier):
    backend = NAME

    def __init__(
        self, bundle: Bundle, model: ModelEntry, threads: int | None, max_batch: int = MAX_BATCH
    ) -> None:
        super().__init__(bundle, model, max_batch)
        cls = interpreter_class()
        if cls is None:
            raise EdgecellsError("litert: no TFLite runtime installed (pip install ai-edge-litert)")
        path = bundle.path_of(model)
        try:
            self._interp = cls(model_path=str(path), num_threads=threads or None)
        except (ValueError, RuntimeError) as exc:
            raise EdgecellsError(f"{path}: not a loadable TFLite model ({exc})") from None
        self._in = self._interp.get_input_details()[0]
        self._out = self._interp.get_output_details()[0]
        self._batch = -1

    def _run(self, x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        if n != self._batch:
            self._interp.resize_tensor_input(self._in["index"], [n, *x.shape[1:]], strict=False)
            self._interp.allocate_tensors()
            self._batch = n
        self._interp.set_tensor(self._in["index"], x)
        self._interp.invoke()
        return self._interp.get_tensor(self._out["index"])

    def close(self) -> None:
        self._interp = None


def open(
    bundle: Bundle, model: ModelEntry, threads: int | None = None, max_batch: int = MAX_BATCH
) -> LiteRTClassifier:
    return LiteRTClassifier(bundle, model, threads, max_batch)
