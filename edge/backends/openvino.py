"""OpenVINO IR models (.xml + .bin) on the OpenVINO CPU plugin."""

from __future__ import annotations

import importlib.util

import numpy as np

from edgecells.edge.backends.base import MAX_BATCH, BaseClassifier
from edgecells.edge.bundle import Bundle, ModelEntry
from edgecells.edge.errors import EdgecellsError

NAME = "openvino"
FORMAT = "openvino"
DEVICE = "CPU"


def available() -> bool:
    return importlib.util.find_spec("openvino") is not None


class OpenVINOClassifier(BaseClassifier):
    backend = NAME

    def __init__(
        self,
        bundle: Bundle,
        model: ModelEntry,
        threads: int | None,
        max_batch: int = MAX_BATCH,
        precision_hint: str = "f32",
    ) -> None:
        super().__init__(bundle, model, max_batch)
        try:
            import openvino as ov
        except ImportError:
            raise EdgecellsError("openvino: runtime not installed (pip install openvino)") from None
        core = ov.Core()
        xml, weights = bundle.path_of(model, 0), bundle.path_of(model, 1)
        try:
            net = core.read_model(str(xml), str(weights))
            # Any batch size: one inference call per frame with all its crops.
            net.reshape(ov.PartialShape([-1, self.size, self.size, 3]))
        except RuntimeError as exc:
            raise EdgecellsError(f"{xml}: not a loadable OpenVINO model ({exc})") from None
        # Without the f32 hint, CPUs with bf16/AMX run the non-quantized parts in bf16.
        config: dict[str, object] = {"INFERENCE_PRECISION_HINT": precision_hint}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self._compiled = core.compile_model(net, DEVICE, config)
        self._request = self._compiled.create_infer_request()

    def _run(self, x: np.ndarray) -> np.ndarray:
        res = self._request.infer({0: x})
        return np.asarray(res[self._compiled.outputs[0]])

    def close(self) -> None:
        self._request = None
        self._compiled = None


def open(
    bundle: Bundle, model: ModelEntry, threads: int | None = None, max_batch: int = MAX_BATCH
) -> OpenVINOClassifier:
    return OpenVINOClassifier(bundle, model, threads, max_batch)
