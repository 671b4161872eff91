"""A bundle's ONNX model compiled to a TensorRT engine on a Jetson (``build-trt-engine.sh``).

The engine is a sidecar of the bundle, not part of its manifest: ``<bundle>/trt/engine.json``
(``schema: "edgecells.trt-engine/1"``) names the engine file and records what it was built
from (model id, path and SHA-256 of the ONNX file), its precision, input name, batch
profile [min, opt, max], the device and the TensorRT version. Before the engine is used,
:func:`read_engine_note` checks the engine file's SHA-256 and that the ONNX model it was
built from is the manifest's (itself verified by ``load_bundle``), and
:func:`check_system` that this device and TensorRT are the ones it was built for. Any
mismatch is a one-line :class:`~edgecells.edge.errors.EdgecellsError` with an explicit
``--backend tensorrt``; ``backend="auto"`` logs it and uses the other runtimes instead
(:func:`auto_open`).

Inference goes through TensorRT's Python module (``python3-libnvinfer``, shipped with
JetPack; name-based tensor API, TensorRT >= 8.5) and cuda-python (``cuda.bindings.runtime``
or the older ``cuda.cudart``) for the device buffers and the stream; both are imported
lazily. The engine keeps the ONNX model's I/O: float32 NHWC pixels 0..255 in (float16 is
converted), probabilities out. Dynamic-batch engines run chunks up to the profile's max
batch; a chunk smaller than the engine's minimum (a static-batch engine's only) batch is
zero-padded and the padding rows dropped.

The engine serves the deploy precision (``precision="int8"``): an INT8 engine built from
the int8 QDQ model, or an FP16 engine built from the float32 model on a device without
INT8 (Jetson Nano, TX2). Float32 reference comparisons use ONNX Runtime.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from edgecells.edge.backends.base import MAX_BATCH, BaseClassifier
from edgecells.edge.bundle import Bundle, ModelEntry
from edgecells.edge.errors import EdgecellsError

NAME = "tensorrt"
FORMAT = "onnx"
NOTE = "trt/engine.json"
NOTE_SCHEMA = "edgecells.trt-engine/1"
# What build-trt-engine.sh reads as the device name (Jetsons: "NVIDIA Jetson ...").
DEVICE_MODEL_FILE = Path("/proc/device-tree/model")
REBUILD = "rebuild it: sudo edgecells-build-trt-engine"
# Engine I/O dtypes accepted for a float model input/output (converted on the host).
FLOAT_IO = ("float32", "float16")

log = logging.getLogger("edgecells.backends.tensorrt")


def available() -> bool:
    """True when TensorRT's Python module is installed (checked without importing it)."""
    try:
        return importlib.util.find_spec("tensorrt") is not None
    except (ImportError, ValueError):
        return False


# --------------------------------------------------------------------------- the note


@dataclass(frozen=True)
class EngineNote:
    """A verified ``trt/engine.json``: the engine file and the manifest model behind it."""

    note_path: Path
    engine_path: Path
    model: ModelEntry
    precision: str  # "int8" or "fp16"
    input_name: str
    batch: tuple[int, int, int]  # the profile [min, opt, max] it was built with
    device: str
    tensorrt: str


