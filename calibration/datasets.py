"""Labelled single-cell image sets: layouts, splits, and preprocessed (cached) arrays.

Two layouts are read:

- a folder with ``splits.csv`` (columns ``path,label,split``; paths relative to the
  folder), like ``../shared/data/pbc``; without a ``label`` column the label is the
  path's class folder (``../shared/data/lisc``);
- a folder of class folders (``root/<class>/*.jpg``), split into train/val/test by a
  seeded stratified split; or ``root/{train,val,test}/<class>/*.jpg`` with the split
  given by the folders.

Unreadable or corrupt images are reported by name (``LoadedSplit.skipped``) and
skipped, never silently dropped. Preprocessed arrays (:func:`edgecells.edge.preprocess.
prepare_crop`) are cached on disk as ``.npz`` keyed by a hash of every input, so a
second run starts in seconds.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgecells.edge.errors import EdgecellsError
from edgecells.edge.fileio import atomic_save, user_cache_dir, write_json_atomic
from edgecells.edge.imageio import IMAGE_SUFFIXES, read_image
from edgecells.edge.mappings import ClassMapping
from edgecells.edge.preprocess import PREPROCESS_VERSION, prepare_crop
from edgecells.edge.stain import ReinhardNormalizer, StainTarget

SPLITS = ("train", "val", "test")
SPLITS_FILE = "splits.csv"
DEFAULT_VAL_FRACTION = 0.1
DEFAULT_TEST_FRACTION = 0.2
CACHE_FORMAT = "edgecells.cache/1"

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Sample:
    """One labelled image."""

    path: Path
    label: str
    split: str


@dataclass
class CellDataset:
    """A labelled image set with its split assignment."""

    root: Path
    classes: list[str]
    samples: list[Sample]
    layout: str  # "splits.csv", "split-folders" or "class-folders"
    missing: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def split(self, name: str) -> list[Sample]:
        if name not in SPLITS and name != "all":
            raise EdgecellsError(f"{self.root}: unknown split {name!r} (use {', '.join(SPLITS)})")
        return [s for s in self.samples if name == "all" or s.split == name]

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {s: {c: 0 for c in self.classes} for s in SPLITS}
        for s in self.samples:
            out[s.split][s.label] += 1
        return out

    def label_index(self, label: str) -> int:
        return self.classes.index(label)


@dataclass
class LoadedSplit:
    """Preprocessed images of one split: ``x`` N x S x S x 3 uint8, ``y`` class indices."""

    x: np.ndarray
    y: np.ndarray
    paths: list[str]
    skipped: list[tuple[str, str]]  # (path, reason) of images that could not be read
    cache_file: Path | None = None
    from_cache: bool = False


def stratified_split(
    labels: Sequence[str],
    seed: int,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
) -> list[str]:
    """Assign train/val/test per class (rounded per class), reproducibly from ``seed``.

    Classes with at least 3 images get at least one val and one test image.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise EdgecellsError("split fractions must be in [0, 1) and sum to less than 1")
    rng = np.random.default_rng(seed)
    out = ["train"] * len(labels)
    for cls in sorted(set(labels)):
        idx = np.array([i for i, lab in enumerate(labels) if lab == cls])
        rng.shuffle(idx)
        n = idx.size
        n_test = int(round(n * test_fraction))
        n_val = int(round(n * val_fraction))
        if n >= 3:
            n_test = max(n_test, 1 if test_fraction > 0 else 0)
            n_val = max(n_val, 1 if val_fraction > 0 else 0)
        for i in idx[:n_test]:
            out[i] = "test"
        for i in idx[n_test : n_test + n_val]:
            out[i] = "val"
    return out


