"""ONNX models (float or QDQ int8) on ONNX Runtime (CPU; CUDA/TensorRT when installed)."""

from __future__ import annotations

import importlib.util

import numpy as np

from edgecells.edge.backends.base import MAX_BATCH, BaseClassifier
from edgecells.edge.bundle import Bundle, ModelEntry
from edgecells.edge.errors import EdgecellsError

NAME = "onnxruntime"
FORMAT = "onnx"
# Preferred execution providers, best first; only those the installed build has are used.
PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


class ONNXRuntimeClassifier(BaseClassifier):
    backend = NAME

    def __init__(
        self,
        bundle: Bundle,
        model: ModelEntry,
        threads: int | None,
        max_batch: int = MAX_BATCH,
        providers: list[str] | None = None,
    ) -> None:
        super().__init__(bundle, model, max_batch)
        try:
            import onnxruntime as ort
        except ImportError:
            raise EdgecellsError("onnxruntime: not installed (pip install onnxruntime)") from None
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        have = ort.get_available_providers()
        use = [p for p in (providers or PROVIDERS) if p in have] or ["CPUExecutionProvider"]
        path = bundle.path_of(model)
        try:
            self._sess = ort.InferenceSession(str(path), sess_options=opts, providers=use)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise EdgecellsError(f"{path}: not a loadable ONNX model ({exc})") from None
        self._in = self._sess.get_inputs()[0].name
        self._out = self._sess.get_outputs()[0].name

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self._sess.run([self._out], {self._in: x})[0]

    def close(self) -> None:
        self._sess = None


def open(
    bundle: Bundle, model: ModelEntry, threads: int | None = None, max_batch: int = MAX_BATCH
) -> ONNXRuntimeClassifier:
    return ONNXRuntimeClassifier(bundle, model, threads, max_batch)
