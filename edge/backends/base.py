"""The inference backend protocol: one tiny interface, one file per runtime.

A :class:`Classifier` takes a batch of crops as RGB ``uint8`` (N, S, S, 3) — S the
bundle's ``input_size`` — and returns class probabilities as float32 (N, C), C the
bundle's number of classes (a binary sigmoid model's single output p becomes the two
columns [1 - p, p]). Quantized int8/uint8 inputs and outputs are handled here from the
manifest's scale and zero point, so callers never see them.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from edgecells.edge.bundle import Bundle, ModelEntry, TensorSpec
from edgecells.edge.errors import EdgecellsError

# Crops per inference call; bigger batches are split (bounded memory on a Pi).
MAX_BATCH = 64


@runtime_checkable
class Classifier(Protocol):
    """What every backend returns from ``open``."""

    backend: str
    model: ModelEntry

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """RGB uint8 (N, S, S, 3) -> probabilities float32 (N, C)."""
        ...

    def close(self) -> None:
        """Release the runtime's resources."""
        ...


def check_batch(batch: np.ndarray, size: int, name: str = "batch") -> np.ndarray:
    """A contiguous uint8 (N, size, size, 3) array; one image (S, S, 3) becomes N=1."""
    if not isinstance(batch, np.ndarray):
        raise EdgecellsError(f"{name}: expected a numpy array of crops")
    if batch.ndim == 3:
        batch = batch[None]
    if batch.ndim != 4 or batch.shape[1:] != (size, size, 3):
        raise EdgecellsError(
            f"{name}: crops must be (N, {size}, {size}, 3), got {tuple(batch.shape)}"
        )
    if batch.dtype != np.uint8:
        raise EdgecellsError(f"{name}: crops must be uint8 RGB, got {batch.dtype}")
    return np.ascontiguousarray(batch)


def quantize_input(batch: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """uint8 pixels (0..255) -> the model's input dtype (float32, int8 or uint8)."""
    if not spec.quantized:
        return batch.astype(np.float32 if spec.dtype == "float32" else spec.dtype)
    scale, zp = float(spec.scale), int(spec.zero_point)  # type: ignore[arg-type]
    if scale == 1.0:  # the usual case: int8 = pixel - 128, uint8 = pixel
        if spec.dtype == "int8" and zp == -128:
            return (batch ^ np.uint8(128)).view(np.int8)
        if spec.dtype == "uint8" and zp == 0:
            return batch
    info = np.iinfo(np.dtype(spec.dtype))
    q = np.round(batch.astype(np.float32) / scale) + zp
    return np.clip(q, info.min, info.max).astype(spec.dtype)


def dequantize_output(out: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """The model's raw output -> float32."""
    if spec.quantized:
        return (out.astype(np.float32) - float(spec.zero_point)) * float(spec.scale)  # type: ignore[arg-type]
    return out.astype(np.float32, copy=False)


def to_probabilities(out: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, C) float32; a single sigmoid column becomes [1 - p, p] for a 2-class bundle."""
    out = out.reshape(out.shape[0], -1)
    if out.shape[1] == 1 and num_classes == 2:
        p = np.clip(out[:, 0], 0.0, 1.0)
        out = np.stack([1.0 - p, p], axis=1)
    if out.shape[1] != num_classes:
        raise EdgecellsError(f"model output has {out.shape[1]} columns for {num_classes} classes")
    return np.ascontiguousarray(out, dtype=np.float32)


class BaseClassifier:
    """Shared batching and (de)quantization; subclasses implement ``_run`` on one chunk."""

    backend = "base"

    def __init__(self, bundle: Bundle, model: ModelEntry, max_batch: int = MAX_BATCH) -> None:
        self.bundle = bundle
        self.model = model
        self.size = bundle.input_size
        self.num_classes = bundle.num_classes
        self.max_batch = max(1, int(max_batch))

    def _run(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def predict(self, batch: np.ndarray) -> np.ndarray:
        x = check_batch(batch, self.size)
        if x.shape[0] == 0:
            return np.zeros((0, self.num_classes), dtype=np.float32)
        outs = []
        for i in range(0, x.shape[0], self.max_batch):
            q = quantize_input(x[i : i + self.max_batch], self.model.input)
            raw = self._run(q)
            outs.append(dequantize_output(raw, self.model.output))
        return to_probabilities(np.concatenate(outs, axis=0), self.num_classes)

    def close(self) -> None:
        pass

    def __enter__(self) -> BaseClassifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.model.id} ({self.backend})>"


def _view(batch: np.ndarray, name: str) -> np.ndarray:
    """One test-time view of a (N, S, S, 3) batch (a pure pixel permutation)."""
    if name == "hflip":
        v = batch[:, :, ::-1]
    elif name == "vflip":
        v = batch[:, ::-1]
    elif name == "transpose":
        v = batch.transpose(0, 2, 1, 3)
    elif name == "rot180":
        v = batch[:, ::-1, ::-1]
    else:
        v = batch
    return np.ascontiguousarray(v)


class ViewAveraged:
    """A :class:`Classifier` whose probabilities are the mean over test-time views of each
    crop (the bundle's ``preprocessing.test_time_views``): one inference per view, so the
    inference stage costs that many times as much; everything else is unchanged."""

    def __init__(self, inner: Classifier, views: list[str]) -> None:
        self.inner = inner
        self.views = list(views)
        self.backend = inner.backend
        self.model = inner.model

    def predict(self, batch: np.ndarray) -> np.ndarray:
        if not isinstance(batch, np.ndarray) or batch.ndim not in (3, 4):
            return self.inner.predict(batch)  # the inner backend names the problem
        b = batch[None] if batch.ndim == 3 else batch
        total = None
        for name in self.views:
            p = np.asarray(self.inner.predict(_view(b, name)), dtype=np.float64)
            total = p if total is None else total + p
        return (total / len(self.views)).astype(np.float32)  # type: ignore[operator]

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> object:  # threads, max_batch, ... of the backend
        return getattr(self.inner, name)