def has_engine(bundle: Bundle) -> bool:
    return (bundle.root / NOTE).is_file()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:  # (this module defines its own open)
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_engine_note(bundle: Bundle) -> EngineNote:
    """Read and verify ``trt/engine.json``: schema, engine SHA-256 (and size), and that
    the ONNX model it was built from is the manifest's model of that id and hash."""
    path = bundle.root / NOTE
    if not path.is_file():
        raise EdgecellsError(
            f"{path}: no TensorRT engine recorded in this bundle; build one "
            "with: sudo edgecells-build-trt-engine"
        )
    try:
        note = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EdgecellsError(f"{path}: not a readable engine note ({exc}); {REBUILD}") from None
    if not isinstance(note, dict) or note.get("schema") != NOTE_SCHEMA:
        raise EdgecellsError(f"{path}: not an {NOTE_SCHEMA} engine note; {REBUILD}")
    missing = [k for k in ("engine", "engine_sha256", "model_id", "model_sha256") if k not in note]
    if missing:
        raise EdgecellsError(f"{path}: missing {', '.join(missing)}; {REBUILD}")
    rel = PurePosixPath(str(note["engine"]))
    if rel.is_absolute() or ".." in rel.parts or rel.parts[:1] != ("trt",):
        raise EdgecellsError(f"{path}: engine path {str(rel)!r} is not inside the bundle's trt/")
    engine = bundle.root / rel
    models = {m.id: m for m in bundle.models}
    model = models.get(str(note["model_id"]))
    if model is None or model.format != "onnx":
        raise EdgecellsError(
            f"{engine}: built from model {note['model_id']!r}, which is not an ONNX model of "
            f"this bundle; {REBUILD}"
        )
    if note["model_sha256"] != model.sha256 or note.get("model_path", model.path) != model.path:
        raise EdgecellsError(
            f"{engine}: built from another {model.path} than this bundle's (SHA-256 "
            f"mismatch: bundle updated since?); {REBUILD}"
        )
    if not engine.is_file():
        raise EdgecellsError(f"{engine}: engine file missing; {REBUILD}")
    size = note.get("engine_bytes")
    if (size is not None and engine.stat().st_size != size) or _sha256(engine) != note[
        "engine_sha256"
    ]:
        raise EdgecellsError(
            f"{engine}: does not match the SHA-256 in {NOTE} (tampered or truncated); {REBUILD}"
        )
    try:
        batch = tuple(int(b) for b in note.get("batch", [1, 1, 1]))
    except (TypeError, ValueError):
        batch = ()
    if len(batch) != 3 or not 1 <= batch[0] <= batch[1] <= batch[2]:
        raise EdgecellsError(f"{path}: batch must be [min, opt, max], got {note.get('batch')}")
    return EngineNote(
        note_path=path,
        engine_path=engine,
        model=model,
        precision=str(note.get("precision", "")),
        input_name=str(note.get("input_name", "")),
        batch=batch,  # type: ignore[arg-type]
        device=str(note.get("device", "")),
        tensorrt=str(note.get("tensorrt", "")),
    )


def device_name() -> str:
    """This machine's device-tree model ("NVIDIA Jetson AGX Orin ..."), "" if unknown."""
    try:
        return DEVICE_MODEL_FILE.read_bytes().replace(b"\0", b"").decode("utf-8", "replace").strip()
    except OSError:
        return ""


def check_system(note: EngineNote, trt_version: str, device: str | None = None) -> None:
    """Refuse an engine built for another TensorRT version or another device model."""
    device = device_name() if device is None else device
    rec = [p for p in note.tensorrt.split(".") if p]
    run = trt_version.split(".")
    if rec and run[: len(rec)] != rec:
        raise EdgecellsError(
            f"{note.engine_path}: built with TensorRT {note.tensorrt}, this is TensorRT "
            f"{trt_version}; {REBUILD}"
        )
    known = {"", "unknown"}
    if note.device not in known and device not in known and note.device != device:
        raise EdgecellsError(
            f"{note.engine_path}: built on {note.device!r}, this is {device!r}; {REBUILD}"
        )


def engine_model(bundle: Bundle, precision: str = "int8") -> ModelEntry:
    """The manifest model the bundle's engine was built from (verified)."""
    if precision != "int8":
        raise EdgecellsError(
            f"{NAME}: the engine serves the deploy (int8) precision, not {precision}; use "
            "onnxruntime for the float32 reference model"
        )
    return read_engine_note(bundle).model


# --------------------------------------------------------------------------- CUDA


def cudart() -> Any:
    """cuda-python's runtime API module, or None when cuda-python is not installed."""
    for mod in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(mod)
        except ImportError:
            continue
    return None


def cuda_device_count() -> int:
    """CUDA devices visible through cuda-python (0 without it or without a driver)."""
    rt = cudart()
    if rt is None:
        return 0
    try:
        err, count = rt.cudaGetDeviceCount()
    except Exception:  # a broken driver install: treat as no device
        return 0
    return int(count) if err == rt.cudaError_t.cudaSuccess else 0


