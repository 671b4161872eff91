"""The TensorRT backend (edge/backends/tensorrt.py): engine-note checks, auto selection,
the CLI error without TensorRT, and the inference plumbing.

Real TensorRT is NOT tested here (no GPU, no TensorRT on this machine). What is tested:

* the checks on ``trt/engine.json`` and the engine file (tampered engine, another model,
  another TensorRT version or device) — plain files, no TensorRT needed;
* ``backend="auto"`` leaving TensorRT aside when its module, the engine or a GPU is
  missing, and an explicit ``--backend tensorrt`` failing with one line from the CLI;
* the backend's own plumbing against stand-ins injected through ``sys.modules``: a fake
  ``tensorrt`` whose "engine" runs the bundle's ONNX model with ONNX Runtime (it reads its
  input from, and writes its output to, the "device" buffers the backend allocated), and a
  fake cuda-python runtime whose device memory is host bytearrays that refuse copies past
  an allocation's size. They check buffer sizes, dtype conversion (float16 I/O), batch
  chunking and padding (static and dynamic batch), output reshaping and buffer release —
  not TensorRT's own behaviour. Where cuda-python and a CUDA GPU are present, the same
  plumbing test also runs on the real CUDA runtime (real device buffers, fake engine).
"""

from __future__ import annotations

import ctypes
import enum
import hashlib
import importlib.machinery
import json
import logging
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgecells.edge.backends import open_classifier
from edgecells.edge.backends import tensorrt as trt_backend
from edgecells.edge.bundle import load_bundle
from edgecells.edge.errors import EdgecellsError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "bundle_tiny"
SIZE = 32  # the tiny bundle's input side


# --------------------------------------------------------------------------- fakes


class FakeCudart(types.ModuleType):
    """cuda-python's runtime API over host memory: pointers index bytearrays; a copy
    past an allocation's end fails like CUDA does (cudaErrorInvalidValue)."""

    class cudaError_t(enum.IntEnum):  # noqa: N801 - cuda-python's names
        cudaSuccess = 0
        cudaErrorInvalidValue = 1

    class cudaMemcpyKind(enum.IntEnum):  # noqa: N801
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    def __init__(self, devices: int = 1) -> None:
        super().__init__("cuda.bindings.runtime")
        self.devices = devices
        self.mem: dict[int, bytearray] = {}
        self.next_ptr = 0x10000
        self.copies: list[tuple[str, int]] = []
        self.count_queries = 0

    def _addr(self, ptr: int, count: int) -> int | None:
        buf = self.mem.get(int(ptr))
        if buf is None or count > len(buf):
            return None
        return ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))

    def cudaGetDeviceCount(self) -> tuple[Any, int]:  # noqa: N802
        self.count_queries += 1
        return self.cudaError_t.cudaSuccess, self.devices

    def cudaMalloc(self, n: int) -> tuple[Any, int]:  # noqa: N802
        ptr, self.next_ptr = self.next_ptr, self.next_ptr + n + 256
        self.mem[ptr] = bytearray(n)
        return self.cudaError_t.cudaSuccess, ptr

    def cudaFree(self, ptr: int) -> tuple[Any]:  # noqa: N802
        ok = self.mem.pop(int(ptr), None) is not None
        return (self.cudaError_t.cudaSuccess if ok else self.cudaError_t.cudaErrorInvalidValue,)

    def cudaMemcpy(self, dst: int, src: int, count: int, kind: int) -> tuple[Any]:  # noqa: N802
        h2d = kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice
        dev = self._addr(dst if h2d else src, count)
        if dev is None:
            return (self.cudaError_t.cudaErrorInvalidValue,)
        ctypes.memmove(dev, src, count) if h2d else ctypes.memmove(dst, dev, count)
        self.copies.append(("h2d" if h2d else "d2h", count))
        return (self.cudaError_t.cudaSuccess,)

    def cudaMemcpyAsync(self, dst: int, src: int, count: int, kind: int, stream: Any):  # noqa: N802
        return self.cudaMemcpy(dst, src, count, kind)

    def cudaStreamCreate(self) -> tuple[Any, int]:  # noqa: N802
        return self.cudaError_t.cudaSuccess, 7

    def cudaStreamSynchronize(self, stream: Any) -> tuple[Any]:  # noqa: N802
        return (self.cudaError_t.cudaSuccess,)

    def cudaStreamDestroy(self, stream: Any) -> tuple[Any]:  # noqa: N802
        return (self.cudaError_t.cudaSuccess,)


