"""The model bundle: the one contract between the host toolchain and the device.

A bundle is a folder (or a ``.tar.gz`` / ``.tgz`` / ``.zip`` archive of one) holding
``manifest.json`` and the model files it lists. :func:`load_bundle` checks the schema and
the size and SHA-256 of every listed file and returns a :class:`Bundle`; anything wrong
(tampered, truncated, missing or unlisted-schema file) raises
:class:`~edgecells.edge.errors.EdgecellsError` naming the file. Archives are extracted
safely (see :func:`extract_archive`).

Manifest schema, version 1 (``manifest.json``, UTF-8 JSON object)::

    {
      "schema": "edgecells.bundle",          # fixed
      "schema_version": 1,                   # this module reads exactly 1
      "name": "reference",                   # free text
      "task": "multiclass",                  # or "binary" (one sigmoid output)
      "classes": ["basophil", ...],          # output order of every model
      "mapping": {                           # ClassMapping.to_dict() (edge/mappings.py)
        "schema": "edgecells.mapping/1", "name": "pbc8", ...,
        "classes": [{"name": "basophil", "abnormal": false, "description": ""}, ...]
      },                                     # same names, same order as "classes"
      "stain_target": {...} | null,          # StainTarget.to_dict(); null = no normalization
      "preprocessing": {
        "input_size": 128,                   # square model input side, pixels
        "channels": "RGB",
        "value_range": [0, 255],             # models take raw pixel values, scale inside
        "stain_normalization": "reinhard-fixed-v1" | "none",
        "resize": "area"                     # cv2 interpolation used by edge/preprocess
      },
      "crop": {                              # how the device cuts a cell crop from a frame
        "side_um": 24.0,                     # crop side in micrometres, when the frame's
                                             #   scale (um per pixel) is known
        "min_side_factor": 1.4,              # crop side >= this x the detected cell's box side
        "training_side_px": 200              # side of the training crops (PBC: 200 px)
      },
      "thresholds": {
        "min_confidence": 0.5,               # top-1 probability below this = "uncertain" cell
        "screening": {
          "min_cells": 100,                  # fewer classified cells = inconclusive
          "abnormal_fraction": 0.02,         # flag when the abnormal fraction exceeds this
          "confidence": 0.95,                # one-sided confidence of the flag decision
          "false_positive_rate": 0.02        # per-cell normal->abnormal rate (measured)
        }
      },
      "models": [                            # one entry per model file set
        {
          "id": "tflite-int8",               # unique; "<format>-<precision>"
          "format": "tflite",                # tflite | openvino | onnx
          "precision": "int8",               # int8 | float32
          "backend": "litert",               # litert | openvino | onnxruntime
          "role": "deploy",                  # deploy | reference (float32 kept to compare)
          "path": "model_int8.tflite",       # main file, relative to the bundle root
          "sha256": "...", "bytes": 123,     # of the main file
          "files": [                         # every file of this model (main file first;
            {"path": "...", "sha256": "...", "bytes": 123}   # OpenVINO: .xml then .bin)
          ],
          "input":  {"shape": [-1, 128, 128, 3], "dtype": "int8",
                     "scale": 1.0, "zero_point": -128},   # scale/zero_point null if float
          "output": {"shape": [-1, 8], "dtype": "int8",
                     "scale": 0.00390625, "zero_point": -128}
        }
      ],
      "validation": {"tflite-int8": {...metrics...}, ...},   # per model id, may be {}
      "provenance": {
        "source_model": "model.keras", "source_model_sha256": "...",
        "calibration_sha256": "..." | null, "calibration_manifest": {...} | null,
        "data": "free text (data set, split)", "edgecells_version": "0.1.0",
        "created": "2026-01-01T00:00:00+00:00", "tools": {"tensorflow": "2.21.0", ...}
      }
    }

Batch dimensions are ``-1`` (any batch size). Extra keys are allowed and kept in
:attr:`Bundle.manifest`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
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
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".zip")

# Safe-extraction limits (a bundle is a few MB; the reference bundle well under 20 MB).
MAX_ARCHIVE_TOTAL_BYTES = 1 << 30  # 1 GiB uncompressed in all
MAX_ARCHIVE_MEMBERS = 256
MAX_MANIFEST_BYTES = 4 << 20

_HASH_CHUNK = 1 << 20


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


# --------------------------------------------------------------------------- hashing


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_entry(root: str | os.PathLike[str], relpath: str) -> FileEntry:
    """A :class:`FileEntry` for ``root/relpath`` (posix relative path)."""
    p = Path(root) / relpath
    return FileEntry(path=relpath, sha256=sha256_file(p), bytes=p.stat().st_size)


# --------------------------------------------------------------------------- paths


def default_bundle_path() -> Path:
    """The reference bundle shipped inside the package."""
    return Path(__file__).resolve().parent / "data" / "bundles" / "reference"


def is_archive(path: str | os.PathLike[str]) -> bool:
    name = str(path).lower()
    return any(name.endswith(s) for s in ARCHIVE_SUFFIXES)


def _safe_relpath(rel: Any, where: str) -> str:
    """A manifest path must be a plain relative posix path inside the bundle."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise EdgecellsError(f"{where}: invalid file path {rel!r}")
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or rel.startswith("~") or ":" in p.parts[0]:
        raise EdgecellsError(f"{where}: file path {rel!r} points outside the bundle")
    return str(p)