def _images_in(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


def _class_folders(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _read_splits_csv(root: Path) -> tuple[list[Sample], list[tuple[str, str]]]:
    f = root / SPLITS_FILE
    samples: list[Sample] = []
    missing: list[tuple[str, str]] = []
    try:
        with f.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            cols = set(reader.fieldnames or ())
            # no label column: the label is the class folder (path's first part; LISC)
            need = {"path", "label", "split"} if "label" in cols else {"path", "split"}
            if not need <= cols:
                raise EdgecellsError(
                    f"{f}: missing column(s) {', '.join(sorted(need - cols))} "
                    "(need path,label,split)"
                )
            for line, row in enumerate(reader, start=2):
                split = (row["split"] or "").strip()
                if split not in SPLITS:
                    raise EdgecellsError(f"{f}: line {line}: unknown split {split!r}")
                rel = (row["path"] or "").strip()
                label = (row["label"] or "").strip() if "label" in cols else Path(rel).parts[0]
                if not label or not rel:
                    raise EdgecellsError(f"{f}: line {line}: empty path or label")
                p = root / rel
                if not p.is_file():
                    missing.append((rel, "listed in splits.csv but no such file"))
                    continue
                samples.append(Sample(p, label, split))
    except UnicodeDecodeError:
        raise EdgecellsError(f"{f}: not a UTF-8 CSV file") from None
    except csv.Error as exc:
        raise EdgecellsError(f"{f}: malformed CSV ({exc})") from None
    return samples, missing


def load_dataset(
    root: str | os.PathLike[str],
    mapping: ClassMapping | None = None,
    seed: int = 0,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
) -> CellDataset:
    """Read a data folder's layout. Classes follow ``mapping`` order when given (every
    label must be one of its classes), else the sorted labels found."""
    r = Path(root)
    if not r.is_dir():
        raise EdgecellsError(f"{r}: no such data folder")
    missing: list[tuple[str, str]] = []
    if (r / SPLITS_FILE).is_file():
        samples, missing = _read_splits_csv(r)
        layout = "splits.csv"
    elif any((r / s).is_dir() for s in SPLITS) and (r / "train").is_dir():
        samples = []
        for split in SPLITS:
            if (r / split).is_dir():
                for d in _class_folders(r / split):
                    samples += [Sample(p, d.name, split) for p in _images_in(d)]
        layout = "split-folders"
    else:
        found: list[tuple[Path, str]] = []
        for d in _class_folders(r):
            found += [(p, d.name) for p in _images_in(d)]
        splits = stratified_split([lab for _, lab in found], seed, val_fraction, test_fraction)
        samples = [Sample(p, lab, s) for (p, lab), s in zip(found, splits)]
        layout = "class-folders"
    if not samples:
        raise EdgecellsError(
            f"{r}: no images found (expected {SPLITS_FILE} or one folder of images per class)"
        )
    labels = sorted({s.label for s in samples})
    if mapping is not None:
        unknown = [lab for lab in labels if lab not in mapping.classes]
        if unknown:
            raise EdgecellsError(
                f"{r}: label(s) {', '.join(unknown)} not in mapping {mapping.name} "
                f"({', '.join(mapping.classes)}); pass a mapping JSON that lists them"
            )
        classes = list(mapping.classes)
    else:
        classes = labels
    return CellDataset(r, classes, samples, layout, missing)


def _file_key(samples: Sequence[Sample]) -> list[list[object]]:
    out: list[list[object]] = []
    for s in samples:
        try:
            st = s.path.stat()
            out.append([str(s.path), s.label, st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([str(s.path), s.label, -1, -1])
    return out


def cache_key(samples: Sequence[Sample], classes: Sequence[str], extra: dict[str, object]) -> str:
    """SHA-256 over the files (path, size, mtime), class order and preprocessing inputs."""
    payload = {
        "format": CACHE_FORMAT,
        "preprocess": PREPROCESS_VERSION,
        "classes": list(classes),
        "files": _file_key(samples),
        **extra,
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def default_cache_dir() -> Path:
    return user_cache_dir()


def _try_read(path: Path) -> tuple[np.ndarray | None, str | None]:
    try:
        return read_image(path), None
    except EdgecellsError as exc:
        msg = str(exc)
        prefix = f"{path}: "
        return None, msg[len(prefix) :] if msg.startswith(prefix) else msg


def _workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def iter_images(
    samples: Sequence[Sample], skipped: list[tuple[str, str]], progress: Progress | None = None
) -> Iterator[tuple[Sample, np.ndarray]]:
    """Read images in order (threads), appending unreadable ones to ``skipped``."""
    with ThreadPoolExecutor(_workers()) as pool:
        for s, (img, err) in zip(samples, pool.map(lambda s: _try_read(s.path), samples)):
            if progress:
                progress(1)
            if img is None:
                skipped.append((str(s.path), err or "unreadable"))
                continue
            yield s, img


def fit_stain_target(
    dataset: CellDataset,
    split: str = "train",
    cache_dir: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
) -> tuple[StainTarget, list[tuple[str, str]]]:
    """Fit a stain target on every readable image of ``split`` (cached by file hash)."""
    samples = dataset.split(split)
    if not samples:
        raise EdgecellsError(f"{dataset.root}: split {split!r} is empty, cannot fit a stain target")
    cdir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = cache_key(samples, dataset.classes, {"kind": "stain-target", "split": split})
    cfile = cdir / f"target-{key[:24]}.json"
    skipped: list[tuple[str, str]] = []
    if cfile.is_file():
        try:
            d = json.loads(cfile.read_text(encoding="utf-8"))
            if progress:
                progress(len(samples))
            return StainTarget.from_dict(d["target"]), [tuple(x) for x in d["skipped"]]
        except (OSError, ValueError, KeyError, TypeError, EdgecellsError):
            pass  # a broken cache entry is rebuilt
    images = (img for _, img in iter_images(samples, skipped, progress))
    target = StainTarget.fit(images)
    write_json_atomic(cfile, {"target": target.to_dict(), "skipped": skipped}, indent=None)
    return target, skipped


def load_split(
    dataset: CellDataset,
    split: str,
    size: int,
    target: StainTarget | None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    use_cache: bool = True,
    model_pixel_um: float | None = None,
    pixel_size_um: float | None = None,
) -> LoadedSplit:
    """Read, cut at the model's field, resample and stain-normalize (``target``; None = no
    normalization) one split, with :func:`~edgecells.edge.preprocess.prepare_crop`.

    ``model_pixel_um``: the model's input pixel size (µm/px; None = legacy: the whole
    image's centre square); ``pixel_size_um``: the images' (default: the data set's
    measured value, :mod:`.pixel_sizes`). Results are cached as ``.npz`` under
    ``cache_dir`` keyed by a hash of the files, the class order, the size, the pixel
    sizes, the target and the preprocessing version.
    """
    from edgecells.calibration.pixel_sizes import pixel_size_for

    samples = dataset.split(split)
    src_px = None
    if model_pixel_um is not None:
        src_px = pixel_size_um if pixel_size_um is not None else pixel_size_for(dataset.root)
        if src_px is None:
            raise EdgecellsError(
                f"{dataset.root}: unknown pixel size of these images; pass --pixel-size (µm/px)"
            )
    extra = {
        "kind": "split",
        "size": int(size),
        "target": target.to_dict() if target is not None else None,
        "model_pixel_um": model_pixel_um,
        "pixel_size_um": src_px,
    }
    key = cache_key(samples, dataset.classes, extra)
    cdir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cfile = cdir / f"{split}-{size}-{key[:24]}.npz"
    if use_cache and cfile.is_file():
        try:
            with np.load(cfile, allow_pickle=False) as z:
                loaded = LoadedSplit(
                    x=z["x"],
                    y=z["y"],
                    paths=[str(p) for p in z["paths"]],
                    skipped=[tuple(x) for x in json.loads(str(z["skipped"]))],
                    cache_file=cfile,
                    from_cache=True,
                )
            if progress:
                progress(len(samples))
            return loaded
        except (OSError, ValueError, KeyError):
            pass  # a broken cache entry is rebuilt
    normalizer = ReinhardNormalizer(target) if target is not None else None
    skipped: list[tuple[str, str]] = []
    x = np.empty((len(samples), size, size, 3), dtype=np.uint8)
    y = np.empty(len(samples), dtype=np.int64)
    paths: list[str] = []

    def prep(s: Sample) -> tuple[np.ndarray | None, str | None]:
        img, err = _try_read(s.path)
        if img is None:
            return None, err
        return prepare_crop(img, normalizer, size, src_px, model_pixel_um), None

    n = 0
    with ThreadPoolExecutor(_workers()) as pool:
        for s, (arr, err) in zip(samples, pool.map(prep, samples)):
            if progress:
                progress(1)
            if arr is None:
                skipped.append((str(s.path), err or "unreadable"))
                continue
            x[n] = arr
            y[n] = dataset.label_index(s.label)
            paths.append(str(s.path))
            n += 1
    loaded = LoadedSplit(x[:n].copy(), y[:n].copy(), paths, skipped, cfile, False)
    if use_cache:
        atomic_save(  # a unique temporary name: two commands may fill the cache at once
            cfile,
            lambda f: np.savez(
                f,
                x=loaded.x,
                y=loaded.y,
                paths=np.array(paths, dtype=str),
                skipped=np.array(json.dumps(skipped)),
            ),
            fsync=False,
        )
    return loaded
