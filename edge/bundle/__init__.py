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
        "resize": "area",                    # cv2 interpolation used by edge/preprocess
        "pixel_size_um": 0.3125,             # the model's input pixel size, um/px: every cell
                                             #   is cut at input_size x pixel_size_um um and
                                             #   resampled to it BEFORE stain normalization
        "stats": "crop",                     # Reinhard statistics: the resampled crop's own
        "function": "prepare_cell-v2",
        "test_time_views": ["identity", "hflip"]   # optional: class probabilities are the
                                             #   mean over these views of the prepared crop
                                             #   (VIEWS; absent = ["identity"]); thresholds
                                             #   are fitted on the same averaged output
      },
      "crop": {                              # how the device cuts a cell crop from a frame
        "side_um": 20.0                      # the model's field, um (= input_size x
                                             #   pixel_size_um). Bundles without
                                             #   preprocessing.pixel_size_um (before v0.x):
                                             #   pixel size = side_um / input_size
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
      "training": {                          # optional: what `edgecells adapt` needs
        "source_model": {"path": "training/model.keras", "sha256": "...", "bytes": 1,
                         "format": "keras", "role": "source"},   # the float model
        "replay": {"path": "training/replay.npz", "sha256": "...", "bytes": 1, ...}
      },                                     # (files verified like the models')
      "adaptation": {...},                   # optional: parent hash, local data, metrics
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
import os
from pathlib import Path

from edgecells.edge.bundle.archive import (
    ARCHIVE_SUFFIXES,
    MAX_ARCHIVE_MEMBERS,
    MAX_ARCHIVE_TOTAL_BYTES,
    bundle_root_in,
    extract_archive,
    extract_cached,
    is_archive,
)
from edgecells.edge.bundle.manifest import (
    BACKEND_OF_FORMAT,
    FORMATS,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    PRECISIONS,
    RANGES,
    SCHEMA,
    SCHEMA_VERSION,
    STAIN_METHODS,
    VIEWS,
    Bundle,
    FileEntry,
    ModelEntry,
    Range,
    TensorSpec,
    check_ranges,
    check_views,
    decode_manifest,
    loads_strict,
    parse_manifest,
    read_manifest,
    read_manifest_bytes,
    referenced_files,
    write_manifest,
)
from edgecells.edge.bundle.verify import file_entry, sha256_file, verify_files
from edgecells.edge.errors import EdgecellsError

__all__ = [
    "ARCHIVE_SUFFIXES",
    "BACKEND_OF_FORMAT",
    "FORMATS",
    "MANIFEST_NAME",
    "MAX_ARCHIVE_MEMBERS",
    "MAX_ARCHIVE_TOTAL_BYTES",
    "MAX_MANIFEST_BYTES",
    "PRECISIONS",
    "RANGES",
    "SCHEMA",
    "SCHEMA_VERSION",
    "STAIN_METHODS",
    "VIEWS",
    "Bundle",
    "FileEntry",
    "ModelEntry",
    "Range",
    "TensorSpec",
    "check_ranges",
    "check_views",
    "default_bundle_path",
    "extract_archive",
    "file_entry",
    "is_archive",
    "load_bundle",
    "parse_manifest",
    "loads_strict",
    "read_manifest",
    "referenced_files",
    "sha256_file",
    "verify_files",
    "write_manifest",
]


def default_bundle_path() -> Path:
    """The reference bundle shipped inside the package."""
    from edgecells.edge.resources import REFERENCE_BUNDLE_DIR

    return REFERENCE_BUNDLE_DIR


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
        root = bundle_root_in(extract_cached(src, Path(extract_to) if extract_to else None), src)
    elif src.is_file() and src.name == MANIFEST_NAME:
        root = src.parent
    elif src.is_dir():
        root = src
    elif src.exists():
        raise EdgecellsError(f"{src}: not a bundle folder, manifest.json or bundle archive")
    else:
        raise EdgecellsError(f"{src}: no such bundle")
    raw = read_manifest_bytes(root)
    manifest = decode_manifest(raw, root / MANIFEST_NAME)
    fields = parse_manifest(manifest, str(root / MANIFEST_NAME))
    if verify:
        verify_files(
            root,
            fields["models"],
            list(fields["selftest"]) + list(fields["training_files"].values()),
        )
    return Bundle(
        root=root,
        manifest=manifest,
        source=str(src),
        manifest_sha256=hashlib.sha256(raw).hexdigest(),
        **fields,
    )