# --------------------------------------------------------------------------- archives


def _check_member_name(name: str, archive: Path) -> PurePosixPath:
    if not name or "\x00" in name or "\\" in name:
        raise EdgecellsError(f"{archive}: archive member {name!r} has an invalid name")
    p = PurePosixPath(name)
    if p.is_absolute() or name.startswith("/") or (p.parts and ":" in p.parts[0]):
        raise EdgecellsError(f"{archive}: archive member {name!r} has an absolute path")
    if ".." in p.parts:
        raise EdgecellsError(f"{archive}: archive member {name!r} escapes the bundle (..)")
    return p


def _copy_limited(src: Any, dst: Path, budget: list[int], archive: Path, name: str) -> None:
    """Copy a member stream, counting real bytes against the remaining budget."""
    with open(dst, "wb") as out:
        while chunk := src.read(_HASH_CHUNK):
            budget[0] -= len(chunk)
            if budget[0] < 0:
                raise EdgecellsError(
                    f"{archive}: archive too large when extracted (at {name!r}; limit "
                    f"{MAX_ARCHIVE_TOTAL_BYTES} bytes)"
                )
            out.write(chunk)


def extract_archive(
    archive: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    max_bytes: int = MAX_ARCHIVE_TOTAL_BYTES,
    max_members: int = MAX_ARCHIVE_MEMBERS,
) -> Path:
    """Safely extract a ``.tar.gz``/``.tgz``/``.zip`` bundle archive into ``dest``.

    Refused (EdgecellsError naming the archive and member): absolute paths, ``..``
    components, symbolic or hard links, devices/FIFOs, more than ``max_members``
    members, more than ``max_bytes`` uncompressed bytes (counted while copying, so a
    lying header does not help). Only regular files and folders are written. Returns
    ``dest``.
    """
    src = Path(archive)
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    budget = [int(max_bytes)]
    name_l = src.name.lower()
    try:
        if name_l.endswith(".zip"):
            with zipfile.ZipFile(src) as zf:
                infos = zf.infolist()
                if len(infos) > max_members:
                    raise EdgecellsError(f"{src}: archive has too many members ({len(infos)})")
                if sum(i.file_size for i in infos) > max_bytes:
                    raise EdgecellsError(
                        f"{src}: archive too large when extracted (limit {max_bytes} bytes)"
                    )
                for info in infos:
                    rel = _check_member_name(info.filename.rstrip("/") or ".", src)
                    mode = (info.external_attr >> 16) & 0xFFFF
                    if mode and stat.S_ISLNK(mode):
                        raise EdgecellsError(
                            f"{src}: archive member {info.filename!r} is a link (not allowed)"
                        )
                    if mode and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                        raise EdgecellsError(
                            f"{src}: archive member {info.filename!r} is not a regular file"
                        )
                    target = out.joinpath(*rel.parts)
                    if info.is_dir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as stream:
                        _copy_limited(stream, target, budget, src, info.filename)
        elif name_l.endswith((".tar.gz", ".tgz")):
            with tarfile.open(src, mode="r:gz") as tf:
                count = 0
                for member in tf:
                    count += 1
                    if count > max_members:
                        raise EdgecellsError(f"{src}: archive has too many members")
                    rel = _check_member_name(member.name.rstrip("/") or ".", src)
                    if member.issym() or member.islnk():
                        raise EdgecellsError(
                            f"{src}: archive member {member.name!r} is a link (not allowed)"
                        )
                    if member.isdir():
                        out.joinpath(*rel.parts).mkdir(parents=True, exist_ok=True)
                        continue
                    if not member.isfile():
                        raise EdgecellsError(
                            f"{src}: archive member {member.name!r} is not a regular file"
                        )
                    if member.size > budget[0]:
                        raise EdgecellsError(
                            f"{src}: archive too large when extracted (at {member.name!r}; "
                            f"limit {max_bytes} bytes)"
                        )
                    target = out.joinpath(*rel.parts)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    stream = tf.extractfile(member)
                    if stream is None:
                        raise EdgecellsError(f"{src}: cannot read archive member {member.name!r}")
                    with stream:
                        _copy_limited(stream, target, budget, src, member.name)
        else:
            raise EdgecellsError(
                f"{src}: not a bundle archive (expected {', '.join(ARCHIVE_SUFFIXES)})"
            )
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise EdgecellsError(f"{src}: corrupt or unreadable archive ({exc})") from None
    # Defence in depth: nothing written may resolve outside dest.
    root = out.resolve()
    for p in out.rglob("*"):
        if p.is_symlink() or not p.resolve().is_relative_to(root):
            raise EdgecellsError(f"{src}: archive member {p.name!r} escapes the bundle")
    return out


