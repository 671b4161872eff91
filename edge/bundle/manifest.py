"""Manifest schema v1: constants, the dataclasses a loaded bundle is made of, parsing with
type and range checks, reading and atomic writing of ``manifest.json``. The schema is
documented in :mod:`edgecells.edge.bundle`."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from edgecells.edge.errors import EdgecellsError

SCHEMA = "edgecells.bundle"
SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
FORMATS = ("tflite", "openvino", "onnx")
PRECISIONS = ("int8", "float32")
BACKEND_OF_FORMAT = {"tflite": "litert", "openvino": "openvino", "onnx": "onnxruntime"}
STAIN_METHODS = ("reinhard-fixed-v1", "none")
# Optional files for site adaptation (``training`` section): the float source model and
# the replay/check set of the original training data (see edgecells.convert.trainfiles).
TRAINING_KEYS = ("source_model", "replay")
# test-time views whose class probabilities the device averages (preprocessing.
# test_time_views; absent = ["identity"]): the crop, mirrored left-right, top-bottom,
# transposed, turned 180 degrees. Pure pixel permutations of the prepared crop.
VIEWS = ("identity", "hflip", "vflip", "transpose", "rot180")

MAX_MANIFEST_BYTES = 4 << 20
SELFTEST_MAX_SAMPLES = 256


@dataclass(frozen=True)
class Range:
    """One declared manifest value: its dotted key path, type and allowed range.

    ``kind`` is ``"number"`` (int or float, finite) or ``"int"``. ``lo``/``hi`` are
    inclusive unless ``lo_open``/``hi_open``. An absent key is allowed (the reader's
    default applies) unless ``required``; a present one must fit.
    """

    path: str
    kind: str = "number"
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    required: bool = False

    def describe(self) -> str:
        what = "an integer" if self.kind == "int" else "a number"
        if self.lo is not None and self.hi is not None:
            lb = "(" if self.lo_open else "["
            hb = ")" if self.hi_open else "]"
            return f"{what} in {lb}{self.lo:g}, {self.hi:g}{hb}"
        if self.lo is not None:
            return f"{what} {'>' if self.lo_open else '>='} {self.lo:g}"
        if self.hi is not None:
            return f"{what} {'<' if self.hi_open else '<='} {self.hi:g}"
        return what


# Every numeric manifest value the device acts on, with its allowed range. To declare a
# new field add one row here; parse_manifest checks the table (type, finiteness, range).
RANGES: list[Range] = [
    Range("thresholds.min_confidence", "number", 0.0, 1.0),
    Range("thresholds.operating_point", "number", 0.0, 1.0),
    Range("thresholds.screening.min_cells", "int", 1, 1_000_000),
    Range("thresholds.screening.abnormal_fraction", "number", 0.0, 1.0, hi_open=True),
    Range("thresholds.screening.confidence", "number", 0.5, 1.0, hi_open=True),
    Range("thresholds.screening.false_positive_rate", "number", 0.0, 1.0, hi_open=True),
    Range("crop.side_um", "number", 0.0, 500.0),  # 0 = no fixed physical side
    Range("preprocessing.pixel_size_um", "number", 0.005, 10.0),  # model input, µm/px
    # legacy keys of older bundles (ignored by the device since prepare_cell-v2), still
    # checked so that a bad value is named rather than silently carried along
    Range("crop.min_side_factor", "number", 0.5, 10.0),
    Range("crop.training_side_px", "int", 8, 4096),
    # abstention and the domain check (edge/ood.py; fitted by training/abstention.py)
    Range("thresholds.screening.max_unidentified_fraction", "number", 0.0, 1.0),
    Range("thresholds.screening.unidentified_rate", "number", 0.0, 1.0, hi_open=True),
    Range("thresholds.ood.temperature", "number", 0.05, 20.0),
    Range("thresholds.ood.threshold", "number", 0.0, 1.0),
    *(
        Range(f"thresholds.domain.stain_mean_lab.{end}.{i}", "number", -200.0, 200.0)
        for end in ("low", "high")
        for i in range(3)
    ),
    Range("thresholds.domain.input_focus.low", "number", 0.0, 1e7),
    Range("thresholds.domain.input_focus.high", "number", 0.0, 1e7),
    Range("thresholds.domain.max_scale_ratio", "number", 1.0, 10.0, lo_open=True),
]


def check_views(
    views: Any, mpath: str = MANIFEST_NAME, what: str = "preprocessing.test_time_views"
) -> list[str]:
    """Test-time views: a list of 1..5 distinct names from :data:`VIEWS`."""
    if (
        not isinstance(views, list)
        or not 1 <= len(views) <= len(VIEWS)
        or any(not isinstance(v, str) or v not in VIEWS for v in views)
        or len(set(views)) != len(views)
    ):
        raise EdgecellsError(
            f"{mpath}: {what} must be a list of distinct names from {', '.join(VIEWS)}; "
            f"got {views!r}"
        )
    return list(views)


def _no_nonfinite(obj: Any, mpath: str, path: str = "") -> None:
    """NaN and Infinity are not JSON; anywhere in a manifest they are refused."""
    if isinstance(obj, float) and not math.isfinite(obj):
        raise EdgecellsError(f"{mpath}: {path or 'value'} is {obj!r} (not a number JSON allows)")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _no_nonfinite(v, mpath, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _no_nonfinite(v, mpath, f"{path}[{i}]")


def _lookup(d: dict[str, Any], path: str) -> tuple[bool, Any]:
    """The value at a dotted path; a numeric part indexes a list."""
    cur: Any = d
    for part in path.split("."):
        if isinstance(cur, list) and part.isdigit():
            if int(part) >= len(cur):
                return False, None
            cur = cur[int(part)]
        elif isinstance(cur, dict) and part in cur:
            cur = cur[part]
        else:
            return False, None
    return True, cur


def _check_domain(manifest: dict[str, Any], mpath: str) -> None:
    """``thresholds.domain`` ranges: three values per stain end, low <= high."""
    dom = (manifest.get("thresholds") or {}).get("domain")
    if dom is None:
        return
    if not isinstance(dom, dict):
        raise EdgecellsError(f"{mpath}: thresholds.domain must be an object")
    for name, n in (("stain_mean_lab", 3), ("input_focus", 0)):
        r = dom.get(name)
        if r is None:
            continue
        lo, hi = (r.get("low"), r.get("high")) if isinstance(r, dict) else (None, None)
        if n:
            ok = isinstance(lo, list) and isinstance(hi, list) and len(lo) == len(hi) == n
            pairs = list(zip(lo, hi)) if ok else []
        else:
            ok, pairs = lo is not None and hi is not None, [(lo, hi)]
        if not ok or any(a > b for a, b in pairs):
            raise EdgecellsError(
                f"{mpath}: thresholds.domain.{name} must have low <= high"
                + (f" ({n} values each)" if n else "")
            )


def check_ranges(manifest: dict[str, Any], mpath: str, table: list[Range] | None = None) -> None:
    """Check every declared value of ``table`` (default :data:`RANGES`) in ``manifest``."""
    for r in RANGES if table is None else table:
        found, v = _lookup(manifest, r.path)
        if not found or v is None:
            if r.required:
                raise EdgecellsError(f"{mpath}: missing {r.path} ({r.describe()})")
            continue
        ok_type = isinstance(v, int) if r.kind == "int" else isinstance(v, (int, float))
        if isinstance(v, bool) or not ok_type:
            raise EdgecellsError(
                f"{mpath}: {r.path} must be {r.describe()}, not {type(v).__name__} {v!r:.40}"
            )
        fv = float(v)
        bad = not math.isfinite(fv)
        if r.lo is not None and not bad:
            bad = fv <= r.lo if r.lo_open else fv < r.lo
        if r.hi is not None and not bad:
            bad = bad or (fv >= r.hi if r.hi_open else fv > r.hi)
        if bad:
            raise EdgecellsError(f"{mpath}: {r.path} must be {r.describe()}, got {v!r}")


# --------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: shape (batch -1), dtype and affine quantization."""

    shape: tuple[int, ...]
    dtype: str
    scale: float | None = None
    zero_point: int | None = None

    @property
    def quantized(self) -> bool:
        return self.scale is not None and self.dtype in ("int8", "uint8")

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "dtype": self.dtype,
            "scale": self.scale,
            "zero_point": self.zero_point,
        }


