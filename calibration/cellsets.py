"""Labelled cells from every microscope in ``../shared/data``, at their physical scale.

A :class:`CellRecord` is one labelled white cell: an image file, where the cell is in it
(``cx, cy``; ``None`` = the image's centre, for single-cell crops), the data set's pixel
size (:mod:`.pixel_sizes`) and its split. Three layouts:

- single-cell crops with ``splits.csv`` (``path,label,split``; PBC) or ``path,split`` with
  the label taken from the class folder (LISC, split by cell group in the file);
- frames with Pascal VOC boxes (``annotations/*.xml``, class ``WBC``), a per-frame subtype
  file (``wbc_subtypes.csv`` frame,label) and ``splits.csv`` (frame,split): DeepBioNet.
  Only frames with exactly one WBC box are cells (a two-box frame has a frame label only);
  the cell is the box centre;
- BCCD (``BCCD/Annotations`` + ``wbc_labels.csv`` + ``BCCD/ImageSets/Main/*.txt``):
  evaluation only — :func:`bccd_records` exists so that benchmarks can find the cells,
  never for training (see training/train.py, which refuses it).

:func:`prepare_records` turns records into model inputs with
:func:`edgecells.edge.preprocess.prepare_cell` (cut at the model's field, resample, stain
normalize), cached as ``.npz``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgecells.calibration.datasets import default_cache_dir, load_dataset
from edgecells.calibration.pixel_sizes import pixel_size_for
from edgecells.edge.errors import EdgecellsError
from edgecells.edge.fileio import atomic_save
from edgecells.edge.imageio import read_image
from edgecells.edge.mappings import ClassMapping
from edgecells.edge.preprocess import PREPROCESS_VERSION, prepare_cell
from edgecells.edge.stain import ReinhardNormalizer, StainTarget


@dataclass(frozen=True)
class CellRecord:
    """One labelled cell."""

    path: Path
    label: str
    split: str
    source: str  # data-set name (folder name)
    pixel_size_um: float
    cx: float | None = None  # None: the image's centre
    cy: float | None = None


def _source_px(root: Path, pixel_size_um: float | None) -> float:
    px = pixel_size_um if pixel_size_um is not None else pixel_size_for(root)
    if px is None:
        raise EdgecellsError(
            f"{root}: unknown pixel size; pass it (µm/px, e.g. --pixel-size) for this data set"
        )
    return float(px)


def _read_csv(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    except OSError as exc:
        raise EdgecellsError(f"{path}: cannot read ({exc.strerror})") from None


def voc_boxes(xml_path: Path, name: str = "WBC") -> list[tuple[float, float, float, float]]:
    """(xmin, ymin, xmax, ymax) of the boxes of class ``name`` in a VOC file."""
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise EdgecellsError(f"{xml_path}: cannot read VOC annotation ({exc})") from None
    out = []
    for o in root.findall("object"):
        if (o.findtext("name") or "").strip() != name:
            continue
        b = o.find("bndbox")
        if b is not None:
            out.append(tuple(float(b.findtext(k, "0")) for k in ("xmin", "ymin", "xmax", "ymax")))
    return out  # type: ignore[return-value]


def _crop_records(root: Path, mapping: ClassMapping | None, px: float) -> list[CellRecord]:
    splits = root / "splits.csv"
    rows = _read_csv(splits) if splits.is_file() else []
    if rows and "label" not in rows[0] and "path" in rows[0]:  # LISC: label = class folder
        recs = []
        for r in rows:
            p = root / r["path"]
            label = Path(r["path"]).parts[0]
            if mapping is not None and label not in mapping.classes:
                raise EdgecellsError(f"{splits}: label {label!r} not in mapping {mapping.name}")
            if p.is_file():
                recs.append(CellRecord(p, label, r["split"].strip(), root.name, px))
        return recs
    ds = load_dataset(root, mapping=mapping)
    return [CellRecord(s.path, s.label, s.split, root.name, px) for s in ds.samples]


def _voc_records(
    root: Path, frames: Path, ann: Path, labels: dict[str, str], splits: dict[str, str], px: float
) -> list[CellRecord]:
    recs = []
    for frame, label in sorted(labels.items()):
        xml = ann / f"{frame}.xml"
        img = frames / f"{frame}.jpg"
        if not xml.is_file() or not img.is_file():
            continue
        boxes = voc_boxes(xml)
        if len(boxes) != 1:
            continue  # no box or two boxes: a frame-level label only
        x0, y0, x1, y1 = boxes[0]
        recs.append(
            CellRecord(
                img, label, splits.get(frame, "all"), root.name, px, (x0 + x1) / 2, (y0 + y1) / 2
            )
        )
    return recs


def bccd_records(
    root: str | os.PathLike[str], pixel_size_um: float | None = None
) -> list[CellRecord]:
    """BCCD's labelled single-WBC frames (evaluation only); split = "test" for frames on
    ``ImageSets/Main/test.txt``, else "other"."""
    r = Path(root)
    px = _source_px(r, pixel_size_um)
    labels = {row["frame"]: row["label"] for row in _read_csv(r / "wbc_labels.csv")}
    test_list = r / "BCCD" / "ImageSets" / "Main" / "test.txt"
    test = set(test_list.read_text().split()) if test_list.is_file() else set()
    splits = {f: ("test" if f in test else "other") for f in labels}
    return _voc_records(
        r, r / "BCCD" / "JPEGImages", r / "BCCD" / "Annotations", labels, splits, px
    )


def cell_records(
    root: str | os.PathLike[str],
    mapping: ClassMapping | None = None,
    pixel_size_um: float | None = None,
) -> list[CellRecord]:
    """The labelled cells of a data folder (crops or VOC frames), at its pixel size."""
    r = Path(root)
    if not r.is_dir():
        raise EdgecellsError(f"{r}: no such data folder")
    px = _source_px(r, pixel_size_um)
    if (r / "BCCD").is_dir() and (r / "wbc_labels.csv").is_file():
        raise EdgecellsError(
            f"{r}: BCCD white-cell labels are for evaluation only (bccd_records), not training"
        )
    if (r / "annotations").is_dir() and (r / "wbc_subtypes.csv").is_file():
        labels = {row["frame"]: row["label"] for row in _read_csv(r / "wbc_subtypes.csv")}
        splits = {row["frame"]: row["split"] for row in _read_csv(r / "splits.csv")}
        if mapping is not None:
            bad = sorted({v for v in labels.values() if v not in mapping.classes})
            if bad:
                raise EdgecellsError(f"{r}: label(s) {', '.join(bad)} not in {mapping.name}")
        return _voc_records(r, r / "frames", r / "annotations", labels, splits, px)
    return _crop_records(r, mapping, px)


Augment = Callable[[np.ndarray, np.random.Generator], np.ndarray]
# cut-and-augment hook: (record image, record, rng) -> small uint8 crop before normalization


def records_key(records: Sequence[CellRecord], extra: dict[str, object]) -> str:
    files = []
    for r in records:
        try:
            st = r.path.stat()
            files.append(
                [str(r.path), r.label, r.cx, r.cy, r.pixel_size_um, st.st_size, st.st_mtime_ns]
            )
        except OSError:
            files.append([str(r.path), r.label, -1])
    blob = json.dumps(
        {"preprocess": PREPROCESS_VERSION, "files": files, **extra}, sort_keys=True, default=str
    ).encode()
    return hashlib.sha256(blob).hexdigest()


def prepare_records(
    records: Sequence[CellRecord],
    classes: Sequence[str],
    size: int,
    model_pixel_um: float,
    target: StainTarget | None,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs (N x size x size x 3 uint8) and class indices of ``records``, through
    :func:`prepare_cell` exactly as the device does (cached)."""
    key = records_key(
        records,
        {
            "kind": "cells",
            "size": size,
            "px": model_pixel_um,
            "classes": list(classes),
            "target": target.to_dict() if target else None,
        },
    )
    cfile = Path(cache_dir or default_cache_dir()) / f"cells-{size}-{key[:24]}.npz"
    if use_cache and cfile.is_file():
        try:
            with np.load(cfile) as z:
                return z["x"], z["y"]
        except (OSError, ValueError, KeyError):
            pass
    norm = ReinhardNormalizer(target) if target is not None else None

    def one(r: CellRecord) -> np.ndarray:
        img = read_image(r.path)
        h, w = img.shape[:2]
        cx = w / 2 if r.cx is None else r.cx
        cy = h / 2 if r.cy is None else r.cy
        return prepare_cell(img, cx, cy, r.pixel_size_um, size, model_pixel_um, norm)

    x = np.empty((len(records), size, size, 3), np.uint8)
    with ThreadPoolExecutor(2) as pool:
        for i, a in enumerate(pool.map(one, records)):
            x[i] = a
    y = np.array([list(classes).index(r.label) for r in records], dtype=np.int64)
    if use_cache:
        atomic_save(cfile, lambda f: np.savez(f, x=x, y=y), fsync=False)
    return x, y