def _ck(rt: Any, result: Any, what: str) -> Any:
    """Unpack a cuda-python ``(err, *values)`` result; a failure is an EdgecellsError."""
    err, *values = result
    if err != rt.cudaError_t.cudaSuccess:
        raise EdgecellsError(f"{NAME}: CUDA {what} failed ({err})")
    return values[0] if len(values) == 1 else None


# --------------------------------------------------------------------------- classifier


class TensorRTClassifier(BaseClassifier):
    backend = NAME

    def __init__(
        self, bundle: Bundle, model: ModelEntry | None = None, max_batch: int = MAX_BATCH
    ) -> None:
        # Verify the files first: a tampered engine is refused before TensorRT touches it.
        note = read_engine_note(bundle)
        if model is not None and model.id != note.model.id:
            raise EdgecellsError(
                f"{note.engine_path}: built from model {note.model.id!r}, not {model.id!r}"
            )
        super().__init__(bundle, note.model, max_batch)
        self.note = note
        self._stream: Any = None
        self._buffers: list[int] = []
        try:
            trt = importlib.import_module("tensorrt")
        except ImportError:
            raise EdgecellsError(
                f"{NAME}: TensorRT's Python module is not installed (JetPack: sudo apt-get "
                "install python3-libnvinfer; the venv needs --system-site-packages)"
            ) from None
        rt = cudart()
        if rt is None:
            raise EdgecellsError(
                f"{NAME}: needs cuda-python for device buffers (pip install "
                "cuda-python, the version matching JetPack's CUDA)"
            )
        check_system(note, str(getattr(trt, "__version__", "")))
        if not hasattr(trt, "TensorIOMode"):
            raise EdgecellsError(f"{NAME}: TensorRT {trt.__version__} is too old (needs >= 8.5)")
        self._rt = rt
        self._trt = trt
        self._open_engine(trt, rt, note)

    def _open_engine(self, trt: Any, rt: Any, note: EngineNote) -> None:
        path = note.engine_path
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self._engine is None:
            raise EdgecellsError(f"{path}: TensorRT cannot load this engine; {REBUILD}")
        eng = self._engine
        names = [eng.get_tensor_name(i) for i in range(eng.num_io_tensors)]
        ins = [n for n in names if eng.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in names if n not in ins]
        if len(ins) != 1 or len(outs) != 1:
            raise EdgecellsError(
                f"{path}: expected 1 input and 1 output tensor, got {len(ins)} and {len(outs)}"
            )
        self._in, self._out = ins[0], outs[0]
        if note.input_name and note.input_name != self._in:
            raise EdgecellsError(
                f"{path}: input tensor {self._in!r}, {NOTE} says {note.input_name!r}; {REBUILD}"
            )
        shape = tuple(int(d) for d in eng.get_tensor_shape(self._in))
        want = (self.size, self.size, 3)
        if len(shape) != 4 or shape[1:] != want:
            raise EdgecellsError(f"{path}: engine input {shape}, the bundle needs (N, *{want})")
        self._dynamic = shape[0] == -1
        if self._dynamic:
            lo, _opt, hi = eng.get_tensor_profile_shape(self._in, 0)
            self._bmin, self._bmax = int(lo[0]), int(hi[0])
        else:
            self._bmin = self._bmax = shape[0]
        if not 1 <= self._bmin <= self._bmax:
            raise EdgecellsError(f"{path}: invalid batch range {self._bmin}..{self._bmax}")
        self.max_batch = min(self.max_batch, self._bmax)
        out_shape = tuple(int(d) for d in eng.get_tensor_shape(self._out))
        if len(out_shape) < 2 or any(d < 1 for d in out_shape[1:]):
            raise EdgecellsError(f"{path}: engine output shape {out_shape} is not (N, C)")
        self._out_row = math.prod(out_shape[1:])
        self._in_dtype = np.dtype(trt.nptype(eng.get_tensor_dtype(self._in)))
        self._out_dtype = np.dtype(trt.nptype(eng.get_tensor_dtype(self._out)))
        for what, dt, spec in (
            ("input", self._in_dtype, self.model.input),
            ("output", self._out_dtype, self.model.output),
        ):
            ok = dt.name == spec.dtype or (spec.dtype == "float32" and dt.name in FLOAT_IO)
            if not ok:
                raise EdgecellsError(
                    f"{path}: engine {what} is {dt.name}, the ONNX model's is {spec.dtype}; "
                    f"{REBUILD} (without --inputIOFormats/--outputIOFormats)"
                )
        self._context = eng.create_execution_context()
        if self._context is None:
            raise EdgecellsError(f"{path}: TensorRT could not create an execution context")
        self._bound = -1
        # Device buffers for the largest batch, allocated once.
        row_in = self.size * self.size * 3 * self._in_dtype.itemsize
        self._in_ptr = _ck(rt, rt.cudaMalloc(self._bmax * row_in), "malloc")
        self._buffers.append(self._in_ptr)
        nbytes_out = self._bmax * self._out_row * self._out_dtype.itemsize
        self._out_ptr = _ck(rt, rt.cudaMalloc(nbytes_out), "malloc")
        self._buffers.append(self._out_ptr)
        self._stream = _ck(rt, rt.cudaStreamCreate(), "stream")
        self._context.set_tensor_address(self._in, int(self._in_ptr))
        self._context.set_tensor_address(self._out, int(self._out_ptr))

    def _run(self, x: np.ndarray) -> np.ndarray:
        rt, n = self._rt, x.shape[0]
        run_n = max(n, self._bmin)  # n <= max_batch <= the engine's max batch
        host_in = np.zeros((run_n, *x.shape[1:]), dtype=self._in_dtype)
        host_in[:n] = x  # float32 pixels; float16 engines get them converted here
        if self._dynamic and run_n != self._bound:
            if not self._context.set_input_shape(self._in, (run_n, *x.shape[1:])):
                raise EdgecellsError(f"{NAME}: the engine refused batch {run_n}")
            self._bound = run_n
        host_out = np.empty((run_n, self._out_row), dtype=self._out_dtype)
        h2d = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _ck(
            rt,
            rt.cudaMemcpyAsync(
                self._in_ptr, host_in.ctypes.data, host_in.nbytes, h2d, self._stream
            ),
            "copy to device",
        )
        if not self._context.execute_async_v3(int(self._stream)):
            raise EdgecellsError(f"{self.note.engine_path}: TensorRT inference failed")
        _ck(
            rt,
            rt.cudaMemcpyAsync(
                host_out.ctypes.data, self._out_ptr, host_out.nbytes, d2h, self._stream
            ),
            "copy to host",
        )
        _ck(rt, rt.cudaStreamSynchronize(self._stream), "synchronize")
        out = host_out[:n]
        return out.astype(np.float32) if out.dtype == np.float16 else out

    def close(self) -> None:
        rt = getattr(self, "_rt", None)
        if rt is not None:
            if self._stream is not None:
                rt.cudaStreamSynchronize(self._stream)
                rt.cudaStreamDestroy(self._stream)
                self._stream = None
            while self._buffers:
                rt.cudaFree(self._buffers.pop())
        self._context = self._engine = self._runtime = None

    def __del__(self) -> None:  # buffers are freed even when close() is forgotten
        try:
            self.close()
        except Exception:
            pass


def open(
    bundle: Bundle,
    model: ModelEntry | None = None,
    threads: int | None = None,
    max_batch: int = MAX_BATCH,
) -> TensorRTClassifier:
    """The bundle's engine (``model`` None = the model the engine was built from); threads
    are not used (the GPU runs it)."""
    return TensorRTClassifier(bundle, model, max_batch)


def auto_open(
    bundle: Bundle, precision: str, threads: int | None = None, max_batch: int = MAX_BATCH
) -> TensorRTClassifier | None:
    """For ``backend="auto"``: the engine when the bundle has one, TensorRT imports and a
    CUDA device is present (deploy precision only); None otherwise, so auto goes on as
    without TensorRT. An engine that fails its checks is logged and skipped."""
    if precision != "int8" or not has_engine(bundle) or not available():
        return None
    if cuda_device_count() < 1:
        return None
    try:
        return open(bundle, None, threads, max_batch)
    except EdgecellsError as exc:
        log.warning("%s (using the other runtimes)", exc)
        return None