@dataclass(frozen=True)
class FileEntry:
    path: str
    sha256: str
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "bytes": self.bytes}


@dataclass(frozen=True)
class ModelEntry:
    """One model of a bundle (its files are relative to the bundle root)."""

    id: str
    format: str
    precision: str
    backend: str
    role: str
    path: str
    sha256: str
    bytes: int
    files: tuple[FileEntry, ...]
    input: TensorSpec
    output: TensorSpec

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "format": self.format,
            "precision": self.precision,
            "backend": self.backend,
            "role": self.role,
            "path": self.path,
            "sha256": self.sha256,
            "bytes": self.bytes,
            "files": [f.to_dict() for f in self.files],
            "input": self.input.to_dict(),
            "output": self.output.to_dict(),
        }


@dataclass
class Bundle:
    """A loaded, verified model bundle."""

    root: Path
    manifest: dict[str, Any]
    name: str
    task: str
    classes: list[str]
    mapping: dict[str, Any]
    stain_target: dict[str, Any] | None
    preprocessing: dict[str, Any]
    crop: dict[str, Any]
    thresholds: dict[str, Any]
    models: list[ModelEntry]
    validation: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    selftest: tuple[FileEntry, ...] = ()  # self-test sample files (hashed like models)
    source: str = ""  # what the user gave (folder or archive path)
    training_files: dict[str, FileEntry] = field(default_factory=dict)  # TRAINING_KEYS
    manifest_sha256: str = ""  # of manifest.json as read: the bundle's identity
    signature: dict[str, Any] = field(default_factory=dict)  # set by signing.check_bundle

    @property
    def input_size(self) -> int:
        return int(self.preprocessing["input_size"])

    @property
    def pixel_size_um(self) -> float:
        """The model's input pixel size, µm/px (older bundles: crop side_um / input_size)."""
        px = self.preprocessing.get("pixel_size_um")
        if px is None:
            side = float(self.crop.get("side_um", 24.0) or 0.0)
            if side <= 0:
                raise EdgecellsError(
                    f"{self.root / MANIFEST_NAME}: the bundle records no physical field "
                    "(crop.side_um 0, no preprocessing.pixel_size_um); reconvert it"
                )
            return side / self.input_size
        return float(px)

    @property
    def test_time_views(self) -> list[str]:
        """Views of each prepared crop whose probabilities the device averages."""
        return list(self.preprocessing.get("test_time_views", ["identity"]))

    @property
    def field_um(self) -> float:
        """The model's field of view, µm (a cell is cut at this side)."""
        return self.input_size * self.pixel_size_um

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def abnormal_classes(self) -> list[str]:
        return _abnormal_names(self.mapping)

    def class_mapping(self) -> Any:
        """The bundle's :class:`~edgecells.edge.mappings.ClassMapping`."""
        from edgecells.edge.mappings import ClassMapping

        return ClassMapping.from_dict(self.mapping, where=f"{self.root / MANIFEST_NAME} mapping")

    @property
    def abnormal_mask(self) -> np.ndarray:
        """Boolean (C,) array: True where the class is abnormal."""
        ab = set(self.abnormal_classes)
        return np.array([c in ab for c in self.classes], dtype=bool)

    @property
    def normalizes_stain(self) -> bool:
        return (
            self.stain_target is not None
            and self.preprocessing.get("stain_normalization") != "none"
        )

    def model(
        self,
        format: str | None = None,
        precision: str | None = "int8",
        model_id: str | None = None,
    ) -> ModelEntry:
        """The model with this id, or the first with this format/precision."""
        for m in self.models:
            if model_id is not None:
                if m.id == model_id:
                    return m
                continue
            if (format is None or m.format == format) and (
                precision is None or m.precision == precision
            ):
                return m
        want = model_id or f"{format or 'any format'} {precision or 'any precision'}"
        have = ", ".join(m.id for m in self.models) or "none"
        raise EdgecellsError(f"{self.source or self.root}: no model {want} (has: {have})")

    def formats(self, precision: str | None = "int8") -> list[str]:
        return [m.format for m in self.models if precision is None or m.precision == precision]

    def path_of(self, model: ModelEntry, index: int = 0) -> Path:
        return self.root / model.files[index].path

    def load_stain_target(self) -> Any:
        """The bundle's :class:`~edgecells.edge.stain.StainTarget`, or None."""
        if not self.normalizes_stain:
            return None
        from edgecells.edge.stain import StainTarget

        try:
            return StainTarget.from_dict(self.stain_target)
        except EdgecellsError:
            raise
        except Exception as exc:  # malformed target inside a verified manifest
            raise EdgecellsError(
                f"{self.root / MANIFEST_NAME}: invalid stain_target ({exc})"
            ) from None

    def summary(self) -> dict[str, Any]:
        """A short JSON-able description (used by ``edgecells bundle info``)."""
        return {
            "bundle": str(self.source or self.root),
            "name": self.name,
            "schema_version": self.manifest["schema_version"],
            "task": self.task,
            "classes": self.classes,
            "abnormal": self.abnormal_classes,
            "input_size": self.input_size,
            "stain_normalization": self.preprocessing.get("stain_normalization"),
            "test_time_views": self.test_time_views,
            "models": [
                {
                    "id": m.id,
                    "format": m.format,
                    "precision": m.precision,
                    "backend": m.backend,
                    "role": m.role,
                    "bytes": m.total_bytes,
                    "input": m.input.to_dict(),
                    "output": m.output.to_dict(),
                }
                for m in self.models
            ],
            "validation": self.validation,
            "thresholds": self.thresholds,
            "crop": self.crop,
            "provenance": self.provenance,
            "verified": True,
        }


