"""Representative calibration sets for int8 quantization.

A calibration set is drawn from the **training split only**, stratified by class (each
class gets an equal share, so rare classes are not drowned; a class with too few images
gives all it has and the rest is shared among the others), and every image goes through
exactly the device's preprocessing: :func:`edgecells.edge.preprocess.prepare_crop` with
the fixed-point Reinhard normalizer and the stain target. The int8 ranges are therefore
calibrated on the pixels the device will feed the model, bit for bit.

Saved as one ``.npz`` (no pickle: ``x`` uint8 N x S x S x 3, ``y`` int64, ``classes``,
``manifest`` as a JSON string) plus the same manifest as a ``.json`` next to it: source
files with their SHA-256, the stain target, preprocessing, seed, counts.

:func:`coverage_check` compares the set's per-channel statistics with the validation
split's and returns warnings when the calibration set does not cover the inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edgecells.edge.errors import EdgecellsError

FORMAT = "edgecells.calibset/1"
# Toolchain recommendations: TFLite 100-500 representative images, NNCF ~300.
DEFAULT_TOTAL = 300
DEFAULT_SEED = 0
# Coverage check: warn when a channel's calibration mean is further than this many
# validation standard deviations from the validation mean ...
COVERAGE_MEAN_SIGMAS = 0.25
# ... or when the calibration set's [low, high] percentiles miss more than this many
# grey levels of the validation set's.
COVERAGE_PERCENTILES = (1.0, 99.0)
COVERAGE_RANGE_TOLERANCE = 8.0
COVERAGE_MAX_VAL_IMAGES = 500

Progress = Callable[[int], None]


@dataclass
class CalibSet:
    """Preprocessed calibration images (``x``: uint8 N x S x S x 3) and their manifest."""

    x: np.ndarray
    y: np.ndarray
    classes: list[str]
    manifest: dict[str, Any]
    path: Path | None = None
    sha256: str | None = None

    @property
    def size(self) -> int:
        return int(self.x.shape[1])

    def counts(self) -> dict[str, int]:
        return {c: int(np.sum(self.y == i)) for i, c in enumerate(self.classes)}


@dataclass
class CoverageReport:
    """Per-channel statistics (R, G, B) of the calibration and validation images."""

    calib_mean: list[float]
    calib_std: list[float]
    val_mean: list[float]
    val_std: list[float]
    calib_range: list[list[float]]
    val_range: list[list[float]]
    n_val: int
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.warnings

    def to_dict(self) -> dict[str, Any]:
        return {
            "calib_mean": self.calib_mean,
            "calib_std": self.calib_std,
            "val_mean": self.val_mean,
            "val_std": self.val_std,
            "calib_range": self.calib_range,
            "val_range": self.val_range,
            "percentiles": list(COVERAGE_PERCENTILES),
            "n_val": self.n_val,
            "ok": self.ok,
            "warnings": self.warnings,
        }


def allocate(available: dict[str, int], total: int) -> dict[str, int]:
    """Share ``total`` images equally among classes (water-filling: a class with fewer
    images than its share gives all it has, the rest goes to the others)."""
    if total <= 0:
        raise EdgecellsError("calibration set size must be positive")
    out = {c: 0 for c in available}
    left = dict(available)
    remaining = min(total, sum(available.values()))
    while remaining > 0:
        open_ = sorted(c for c in left if left[c] > 0)
        share, extra = divmod(remaining, len(open_))
        for i, c in enumerate(open_):
            take = min(left[c], share + (1 if i < extra else 0))
            out[c] += take
            left[c] -= take
            remaining -= take
    return out


def _sha256(path: Path) -> str:
    from edgecells.edge.bundle import sha256_file

    return sha256_file(path)


def _source_px(
    data: str | os.PathLike[str], model_pixel_um: float | None, pixel_size_um: float | None
) -> float | None:
    from edgecells.calibration.pixel_sizes import pixel_size_for

    if model_pixel_um is None:
        return None
    px = pixel_size_um if pixel_size_um is not None else pixel_size_for(data)
    if px is None:
        raise EdgecellsError(
            f"{data}: unknown pixel size of these images; pass --data-pixel-size (µm/px)"
        )
    return float(px)


def build_calibset(
    data: str | os.PathLike[str],
    target: Any,
    size: int,
    per_class: int | None = None,
    total: int | None = None,
    seed: int = DEFAULT_SEED,
    mapping: Any = None,
    progress: Progress | None = None,
    model_pixel_um: float | None = None,
    pixel_size_um: float | None = None,
) -> CalibSet:
    """Draw and preprocess a stratified calibration set from ``data``'s training split.

    ``target``: a StainTarget (None = no stain normalization). ``per_class`` images per
    class, or ``total`` shared equally (default :data:`DEFAULT_TOTAL`). ``model_pixel_um``:
    the model's input pixel size (cut at its field and resampled from ``pixel_size_um``,
    default the data set's measured value); None = the legacy centre square.
    """
    from edgecells.calibration.datasets import load_dataset
    from edgecells.edge.imageio import read_image
    from edgecells.edge.preprocess import PREPROCESS_VERSION, prepare_crop
    from edgecells.edge.stain import METHOD, ReinhardNormalizer

    if per_class is not None and total is not None:
        raise EdgecellsError("give --per-class or --total, not both")
    ds = load_dataset(data, mapping=mapping, seed=seed)
    src_px = _source_px(data, model_pixel_um, pixel_size_um)
    train = ds.split("train")
    by_class: dict[str, list[Any]] = {c: [] for c in ds.classes}
    for s in train:
        by_class[s.label].append(s)
    empty = [c for c, v in by_class.items() if not v]
    if empty:
        raise EdgecellsError(
            f"{data}: class(es) {', '.join(empty)} have no training images; a calibration "
            "set needs every class"
        )
    avail = {c: len(v) for c, v in by_class.items()}
    if per_class is not None:
        if per_class <= 0:
            raise EdgecellsError("--per-class must be positive")
        want = {c: min(per_class, n) for c, n in avail.items()}
    else:
        want = allocate(avail, total if total is not None else DEFAULT_TOTAL)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in ds.classes:
        items = sorted(by_class[c], key=lambda s: str(s.path))
        idx = rng.choice(len(items), size=want[c], replace=False)
        chosen += [items[i] for i in sorted(idx)]
    norm = ReinhardNormalizer(target) if target is not None else None
    x = np.empty((len(chosen), size, size, 3), dtype=np.uint8)
    y = np.empty(len(chosen), dtype=np.int64)
    sources = []
    root = Path(data)
    for i, s in enumerate(chosen):
        x[i] = prepare_crop(read_image(s.path), norm, size, src_px, model_pixel_um)
        y[i] = ds.label_index(s.label)
        try:
            rel = s.path.relative_to(root).as_posix()
        except ValueError:
            rel = str(s.path)
        sources.append({"path": rel, "label": s.label, "sha256": _sha256(s.path)})
        if progress:
            progress(1)
    manifest = {
        "format": FORMAT,
        "data": str(data),
        "layout": ds.layout,
        "split": "train",
        "seed": int(seed),
        "classes": list(ds.classes),
        "counts": {c: int(want[c]) for c in ds.classes},
        "available": avail,
        "sampling": "per-class" if per_class is not None else "equal-share",
        "stain_target": target.to_dict() if target is not None else None,
        "preprocessing": {
            "function": PREPROCESS_VERSION,
            "input_size": int(size),
            "value_range": [0, 255],
            "stain_normalization": METHOD if target is not None else "none",
            "crop": "center square, INTER_AREA down / INTER_LINEAR up"
            if model_pixel_um is None
            else "centre field of input_size x pixel_size_um um, resampled, then normalized",
            **(
                {"pixel_size_um": float(model_pixel_um), "source_pixel_size_um": src_px}
                if model_pixel_um is not None
                else {}
            ),
        },
        "sources": sources,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    cs = CalibSet(x=x, y=y, classes=list(ds.classes), manifest=manifest)
    cs.sha256 = hashlib.sha256(x.tobytes()).hexdigest()  # the file's hash once saved
    return cs


def save_calibset(cs: CalibSet, path: str | os.PathLike[str]) -> Path:
    """Write ``path`` (.npz, no pickle) and ``path`` with ``.json`` (the manifest)."""
    p = Path(path)
    if p.suffix != ".npz":
        p = p.with_suffix(".npz")
    p.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(cs.manifest, indent=2)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".npz", dir=p.parent)
    os.close(fd)
    try:
        np.savez_compressed(
            tmp,
            x=cs.x,
            y=cs.y,
            classes=np.array(cs.classes, dtype=str),
            manifest=np.array(text),
        )
        os.chmod(tmp, 0o644)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    p.with_suffix(".json").write_text(text + "\n", encoding="utf-8")
    cs.path = p
    cs.sha256 = _sha256(p)
    return p


def load_calibset(path: str | os.PathLike[str]) -> CalibSet:
    """Read a calibration .npz (pickle disabled); EdgecellsError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise EdgecellsError(f"{p}: no such calibration set")
    try:
        with np.load(p, allow_pickle=False) as z:
            x, y = z["x"], z["y"]
            classes = [str(c) for c in z["classes"]]
            manifest = json.loads(str(z["manifest"]))
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise EdgecellsError(f"{p}: not an edgecells calibration set ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise EdgecellsError(f"{p}: unsupported calibration set format {manifest.get('format')!r}")
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] != 3 or x.shape[1] != x.shape[2]:
        raise EdgecellsError(f"{p}: images must be uint8 N x S x S x 3, got {x.dtype} {x.shape}")
    if y.shape != (x.shape[0],) or x.shape[0] == 0:
        raise EdgecellsError(f"{p}: labels do not match the images")
    return CalibSet(x=x, y=y, classes=classes, manifest=manifest, path=p, sha256=_sha256(p))


def channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-channel mean, std and (low, high) percentiles of uint8 N x S x S x 3 images."""
    flat = x.reshape(-1, 3).astype(np.float64)
    lo, hi = COVERAGE_PERCENTILES
    rng = np.percentile(flat, [lo, hi], axis=0).T
    return flat.mean(axis=0), flat.std(axis=0), rng


def coverage_check(cs: CalibSet, val_x: np.ndarray) -> CoverageReport:
    """Compare per-channel statistics of the calibration set and validation images."""
    cm, cstd, cr = channel_stats(cs.x)
    vm, vstd, vr = channel_stats(val_x)
    warnings = []
    for i, ch in enumerate("RGB"):
        if abs(cm[i] - vm[i]) > COVERAGE_MEAN_SIGMAS * max(vstd[i], 1.0):
            warnings.append(
                f"channel {ch}: calibration mean {cm[i]:.1f} vs validation {vm[i]:.1f} "
                f"(more than {COVERAGE_MEAN_SIGMAS} validation std apart)"
            )
        if cr[i, 0] - vr[i, 0] > COVERAGE_RANGE_TOLERANCE or (
            vr[i, 1] - cr[i, 1] > COVERAGE_RANGE_TOLERANCE
        ):
            warnings.append(
                f"channel {ch}: calibration range {cr[i, 0]:.0f}..{cr[i, 1]:.0f} does not cover "
                f"validation {vr[i, 0]:.0f}..{vr[i, 1]:.0f}"
            )
    return CoverageReport(
        calib_mean=[round(float(v), 3) for v in cm],
        calib_std=[round(float(v), 3) for v in cstd],
        val_mean=[round(float(v), 3) for v in vm],
        val_std=[round(float(v), 3) for v in vstd],
        calib_range=[[round(float(a), 1), round(float(b), 1)] for a, b in cr],
        val_range=[[round(float(a), 1), round(float(b), 1)] for a, b in vr],
        n_val=int(val_x.shape[0]),
        warnings=warnings,
    )


def validation_images(
    data: str | os.PathLike[str],
    target: Any,
    size: int,
    seed: int = DEFAULT_SEED,
    mapping: Any = None,
    limit: int = COVERAGE_MAX_VAL_IMAGES,
    model_pixel_um: float | None = None,
    pixel_size_um: float | None = None,
) -> np.ndarray:
    """Up to ``limit`` validation-split images, preprocessed like the calibration set."""
    from edgecells.calibration.datasets import load_dataset
    from edgecells.edge.imageio import read_image
    from edgecells.edge.preprocess import prepare_crop
    from edgecells.edge.stain import ReinhardNormalizer

    ds = load_dataset(data, mapping=mapping, seed=seed)
    val = sorted(ds.split("val"), key=lambda s: str(s.path))
    if not val:
        raise EdgecellsError(f"{data}: the validation split is empty; no coverage check")
    rng = np.random.default_rng(seed + 1)
    if len(val) > limit:
        val = [val[i] for i in sorted(rng.choice(len(val), limit, replace=False))]
    norm = ReinhardNormalizer(target) if target is not None else None
    src_px = _source_px(data, model_pixel_um, pixel_size_um)
    return np.stack(
        [prepare_crop(read_image(s.path), norm, size, src_px, model_pixel_um) for s in val]
    )


def synthetic_calibset(
    size: int,
    n: int,
    seed: int = DEFAULT_SEED,
    images: Sequence[np.ndarray] | None = None,
    target: Any = None,
) -> CalibSet:
    """A calibration set without labelled data (zoo models, smoke tests).

    With ``images`` (e.g. the bundled sample frames or fixture crops): random square
    crops of them, flipped/rotated, stain-normalized with ``target`` and resized like
    the device does. Without: cell-like noise — a bright background with darker
    smooth blobs (a 'nucleus' on a 'cytoplasm'), per-pixel noise, values 0..255.
    """
    from edgecells.edge.preprocess import prepare_crop
    from edgecells.edge.stain import ReinhardNormalizer

    rng = np.random.default_rng(seed)
    x = np.empty((n, size, size, 3), dtype=np.uint8)
    norm = ReinhardNormalizer(target) if target is not None else None
    if images:
        for i in range(n):
            img = images[int(rng.integers(len(images)))]
            h, w = img.shape[:2]
            side = int(rng.integers(max(8, min(h, w) // 4), min(h, w) + 1))
            y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            crop = np.rot90(img[y0 : y0 + side, x0 : x0 + side], int(rng.integers(4)))
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            x[i] = prepare_crop(np.ascontiguousarray(crop), norm, size)
        kind = "crops of sample images, augmented"
    else:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
        for i in range(n):
            bg = rng.uniform(180, 235, 3)
            img = np.broadcast_to(bg, (size, size, 3)).copy()
            cy, cx = rng.uniform(0.35, 0.65, 2)
            r_cell, r_nuc = rng.uniform(0.25, 0.45), rng.uniform(0.1, 0.25)
            d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
            cyto, nuc = rng.uniform(120, 210, 3), rng.uniform(40, 130, 3)
            img[d < r_cell] = cyto
            img[d < r_nuc] = nuc
            img += rng.normal(0, 8, img.shape)
            x[i] = np.clip(img, 0, 255).astype(np.uint8)
        kind = "synthetic cell-like noise"
    manifest = {
        "format": FORMAT,
        "data": None,
        "split": None,
        "synthetic": kind,
        "seed": int(seed),
        "classes": [],
        "counts": {},
        "stain_target": target.to_dict() if target is not None else None,
        "preprocessing": {"input_size": int(size), "value_range": [0, 255]},
        "sources": [],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    cs = CalibSet(x=x, y=np.full(n, -1, dtype=np.int64), classes=[], manifest=manifest)
    cs.sha256 = hashlib.sha256(x.tobytes()).hexdigest()
    return cs