def _cache_dir() -> Path:
    base = os.environ.get("EDGECELLS_CACHE") or os.environ.get("XDG_CACHE_HOME")
    root = Path(base) if base else Path.home() / ".cache"
    if not os.environ.get("EDGECELLS_CACHE"):
        root = root / "edgecells"
    return root / "bundles"


def _extract_cached(archive: Path, extract_to: Path | None) -> Path:
    if not archive.is_file():
        raise EdgecellsError(f"{archive}: no such bundle archive")
    if extract_to is not None:
        dest = Path(extract_to)
        if dest.exists() and any(dest.iterdir()):
            raise EdgecellsError(f"{dest}: extraction folder exists and is not empty")
        return extract_archive(archive, dest)
    digest = sha256_file(archive)
    cache = _cache_dir()
    final = cache / digest[:32]
    if final.is_dir():
        return final  # contents are re-verified against the manifest by the caller
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=cache))
    try:
        extract_archive(archive, tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _bundle_root_in(folder: Path, archive: Path) -> Path:
    """manifest.json at the top of the archive, or inside its single top folder."""
    if (folder / MANIFEST_NAME).is_file():
        return folder
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / MANIFEST_NAME).is_file():
        return entries[0]
    raise EdgecellsError(f"{archive}: archive holds no {MANIFEST_NAME}")


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


# --------------------------------------------------------------------------- loading


def verify_files(root: Path, models: list[ModelEntry]) -> None:
    """Check size and SHA-256 of every listed file; EdgecellsError naming the file."""
    rroot = root.resolve()
    for m in models:
        for f in m.files:
            p = root / f.path
            if p.is_symlink() or (p.exists() and not p.resolve().is_relative_to(rroot)):
                raise EdgecellsError(f"{p}: is a link or lies outside the bundle (refused)")
            if not p.is_file():
                raise EdgecellsError(f"{p}: missing (listed in {MANIFEST_NAME})")
            size = p.stat().st_size
            if size != f.bytes:
                what = "truncated" if size < f.bytes else "wrong size"
                raise EdgecellsError(
                    f"{p}: {what} ({size} bytes, manifest says {f.bytes}); the file is "
                    "damaged or does not belong to this bundle"
                )
            if sha256_file(p) != f.sha256:
                raise EdgecellsError(
                    f"{p}: SHA-256 mismatch (file modified or corrupted); refusing to load it"
                )


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


def load_bundle(
    path: str | os.PathLike[str] | None = None,
    verify: bool = True,
    extract_to: str | os.PathLike[str] | None = None,
) -> Bundle:
    """Load and verify a bundle folder, its ``manifest.json``, or a bundle archive.

    ``path`` None means the shipped reference bundle. Archives are extracted safely to
    ``extract_to`` or to a cache folder keyed by the archive's SHA-256
    (``$EDGECELLS_CACHE`` or ``~/.cache/edgecells/bundles``). With ``verify`` (the
    default) every file's size and SHA-256 is checked against the manifest.
    """
    src = Path(path) if path is not None else default_bundle_path()
    if is_archive(src):
        root = _bundle_root_in(_extract_cached(src, Path(extract_to) if extract_to else None), src)
    elif src.is_file() and src.name == MANIFEST_NAME:
        root = src.parent
    elif src.is_dir():
        root = src
    elif src.exists():
        raise EdgecellsError(f"{src}: not a bundle folder, manifest.json or bundle archive")
    else:
        raise EdgecellsError(f"{src}: no such bundle")
    manifest = read_manifest(root)
    fields = parse_manifest(manifest, str(root / MANIFEST_NAME))
    if verify:
        verify_files(root, fields["models"])
    return Bundle(root=root, manifest=manifest, source=str(src), **fields)


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
