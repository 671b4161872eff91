"""Stain, colour, optics and scale augmentation **before** stain normalization (numpy).

The device normalizes every crop (Reinhard, the crop's own statistics) after cutting and
resampling it; so must training. Colour augmentation is therefore applied to the
resampled crop *before* :func:`edgecells.edge.preprocess.normalize_small`, offline:
:func:`augmented_variants` makes ``k`` variants of each training cell (cached), each

1. cut at the model's field x a random scale factor (scale jitter, ``scale``) with a small
   random shift, resampled to the input size (the device's cut-and-resample);
2. recoloured: HED stain jitter (Ruifrok-Johnston haematoxylin/eosin/DAB optical
   densities scaled and shifted), white balance (per-channel gains), a tint of the
   bright background (yellow to blue), gamma, brightness/contrast, saturation;
3. degraded like another microscope's optics: Gaussian defocus blur, sensor noise, JPEG;
4. stain-normalized exactly as on the device.

Geometry that commutes with per-pixel normalization (flips, rotations, small shifts) stays
in the tf.data pipeline (training/train.py).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from edgecells.calibration.cellsets import CellRecord, records_key
from edgecells.calibration.datasets import default_cache_dir
from edgecells.edge.errors import EdgecellsError
from edgecells.edge.fileio import atomic_save
from edgecells.edge.imageio import read_image
from edgecells.edge.preprocess import cut_square, field_side_px, normalize_small, square_resize
from edgecells.edge.stain import ReinhardNormalizer, StainTarget

# Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB) in RGB optical density
_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_HED = _HED / np.linalg.norm(_HED, axis=1, keepdims=True)
_HED_INV = np.linalg.inv(_HED)


@dataclass(frozen=True)
class ColourAugment:
    """Ranges of the pre-normalization augmentation (uniform in [-x, x] or [1-x, 1+x])."""

    enabled: bool = True
    scale: float = 0.15  # field scale jitter
    shift: float = 0.05  # centre shift, fraction of the field
    hed_scale: float = 0.25  # per-stain optical-density factor
    hed_shift: float = 0.04  # per-stain optical-density offset
    wb_gain: float = 0.25  # per-channel white-balance gain
    tint: float = 30.0  # background tint amplitude (0..255), yellow <-> blue
    gamma: float = 0.3  # gamma in [1/(1+x), 1+x]
    brightness: float = 0.1
    contrast: float = 0.2
    saturation: float = 0.4
    blur_p: float = 0.3  # probability of a defocus blur, sigma up to blur_sigma px
    blur_sigma: float = 1.2
    noise_p: float = 0.3
    noise_sigma: float = 6.0
    jpeg_p: float = 0.3
    jpeg_min_quality: int = 40

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def parse_overrides(items: Sequence[str], base: ColourAugment | None = None) -> ColourAugment:
    """``ColourAugment`` with ``KEY=VALUE`` overrides (``edgecells train --augment``): each
    key a numeric field of :class:`ColourAugment`, each value a finite number >= 0 (an
    integer for integer fields; probabilities ``*_p`` at most 1)."""
    cfg = base or ColourAugment()
    fields = {f.name: f for f in dataclasses.fields(ColourAugment) if f.name != "enabled"}
    changes: dict[str, float | int] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise EdgecellsError(
                f"--augment {item!r}: expected KEY=VALUE with KEY one of {', '.join(fields)}"
            )
        try:
            val = float(raw)
        except ValueError:
            raise EdgecellsError(f"--augment {item!r}: {raw!r} is not a number") from None
        if not math.isfinite(val) or val < 0 or (key.endswith("_p") and val > 1):
            raise EdgecellsError(
                f"--augment {item!r}: must be a finite number >= 0"
                + (" and <= 1 (a probability)" if key.endswith("_p") else "")
            )
        if isinstance(getattr(cfg, key), int):
            if val != int(val):
                raise EdgecellsError(f"--augment {item!r}: {key} takes an integer")
            changes[key] = int(val)
        else:
            changes[key] = val
    return dataclasses.replace(cfg, **changes)  # type: ignore[arg-type]


def _u(rng: np.random.Generator, x: float) -> float:
    return float(rng.uniform(-x, x))


def recolour(img: np.ndarray, cfg: ColourAugment, rng: np.random.Generator) -> np.ndarray:
    """Stain, colour and optics augmentation of an RGB uint8 crop (steps 2-3)."""
    x = img.astype(np.float32)
    # HED jitter in optical density
    od = -np.log((x + 1.0) / 256.0)
    hed = od.reshape(-1, 3) @ _HED_INV
    a = 1.0 + rng.uniform(-cfg.hed_scale, cfg.hed_scale, 3)
    b = rng.uniform(-cfg.hed_shift, cfg.hed_shift, 3)
    od = (hed * a + b) @ _HED
    x = (256.0 * np.exp(-od) - 1.0).reshape(img.shape)
    # white balance
    x = x * (1.0 + rng.uniform(-cfg.wb_gain, cfg.wb_gain, 3)).astype(np.float32)
    # background tint: bright pixels shift towards yellow (+R+G-B) or blue (-R-G+B)
    if cfg.tint > 0:
        lum = x.mean(axis=2, keepdims=True)
        w = np.clip((lum - 150.0) / 80.0, 0.0, 1.0)
        t = _u(rng, cfg.tint)
        x = x + w * np.array([t, 0.6 * t, -t], np.float32)
    # gamma, contrast, brightness, saturation
    x = np.clip(x, 0, 255)
    g = float(np.exp(rng.uniform(-np.log1p(cfg.gamma), np.log1p(cfg.gamma))))
    x = 255.0 * (x / 255.0) ** g
    m = x.mean()
    x = m + (x - m) * (1.0 + _u(rng, cfg.contrast)) + _u(rng, cfg.brightness) * 255.0
    gray = x.mean(axis=2, keepdims=True)
    x = gray + (x - gray) * (1.0 + _u(rng, cfg.saturation))
    # optics
    if rng.random() < cfg.blur_p:
        s = float(rng.uniform(0.3, cfg.blur_sigma))
        x = cv2.GaussianBlur(x, (0, 0), s)
    if rng.random() < cfg.noise_p:
        x = x + rng.normal(0, rng.uniform(1.0, cfg.noise_sigma), x.shape).astype(np.float32)
    out = np.clip(x + 0.5, 0, 255).astype(np.uint8)
    if rng.random() < cfg.jpeg_p:
        q = int(rng.integers(cfg.jpeg_min_quality, 96))
        ok, enc = cv2.imencode(".jpg", out[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, q])
        if ok:
            out = cv2.imdecode(enc, cv2.IMREAD_COLOR)[..., ::-1]
    return np.ascontiguousarray(out)


def augment_cell(
    img: np.ndarray,
    rec: CellRecord,
    size: int,
    model_pixel_um: float,
    cfg: ColourAugment,
    rng: np.random.Generator,
) -> np.ndarray:
    """Steps 1-3 (no normalization): a jittered cut, resampled, recoloured."""
    h, w = img.shape[:2]
    cx = w / 2 if rec.cx is None else rec.cx
    cy = h / 2 if rec.cy is None else rec.cy
    side_um = size * model_pixel_um * (1.0 + _u(rng, cfg.scale))
    side = field_side_px(side_um, rec.pixel_size_um)
    cx += _u(rng, cfg.shift) * side
    cy += _u(rng, cfg.shift) * side
    small = square_resize(cut_square(img, cx, cy, side), size)
    return recolour(small, cfg, rng) if cfg.enabled else small


def augmented_variants(
    records: Sequence[CellRecord],
    k: int,
    size: int,
    model_pixel_um: float,
    target: StainTarget | None,
    cfg: ColourAugment,
    seed: int,
    cache_dir: str | os.PathLike[str] | None = None,
) -> np.ndarray:
    """``N x k x size x size x 3`` uint8: ``k`` augmented, normalized variants per record
    (deterministic per seed; cached as ``.npz``)."""
    key = records_key(
        records,
        {
            "kind": "augmented",
            "k": k,
            "size": size,
            "px": model_pixel_um,
            "seed": seed,
            "aug": cfg.to_dict(),
            "target": target.to_dict() if target else None,
        },
    )
    cfile = Path(cache_dir or default_cache_dir()) / f"aug-{size}-{key[:24]}.npy"
    if cfile.is_file():
        try:
            return np.load(cfile)
        except (OSError, ValueError):
            pass
    norm = ReinhardNormalizer(target) if target is not None else None
    out = np.empty((len(records), k, size, size, 3), np.uint8)

    def one(i: int) -> None:
        rng = np.random.default_rng([seed, i])
        img = read_image(records[i].path)
        for j in range(k):
            small = augment_cell(img, records[i], size, model_pixel_um, cfg, rng)
            out[i, j] = normalize_small(small, norm)

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(one, range(len(records))))
    atomic_save(cfile, lambda f: np.save(f, out), fsync=False)
    return out