def _abnormal_names(mapping: dict[str, Any]) -> list[str]:
    return [e["name"] for e in mapping.get("classes", []) if e.get("abnormal")]


def _safe_relpath(rel: Any, where: str) -> str:
    """A manifest path must be a plain relative posix path inside the bundle."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise EdgecellsError(f"{where}: invalid file path {rel!r}")
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or rel.startswith("~") or ":" in p.parts[0]:
        raise EdgecellsError(f"{where}: file path {rel!r} points outside the bundle")
    return str(p)


# --------------------------------------------------------------------------- parsing


def _req(d: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise EdgecellsError(f"{where}: missing key {key!r}")
    v = d[key]
    if not isinstance(v, typ) or (isinstance(v, bool) and typ is int):
        raise EdgecellsError(f"{where}: key {key!r} has the wrong type ({type(v).__name__})")
    return v


def _tensor(d: Any, where: str) -> TensorSpec:
    if not isinstance(d, dict):
        raise EdgecellsError(f"{where}: must be an object")
    shape = _req(d, "shape", list, where)
    if not shape or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
        raise EdgecellsError(f"{where}: shape must be a list of integers")
    dtype = _req(d, "dtype", str, where)
    if dtype not in ("int8", "uint8", "float32", "float16"):
        raise EdgecellsError(f"{where}: unsupported dtype {dtype!r}")
    scale = d.get("scale")
    zp = d.get("zero_point")
    if (scale is None) != (zp is None):
        raise EdgecellsError(f"{where}: scale and zero_point must both be set or both null")
    if scale is not None:
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale > 0:
            raise EdgecellsError(f"{where}: scale must be a positive number")
        if not isinstance(zp, int) or isinstance(zp, bool):
            raise EdgecellsError(f"{where}: zero_point must be an integer")
        if dtype not in ("int8", "uint8"):
            raise EdgecellsError(f"{where}: quantization given for a {dtype} tensor")
    elif dtype in ("int8", "uint8"):
        raise EdgecellsError(f"{where}: {dtype} tensor needs scale and zero_point")
    return TensorSpec(
        shape=tuple(shape),
        dtype=dtype,
        scale=None if scale is None else float(scale),
        zero_point=None if zp is None else int(zp),
    )


def _file(d: Any, where: str) -> FileEntry:
    if not isinstance(d, dict):
        raise EdgecellsError(f"{where}: file entry must be an object")
    rel = _safe_relpath(d.get("path"), where)
    sha = _req(d, "sha256", str, where)
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise EdgecellsError(f"{where}: sha256 of {rel} is not a lowercase hex SHA-256")
    size = _req(d, "bytes", int, where)
    if size < 0:
        raise EdgecellsError(f"{where}: negative size for {rel}")
    return FileEntry(path=rel, sha256=sha, bytes=size)


def _model(d: Any, i: int, mpath: str) -> ModelEntry:
    where = f"{mpath}: models[{i}]"
    if not isinstance(d, dict):
        raise EdgecellsError(f"{where}: must be an object")
    mid = _req(d, "id", str, where)
    where = f"{mpath}: model {mid!r}"
    fmt = _req(d, "format", str, where)
    if fmt not in FORMATS:
        raise EdgecellsError(f"{where}: unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    prec = _req(d, "precision", str, where)
    if prec not in PRECISIONS:
        raise EdgecellsError(f"{where}: unknown precision {prec!r}")
    backend = d.get("backend", BACKEND_OF_FORMAT[fmt])
    if backend != BACKEND_OF_FORMAT[fmt]:
        raise EdgecellsError(f"{where}: backend {backend!r} does not run format {fmt!r}")
    role = d.get("role", "deploy")
    if role not in ("deploy", "reference"):
        raise EdgecellsError(f"{where}: unknown role {role!r}")
    main = _file({k: d.get(k) for k in ("path", "sha256", "bytes")}, where)
    files_raw = d.get("files") or [main.to_dict()]
    if not isinstance(files_raw, list):
        raise EdgecellsError(f"{where}: 'files' must be a list")
    files = tuple(_file(f, where) for f in files_raw)
    if files[0] != main:
        raise EdgecellsError(f"{where}: files[0] must be the main file {main.path}")
    if fmt == "openvino" and (len(files) < 2 or not files[1].path.endswith(".bin")):
        raise EdgecellsError(f"{where}: an OpenVINO model needs its .xml and .bin files")
    return ModelEntry(
        id=mid,
        format=fmt,
        precision=prec,
        backend=backend,
        role=role,
        path=main.path,
        sha256=main.sha256,
        bytes=main.bytes,
        files=files,
        input=_tensor(d.get("input"), f"{where} input"),
        output=_tensor(d.get("output"), f"{where} output"),
    )


def _selftest(d: Any, classes: list[str], ids: list[str], mpath: str) -> tuple[FileEntry, ...]:
    """The optional ``selftest`` entry: sample files (hashed like model files) and labels."""
    if d is None:
        return ()
    where = f"{mpath}: selftest"
    if not isinstance(d, dict):
        raise EdgecellsError(f"{where}: must be an object")
    mid = d.get("model_id")
    if mid is not None and mid not in ids:
        raise EdgecellsError(f"{where}: model_id {mid!r} is not a model of this bundle")
    samples = d.get("samples", [])
    if not isinstance(samples, list) or len(samples) > SELFTEST_MAX_SAMPLES:
        raise EdgecellsError(
            f"{where}: samples must be a list of at most {SELFTEST_MAX_SAMPLES} entries"
        )
    out = []
    for s in samples:
        fe = _file(s, where)
        label = s.get("label")
        if label not in classes:
            raise EdgecellsError(f"{where}: sample {fe.path} has unknown label {label!r}")
        out.append(fe)
    return tuple(out)


def referenced_files(manifest: dict[str, Any]) -> list[str]:
    """Every file path a (parsed) manifest references: model files, self-test samples,
    then training files."""
    paths: list[str] = []
    for m in manifest.get("models", []):
        for f in m.get("files") or [{"path": m.get("path")}]:
            if f.get("path") not in paths:
                paths.append(f["path"])
    st = manifest.get("selftest")
    if isinstance(st, dict):
        for s in st.get("samples", []):
            if s.get("path") not in paths:
                paths.append(s["path"])
    tr = manifest.get("training")
    if isinstance(tr, dict):
        for k in TRAINING_KEYS:
            e = tr.get(k)
            if isinstance(e, dict) and e.get("path") not in paths:
                paths.append(e["path"])
    return paths


def parse_manifest(manifest: Any, mpath: str = MANIFEST_NAME) -> dict[str, Any]:
    """Check a manifest object against schema v1; returns the parsed fields.

    Raises EdgecellsError naming ``mpath`` and the offending key.
    """
    if not isinstance(manifest, dict):
        raise EdgecellsError(f"{mpath}: manifest must be a JSON object")
    schema = manifest.get("schema")
    if schema != SCHEMA:
        raise EdgecellsError(f"{mpath}: not an edgecells bundle manifest (schema {schema!r})")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise EdgecellsError(
            f"{mpath}: unsupported schema_version {version!r} (this edgecells reads "
            f"{SCHEMA_VERSION}); convert the model again with this version"
        )
    classes = _req(manifest, "classes", list, mpath)
    if not classes or not all(isinstance(c, str) and c for c in classes):
        raise EdgecellsError(f"{mpath}: classes must be a non-empty list of names")
    if len(set(classes)) != len(classes):
        raise EdgecellsError(f"{mpath}: duplicate class names")
    task = manifest.get("task", "multiclass")
    if task not in ("multiclass", "binary"):
        raise EdgecellsError(f"{mpath}: unknown task {task!r}")
    mapping = _req(manifest, "mapping", dict, mpath)
    entries = mapping.get("classes")
    if (
        not isinstance(entries, list)
        or not all(isinstance(e, dict) and isinstance(e.get("abnormal"), bool) for e in entries)
        or [e.get("name") for e in entries] != classes
    ):
        raise EdgecellsError(
            f"{mpath}: mapping.classes must list the bundle's classes in order, each with "
            "name and abnormal: true/false"
        )
    stain = manifest.get("stain_target")
    if stain is not None and not isinstance(stain, dict):
        raise EdgecellsError(f"{mpath}: stain_target must be an object or null")
    pre = _req(manifest, "preprocessing", dict, mpath)
    size = pre.get("input_size")
    if not isinstance(size, int) or isinstance(size, bool) or not 8 <= size <= 1024:
        raise EdgecellsError(f"{mpath}: preprocessing.input_size must be an integer 8..1024")
    method = pre.get("stain_normalization", "none")
    if method not in STAIN_METHODS:
        raise EdgecellsError(f"{mpath}: unknown stain_normalization {method!r}")
    if method != "none" and stain is None:
        raise EdgecellsError(f"{mpath}: stain_normalization {method!r} but no stain_target")
    crop = _req(manifest, "crop", dict, mpath)
    px = pre.get("pixel_size_um")
    side = crop.get("side_um")
    check_ranges({"preprocessing": pre, "crop": crop}, mpath)  # types before arithmetic
    if px is not None and side is not None and abs(side - px * size) > 0.01 * side:
        raise EdgecellsError(
            f"{mpath}: crop.side_um ({side}) must equal input_size x pixel_size_um ({size} x {px})"
        )
    if pre.get("stats", "crop") != "crop":
        raise EdgecellsError(f'{mpath}: preprocessing.stats must be "crop"')
    check_views(pre.get("test_time_views", ["identity"]), mpath)
    thresholds = _req(manifest, "thresholds", dict, mpath)
    screening = thresholds.get("screening", {})
    if screening is not None and not isinstance(screening, dict):
        raise EdgecellsError(f"{mpath}: thresholds.screening must be an object")
    check_ranges(manifest, mpath)
    _check_domain(manifest, mpath)
    _no_nonfinite(manifest, mpath)
    models_raw = _req(manifest, "models", list, mpath)
    if not models_raw:
        raise EdgecellsError(f"{mpath}: bundle lists no models")
    models = [_model(m, i, mpath) for i, m in enumerate(models_raw)]
    ids = [m.id for m in models]
    if len(set(ids)) != len(ids):
        raise EdgecellsError(f"{mpath}: duplicate model ids")
    n_out = 1 if task == "binary" else len(classes)
    for m in models:
        if m.input.shape[1:] != (size, size, 3):
            raise EdgecellsError(
                f"{mpath}: model {m.id!r} input shape {list(m.input.shape)} does not match "
                f"input_size {size}"
            )
        if m.output.shape[-1] not in (n_out, len(classes)):
            raise EdgecellsError(
                f"{mpath}: model {m.id!r} has {m.output.shape[-1]} outputs for "
                f"{len(classes)} classes"
            )
    training = manifest.get("training") or {}
    if not isinstance(training, dict):
        raise EdgecellsError(f"{mpath}: training must be an object")
    training_files = {
        k: _file(training[k], f"{mpath}: training.{k}") for k in TRAINING_KEYS if k in training
    }
    validation = manifest.get("validation") or {}
    provenance = manifest.get("provenance") or {}
    if not isinstance(validation, dict) or not isinstance(provenance, dict):
        raise EdgecellsError(f"{mpath}: validation and provenance must be objects")
    selftest = _selftest(manifest.get("selftest"), classes, ids, mpath)
    return {
        "name": str(manifest.get("name", "")),
        "task": task,
        "classes": list(classes),
        "mapping": mapping,
        "stain_target": stain,
        "preprocessing": pre,
        "crop": crop,
        "thresholds": thresholds,
        "models": models,
        "validation": validation,
        "provenance": provenance,
        "training_files": training_files,
        "selftest": selftest,
    }


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def loads_strict(text: str | bytes) -> Any:
    """``json.loads`` that refuses NaN, Infinity and -Infinity (not JSON; strict parsers
    reject them and they switch range checks off)."""
    return json.loads(text, parse_constant=_no_constant)


def read_manifest_bytes(root: Path) -> bytes:
    """The bytes of root/manifest.json: a regular file (not a link), size-limited."""
    mpath = root / MANIFEST_NAME
    if mpath.is_symlink():
        raise EdgecellsError(f"{mpath}: is a symbolic link (refused; copy the file itself)")
    if not mpath.is_file():
        raise EdgecellsError(f"{mpath}: missing (not a model bundle folder)")
    from edgecells.edge.fileio import read_limited

    return read_limited(mpath, MAX_MANIFEST_BYTES, "manifest too large")


def decode_manifest(data: bytes, mpath: str | os.PathLike[str]) -> Any:
    """JSON of a manifest. NaN/Infinity are parsed here so that parse_manifest can name
    the key that holds one (and refuse it)."""
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise EdgecellsError(f"{mpath}: not valid JSON ({exc})") from None


def read_manifest(root: Path) -> dict[str, Any]:
    """Parse root/manifest.json (JSON only; the schema is checked by parse_manifest)."""
    return decode_manifest(read_manifest_bytes(root), root / MANIFEST_NAME)


def write_manifest(root: str | os.PathLike[str], manifest: dict[str, Any]) -> Path:
    """Check ``manifest`` against the schema and write it atomically to root/manifest.json."""
    r = Path(root)
    parse_manifest(manifest, str(r / MANIFEST_NAME))
    text = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", dir=r)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, r / MANIFEST_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return r / MANIFEST_NAME