class _DataType(enum.Enum):
    FLOAT = "float32"
    HALF = "float16"
    INT8 = "int8"


class _IOMode(enum.Enum):
    INPUT = 1
    OUTPUT = 2


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.addr: dict[str, int] = {}
        self.shape = None if engine.dynamic else tuple(engine.spec["shape"])
        self.batches: list[int] = []

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        lo, _opt, hi = self.engine.spec["profile"]
        if name != self.engine.spec["input"] or not lo <= shape[0] <= hi:
            return False
        self.shape = tuple(shape)
        return True

    def set_tensor_address(self, name: str, ptr: int) -> None:
        self.addr[name] = int(ptr)

    def execute_async_v3(self, stream: int) -> bool:
        """Run the ONNX model on the input buffer, through the CUDA runtime in use."""
        rt = trt_backend.cudart()
        spec = self.engine.spec
        if self.shape is None:
            return False  # a dynamic engine run without an input shape
        x = np.empty(self.shape, dtype=np.dtype(spec["in_dtype"]))
        kind = rt.cudaMemcpyKind
        err = rt.cudaMemcpy(
            x.ctypes.data, self.addr[spec["input"]], x.nbytes, kind.cudaMemcpyDeviceToHost
        )[0]
        assert err == rt.cudaError_t.cudaSuccess
        probs = self.engine.session.run(None, {self.engine.onnx_input: x.astype(np.float32)})[0]
        y = np.ascontiguousarray(probs.astype(np.dtype(spec["out_dtype"])))
        err = rt.cudaMemcpy(
            self.addr[spec["output"]], y.ctypes.data, y.nbytes, kind.cudaMemcpyHostToDevice
        )[0]
        assert err == rt.cudaError_t.cudaSuccess
        self.batches.append(self.shape[0])
        return True


