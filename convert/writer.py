"""Writing model bundles: model entries with hashes, the manifest, and archives."""

from __future__ import annotations

import io
import json
import os
import platform
import tarfile
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgecells.edge.bundle import (
    BACKEND_OF_FORMAT,
    MANIFEST_NAME,
    SCHEMA,
    SCHEMA_VERSION,
    file_entry,
    write_manifest,
)
from edgecells.edge.errors import EdgecellsError
from edgecells.edge.fileio import atomic_save

DEFAULTS_PATH = Path(__file__).resolve().parent / "data" / "defaults.json"
# A stain target's source list longer than this is left out of the manifest (kept count).
MAX_TARGET_SOURCES = 64


def defaults() -> dict[str, Any]:
    """convert/data/defaults.json: crop geometry, thresholds, validation gate."""
    return json.loads(DEFAULTS_PATH.read_text(encoding="utf-8"))


def model_entry(
    root: str | os.PathLike[str],
    fmt: str,
    precision: str,
    files: list[str],
    input_spec: dict[str, Any],
    output_spec: dict[str, Any],
    role: str | None = None,
) -> dict[str, Any]:
    """A manifest ``models`` entry; hashes the files (relative posix paths under root)."""
    entries = [file_entry(root, f).to_dict() for f in files]
    return {
        "id": f"{fmt}-{precision}",
        "format": fmt,
        "precision": precision,
        "backend": BACKEND_OF_FORMAT[fmt],
        "role": role or ("deploy" if precision == "int8" else "reference"),
        "path": entries[0]["path"],
        "sha256": entries[0]["sha256"],
        "bytes": entries[0]["bytes"],
        "files": entries,
        "input": input_spec,
        "output": output_spec,
    }


def compact_target(target: dict[str, Any] | None) -> dict[str, Any] | None:
    if target is None:
        return None
    t = dict(target)
    srcs = t.get("sources") or []
    if len(srcs) > MAX_TARGET_SOURCES:
        t["sources"] = []
        t["n_sources_omitted"] = len(srcs)
    return t


def tool_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in (
        "tensorflow",
        "tensorflow-cpu",
        "tf2onnx",
        "onnx",
        "onnxruntime",
        "openvino",
        "nncf",
        "ai-edge-litert",
        "keras",
    ):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def build_manifest(
    *,
    name: str,
    task: str,
    classes: list[str],
    mapping: dict[str, Any],
    stain_target: dict[str, Any] | None,
    input_size: int,
    models: list[dict[str, Any]],
    validation: dict[str, Any],
    provenance: dict[str, Any],
    crop: dict[str, Any] | None = None,
    thresholds: dict[str, Any] | None = None,
    pixel_size_um: float | None = None,
    test_time_views: list[str] | None = None,
) -> dict[str, Any]:
    """A schema-v1 manifest (see edge/bundle/__init__.py); crop/thresholds default from
    defaults.json; ``test_time_views`` other than ["identity"] are recorded."""
    from edgecells import __version__

    d = defaults()
    crop_d = {k: v for k, v in (crop or d["crop"]).items() if k != "comment"}
    pre: dict[str, Any] = {}
    if pixel_size_um is not None:
        # the model's physical input: every cell is cut at side_um and resampled to
        # pixel_size_um before stain normalization (edge/preprocess.py, prepare_cell-v2)
        side = round(float(input_size) * float(pixel_size_um), 6)
        crop_d = {"side_um": side}
        pre = {
            "pixel_size_um": float(pixel_size_um),
            "stats": "crop",
            "function": "prepare_cell-v2",
        }
    if test_time_views and list(test_time_views) != ["identity"]:
        pre["test_time_views"] = list(test_time_views)
    prov = {
        "edgecells_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tools": tool_versions(),
        **provenance,
    }
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "task": task,
        "classes": list(classes),
        "mapping": mapping,
        "stain_target": compact_target(stain_target),
        "preprocessing": {
            "input_size": int(input_size),
            "channels": "RGB",
            "value_range": [0, 255],
            "stain_normalization": "reinhard-fixed-v1" if stain_target else "none",
            "resize": "area",
            "function": "prepare_crop-v1",
            **pre,
        },
        "crop": crop_d,
        "thresholds": thresholds or d["thresholds"],
        "models": models,
        "validation": validation,
        "provenance": prov,
    }


def write(root: str | os.PathLike[str], manifest: dict[str, Any]) -> Path:
    """Validate against the schema and write ``root/manifest.json`` atomically."""
    return write_manifest(root, manifest)


def archive(bundle_dir: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Pack the manifest, its signature (when signed) and every file the manifest
    references (model files, self-test samples and training files) into ``dest``
    (.tar.gz, .tgz or .zip).

    Members sit under one top folder named after the bundle; only these files go in. The
    bundle is verified first (an archive of a broken bundle is never made).
    """
    from edgecells.edge.bundle import load_bundle, referenced_files
    from edgecells.edge.bundle.signing import SIGNATURE_NAME

    root = Path(bundle_dir)
    out = Path(dest)
    b = load_bundle(root)
    files = [MANIFEST_NAME] + referenced_files(b.manifest)
    if (root / SIGNATURE_NAME).is_file():
        files.append(SIGNATURE_NAME)
    top = root.resolve().name or "bundle"
    name = out.name.lower()
    if not name.endswith((".zip", ".tar.gz", ".tgz")):
        raise EdgecellsError(f"{out}: archive name must end in .tar.gz, .tgz or .zip")

    def write(fh: Any) -> None:
        if name.endswith(".zip"):
            with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                for f in files:
                    zf.write(root / f, f"{top}/{f}")
            return
        with tarfile.open(fileobj=fh, mode="w:gz") as tf:
            for f in files:
                data = (root / f).read_bytes()
                info = tarfile.TarInfo(f"{top}/{f}")
                info.size = len(data)
                info.mode = 0o644
                info.mtime = int((root / f).stat().st_mtime)
                tf.addfile(info, io.BytesIO(data))

    atomic_save(out, write, fsync=False)
    return out
