"""Manifest schema v1: constants, the dataclasses a loaded bundle is made of, parsing with
type and range checks, reading and atomic writing of ``manifest.json``. The schema is
documented in :mod:`edgecells.edge.bundle`."""

from __future__ import annotations

import json
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

MAX_MANIFEST_BYTES = 4 << 20


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
    source: str = ""  # what the user gave (folder or archive path)

    @property
    def input_size(self) -> int:
        return int(self.preprocessing["input_size"])

    @property
    def pixel_size_um(self) -> float:
        """The model's input pixel size, µm/px (older bundles: crop side_um / input_size)."""
        px = self.preprocessing.get("pixel_size_um")
        if px is None:
            return float(self.crop.get("side_um", 24.0)) / self.input_size
        return float(px)

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
    if px is not None and (
        isinstance(px, bool) or not isinstance(px, (int, float)) or not 0.005 <= px <= 10
    ):
        raise EdgecellsError(f"{mpath}: preprocessing.pixel_size_um must be 0.005..10 µm/px")
    side = crop.get("side_um")
    if side is not None and (
        isinstance(side, bool) or not isinstance(side, (int, float)) or not 0 < side <= 1000
    ):
        raise EdgecellsError(f"{mpath}: crop.side_um must be a number of micrometres > 0")
    if px is not None and side is not None and abs(side - px * size) > 0.01 * side:
        raise EdgecellsError(
            f"{mpath}: crop.side_um ({side}) must equal input_size x pixel_size_um ({size} x {px})"
        )
    if pre.get("stats", "crop") != "crop":
        raise EdgecellsError(f'{mpath}: preprocessing.stats must be "crop"')
    thresholds = _req(manifest, "thresholds", dict, mpath)
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
    validation = manifest.get("validation") or {}
    provenance = manifest.get("provenance") or {}
    if not isinstance(validation, dict) or not isinstance(provenance, dict):
        raise EdgecellsError(f"{mpath}: validation and provenance must be objects")
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
    }


def read_manifest(root: Path) -> dict[str, Any]:
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise EdgecellsError(f"{mpath}: missing (not a model bundle folder)")
    if mpath.stat().st_size > MAX_MANIFEST_BYTES:
        raise EdgecellsError(f"{mpath}: manifest too large")
    try:
        return json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EdgecellsError(f"{mpath}: not valid JSON ({exc})") from None


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