class FakeEngine:
    """An "engine file" is JSON: the ONNX model to run and the engine's I/O layout."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import onnxruntime as ort

        self.spec = spec
        self.session = ort.InferenceSession(spec["onnx"], providers=["CPUExecutionProvider"])
        self.onnx_input = self.session.get_inputs()[0].name
        self.dynamic = spec["shape"][0] == -1
        self.num_io_tensors = 2
        self.contexts: list[FakeContext] = []

    def get_tensor_name(self, i: int) -> str:
        return [self.spec["input"], self.spec["output"]][i]

    def get_tensor_mode(self, name: str) -> _IOMode:
        return _IOMode.INPUT if name == self.spec["input"] else _IOMode.OUTPUT

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name == self.spec["input"]:
            return tuple(self.spec["shape"])
        return (self.spec["shape"][0], 8)

    def get_tensor_dtype(self, name: str) -> _DataType:
        return _DataType(self.spec["in_dtype" if name == self.spec["input"] else "out_dtype"])

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
        return [(b, SIZE, SIZE, 3) for b in self.spec["profile"]]

    def create_execution_context(self) -> FakeContext:
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]


def fake_tensorrt(version: str = "10.3.0") -> types.ModuleType:
    mod = types.ModuleType("tensorrt")
    mod.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    mod.__version__ = version
    mod.TensorIOMode = _IOMode
    mod.engines = []

    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            self.level = level

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, data: bytes) -> FakeEngine | None:
            try:
                spec = json.loads(data)
            except ValueError:
                return None
            mod.engines.append(FakeEngine(spec))
            return mod.engines[-1]

    mod.Logger, mod.Runtime = Logger, Runtime
    mod.nptype = lambda dt: np.dtype(dt.value).type
    return mod


def install_fakes(monkeypatch, devices: int = 1, real_cuda: bool = False, version="10.3.0"):
    trt = fake_tensorrt(version)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    rt = None
    if not real_cuda:
        rt = FakeCudart(devices)
        for name in ("cuda", "cuda.bindings"):
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
        monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", rt)
    return trt, rt


# --------------------------------------------------------------------------- bundles


def make_bundle(tmp_path: Path, **engine: Any) -> Path:
    """A copy of the tiny bundle with an engine (a fake-engine JSON) and its note, as
    build-trt-engine.sh writes them."""
    root = tmp_path / "bundle"
    shutil.copytree(TINY, root)
    m = json.loads((root / "manifest.json").read_text())
    model = next(e for e in m["models"] if e["id"] == "onnx-int8")
    import onnxruntime as ort

    name = ort.InferenceSession(str(root / model["path"])).get_inputs()[0].name
    spec = {
        "onnx": str(root / model["path"]),
        "input": name,
        "output": "probs",
        "shape": [-1, SIZE, SIZE, 3],
        "profile": [1, 16, 64],
        "in_dtype": "float32",
        "out_dtype": "float32",
    }
    spec.update(engine)
    rel = "trt/onnx-int8.int8.engine"
    (root / "trt").mkdir()
    data = json.dumps(spec).encode()
    (root / rel).write_bytes(data)
    note = {
        "schema": "edgecells.trt-engine/1",
        "engine": rel,
        "engine_sha256": hashlib.sha256(data).hexdigest(),
        "engine_bytes": len(data),
        "model_id": "onnx-int8",
        "model_path": model["path"],
        "model_sha256": model["sha256"],
        "precision": "int8",
        "input_name": name,
        "batch": [1, 16, 64],
        "device": "",
        "l4t": "",
        "tensorrt": "10.3.0",
    }
    (root / "trt/engine.json").write_text(json.dumps(note, indent=2))
    return root


def edit_note(root: Path, **changes: Any) -> None:
    p = root / "trt/engine.json"
    note = json.loads(p.read_text())
    note.update(changes)
    p.write_text(json.dumps(note))


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(20, SIZE, SIZE, 3), dtype=np.uint8)


def baseline_backend() -> str:
    """What auto picks here without TensorRT (LiteRT where it is installed)."""
    clf = open_classifier(load_bundle(TINY), backend="auto")
    clf.close()
    return clf.backend


def onnx_reference(root: Path, crops: np.ndarray) -> np.ndarray:
    clf = open_classifier(load_bundle(root), backend="onnxruntime", threads=1)
    try:
        return clf.predict(crops)
    finally:
        clf.close()


# --------------------------------------------------------------------------- auto selection


def test_auto_ignores_an_engine_when_tensorrt_is_not_installed(tmp_path: Path) -> None:
    if trt_backend.available():
        pytest.skip("TensorRT is installed here")
    b = load_bundle(make_bundle(tmp_path))  # the engine files do not break the bundle
    clf = open_classifier(b, backend="auto")
    assert clf.backend == open_classifier(load_bundle(TINY), backend="auto").backend
    assert clf.backend != "tensorrt"


def test_auto_ignores_tensorrt_without_an_engine_or_a_gpu(tmp_path: Path, monkeypatch) -> None:
    _, rt = install_fakes(monkeypatch, devices=0)
    assert trt_backend.available()
    # no engine recorded: auto is exactly as before, CUDA not even asked
    clf = open_classifier(load_bundle(TINY), backend="auto")
    assert clf.backend == baseline_backend() and rt.count_queries == 0
    # an engine but no CUDA device
    clf = open_classifier(load_bundle(make_bundle(tmp_path)), backend="auto")
    assert clf.backend == baseline_backend() and rt.count_queries == 1
    # float32 (reference) requests never use the engine
    rt.devices = 1
    clf = open_classifier(load_bundle(tmp_path / "bundle"), backend="auto", precision="float32")
    assert clf.backend == baseline_backend() and clf.model.precision == "float32"


def test_auto_prefers_the_engine_when_everything_is_present(tmp_path, monkeypatch, crops):
    root = make_bundle(tmp_path)
    ref = onnx_reference(root, crops)
    install_fakes(monkeypatch)
    clf = open_classifier(load_bundle(root), backend="auto", threads=2)
    assert clf.backend == "tensorrt" and clf.model.id == "onnx-int8"
    np.testing.assert_allclose(clf.predict(crops), ref, atol=1e-6)
    clf.close()


# --------------------------------------------------------------------------- refused engines


def test_a_tampered_engine_is_refused_and_auto_falls_back(tmp_path, monkeypatch, caplog):
    root = make_bundle(tmp_path)
    engine = root / "trt/onnx-int8.int8.engine"
    data = bytearray(engine.read_bytes())
    data[10] ^= 1
    engine.write_bytes(bytes(data))
    trt, _ = install_fakes(monkeypatch)
    b = load_bundle(root)
    with pytest.raises(EdgecellsError) as exc:
        open_classifier(b, backend="tensorrt")
    msg = str(exc.value)
    assert "\n" not in msg and str(engine) in msg and "SHA-256" in msg
    assert trt.engines == []  # refused before TensorRT saw it
    with caplog.at_level(logging.WARNING, logger="edgecells.backends.tensorrt"):
        clf = open_classifier(b, backend="auto")
    assert clf.backend == baseline_backend()
    assert any("tampered" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"model_sha256": "0" * 64}, "built from another model_int8.onnx"),
        ({"model_id": "tflite-int8"}, "not an ONNX model of this bundle"),
        ({"engine": "../manifest.json"}, "not inside the bundle's trt/"),
        ({"schema": "something/2"}, "not an edgecells.trt-engine/1"),
        ({"tensorrt": "8.6.2"}, "built with TensorRT 8.6.2, this is TensorRT 10.3.0"),
        ({"device": "NVIDIA Jetson Nano Developer Kit"}, "built on 'NVIDIA Jetson Nano"),
    ],
)
def test_a_mismatched_engine_is_refused(tmp_path, monkeypatch, change, words) -> None:
    root = make_bundle(tmp_path)
    edit_note(root, **change)
    dev = tmp_path / "model"
    dev.write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\0")
    monkeypatch.setattr(trt_backend, "DEVICE_MODEL_FILE", dev)
    install_fakes(monkeypatch)
    with pytest.raises(EdgecellsError) as exc:
        open_classifier(load_bundle(root), backend="tensorrt")
    assert words in str(exc.value) and "\n" not in str(exc.value)


def test_version_and_device_checks_accept_the_matching_system(tmp_path: Path) -> None:
    note = trt_backend.read_engine_note(load_bundle(make_bundle(tmp_path)))
    trt_backend.check_system(note, "10.3.0.26", "NVIDIA Jetson AGX Orin")  # finer version ok
    short = trt_backend.EngineNote(**{**note.__dict__, "tensorrt": "10", "device": "unknown"})
    trt_backend.check_system(short, "10.7.0", "NVIDIA Jetson Orin Nano")
    with pytest.raises(EdgecellsError, match="TensorRT 10, this is TensorRT 8.6.2"):
        trt_backend.check_system(short, "8.6.2", "")


def test_the_engine_serves_only_the_deploy_precision(tmp_path, monkeypatch) -> None:
    install_fakes(monkeypatch)
    with pytest.raises(EdgecellsError, match="deploy \\(int8\\) precision"):
        open_classifier(load_bundle(make_bundle(tmp_path)), "tensorrt", precision="float32")


def test_an_engine_with_integer_io_for_a_float_model_is_refused(tmp_path, monkeypatch) -> None:
    install_fakes(monkeypatch)
    root = make_bundle(tmp_path, in_dtype="int8")
    with pytest.raises(EdgecellsError, match="engine input is int8, the ONNX model's is float32"):
        open_classifier(load_bundle(root), backend="tensorrt")


# --------------------------------------------------------------------------- plumbing


def _real_cuda() -> bool:
    return trt_backend.cudart() is not None and trt_backend.cuda_device_count() > 0


@pytest.mark.parametrize("cuda", ["fake", "real"])
@pytest.mark.parametrize(
    ("engine", "max_batch", "batches"),
    [
        # static batch 16: 20 crops run as 16 + (4 padded to 16)
        ({"shape": [16, SIZE, SIZE, 3], "profile": [16, 16, 16]}, 64, [16, 16]),
        # dynamic 1..8, float16 I/O: chunks capped at the profile's max
        ({"profile": [1, 4, 8], "in_dtype": "float16", "out_dtype": "float16"}, 64, [8, 8, 4]),
        # dynamic with a minimum batch 3, max_batch 6 from the config: 6, 6, 6, (2 -> 3)
        ({"profile": [3, 4, 8]}, 6, [6, 6, 6, 3]),
    ],
)
def test_inference_plumbing(tmp_path, monkeypatch, crops, cuda, engine, max_batch, batches):
    if cuda == "real" and not _real_cuda():
        pytest.skip("no cuda-python with a CUDA device here")
    root = make_bundle(tmp_path, **engine)
    ref = onnx_reference(root, crops)
    trt, rt = install_fakes(monkeypatch, real_cuda=cuda == "real")
    clf = open_classifier(load_bundle(root), backend="tensorrt", max_batch=max_batch)
    p = clf.predict(crops)
    assert p.shape == (20, 8) and p.dtype == np.float32
    # float16 pixels 0..255 are exact; float16 probabilities within its precision
    atol = 2e-3 if engine.get("out_dtype") == "float16" else 1e-6
    np.testing.assert_allclose(p, ref, atol=atol)
    np.testing.assert_allclose(clf.predict(crops[3]), ref[3:4], atol=atol)  # one crop
    assert clf.predict(crops[:0]).shape == (0, 8)
    ctx = trt.engines[0].contexts[0]
    assert ctx.batches == [*batches, max(1, engine["profile"][0])]
    if rt is not None:
        row = SIZE * SIZE * 3 * np.dtype(engine.get("in_dtype", "float32")).itemsize
        out_row = 8 * np.dtype(engine.get("out_dtype", "float32")).itemsize
        assert sorted(len(b) for b in rt.mem.values()) == sorted(
            [engine["profile"][2] * row, engine["profile"][2] * out_row]
        )
        h2d = [n for d, n in rt.copies if d == "h2d"]
        assert h2d[: 2 * len(batches) : 2] == [b * row for b in batches]  # backend's copies
        clf.close()
        assert rt.mem == {}  # every device buffer freed
    else:
        clf.close()


def test_cuda_errors_are_one_line(tmp_path, monkeypatch, crops) -> None:
    _, rt = install_fakes(monkeypatch)
    clf = open_classifier(load_bundle(make_bundle(tmp_path)), backend="tensorrt")
    rt.mem.clear()  # the device buffers are gone
    with pytest.raises(EdgecellsError, match="tensorrt: CUDA copy to device failed"):
        clf.predict(crops)


# --------------------------------------------------------------------------- CLI, config, doctor


def test_cli_backend_tensorrt_without_the_module_is_one_line(tmp_path: Path) -> None:
    if trt_backend.available():
        pytest.skip("TensorRT is installed here")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgecells",
            "screen",
            "--backend",
            "tensorrt",
            "--frames",
            "1",
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == ["error: tensorrt: runtime not installed"]


def test_config_accepts_tensorrt(tmp_path: Path) -> None:
    from edgecells.edge.config import load_config

    p = tmp_path / "config.toml"
    p.write_text('[inference]\nbackend = "tensorrt"\n')
    assert load_config(p).inference.backend == "tensorrt"
    p.write_text('[inference]\nbackend = "cuda"\n')
    with pytest.raises(EdgecellsError, match="inference.backend"):
        load_config(p)


def test_doctor_lists_tensorrt_installed_or_not(monkeypatch) -> None:
    from edgecells.edge import doctor as doc

    if trt_backend.available():
        pytest.skip("TensorRT is installed here")
    report = doc.Report()
    doc.check_backends(report)
    line = {c.name: c for c in report.checks}["backend tensorrt"]
    assert line.status == doc.OK and line.detail == "not installed"
    report = doc.Report()
    doc.check_backends(report, configured="tensorrt")
    line = {c.name: c for c in report.checks}["backend tensorrt"]
    assert line.status == doc.FAIL and "python3-libnvinfer" in line.fix
    install_fakes(monkeypatch)
    report = doc.Report()
    doc.check_backends(report)
    assert {c.name: c for c in report.checks}["backend tensorrt"].status == doc.OK
