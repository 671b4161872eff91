"""Integer-only Reinhard stain normalization: ``fit`` a target, ``transform`` images.

Reinhard et al. (2001) match the per-channel mean and standard deviation of an image
to a target's in a perceptual colour space. edgecells does the transfer in **CIELAB**
(D65 white of the sRGB primaries), as StainTools and torchstain do, rather than in
Ruderman's lαβ of the original paper: CIELAB is the space users of those libraries
know, its statistics are comparable across tools, and its non-linear part is a single
cube-root function that a lookup table computes exactly in fixed point (lαβ needs a
logarithm and an exponential per channel, which cost two larger tables for the same
precision). Mutar et al. (2025) found Reinhard transfer best for blood-cell
classification.

Fixed point, bit-exact
    The per-pixel path is integer arithmetic only (:mod:`.stain_kernels`), with
    committed lookup tables (:mod:`.reinhard_tables`). Per-image statistics are int64
    sums and the transfer coefficients are computed from them with exact Python
    integers (``math.isqrt``), so the output does not depend on the platform: the golden
    vectors in the tests pin it for numba and numpy on x86_64, and
    ``benchmarks/arm64_golden.sh`` shows the same bits on emulated aarch64 (see
    benchmarks/RESULTS.md).

Stained pixels only (the mask)
    Smear frames are mostly glass. Statistics come from stained pixels, defined on L*
    (lightness): the glass level is estimated as the ``glass_percentile`` (99th) of
    L* over the image; pixels darker than ``min(max_threshold_L, glass - glass_margin_L)``
    and brighter than ``dark_L`` are stained (thresholds rounded down to the 0.25 L*
    histogram bins). Glass keeps its input value exactly, near-black pixels (a field
    stop's dark corners) too, and a band of ``blend_band_L`` just under the threshold
    blends transferred and input values so cell edges show no seam.

Images that cannot be normalized
    All glass, all black, saturated or zero-variance images are returned unchanged,
    with the reason, by :meth:`ReinhardNormalizer.normalize`. Nothing divides by zero.

Normalizing only what is classified
    :meth:`ReinhardNormalizer.frame_stats` computes a frame's statistics once from a
    subsample (every ``stats_stride``-th pixel in both directions, 1/16 of the pixels
    by default), then :meth:`ReinhardNormalizer.transform_crop` transforms only the
    cell crops with them. A crop transformed this way equals the same region of the
    whole frame transformed with the same statistics.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgecells.edge import stain_kernels as K
from edgecells.edge.errors import EdgecellsError
from edgecells.edge.fileio import atomic_write
from edgecells.edge.imageio import as_rgb8
from edgecells.edge.reinhard_tables import load_tables

TARGET_FORMAT = "edgecells.stain-target"
TARGET_VERSION = 1
METHOD = "reinhard-fixed-v1"
Q10 = 1024


@dataclass(frozen=True)
class MaskParams:
    """Which pixels are stained, and how the transfer is bounded. Units: L* (0-100)."""

    dark_L: float = 5.0  # below: black (field stop, dust), excluded and kept
    max_threshold_L: float = 90.0  # the stained threshold never exceeds this
    glass_percentile: float = 99.0  # L* percentile taken as the glass level
    glass_margin_L: float = 6.0  # stained = darker than glass by at least this
    blend_band_L: float = 3.0  # soft edge under the threshold
    min_stained_fraction: float = 0.002  # fewer stained pixels than this: "all glass"
    min_stained_pixels: int = 64
    max_dark_fraction: float = 0.95  # more black pixels than this: "too dark"
    max_clipped_fraction: float = 0.5  # stained pixels with a channel at 255
    min_std_L: float = 0.05  # any channel's std below this: "zero variance"
    min_scale: float = 0.25  # std ratio (target / source) is clamped to this range
    max_scale: float = 4.0
    stats_stride: int = 4  # frame_stats subsampling (crop path)

    @staticmethod
    def from_dict(d: Any, name: str = "stain target") -> MaskParams:
        """Known keys of ``d`` (unknown ones ignored), each type- and range-checked."""
        if not isinstance(d, dict):
            raise EdgecellsError(f"{name}: mask must be an object")
        known = {}
        for f, (lo, hi) in _MASK_RANGES.items():
            if f not in d:
                continue
            v = d[f]
            is_int = isinstance(MaskParams.__dataclass_fields__[f].default, int)
            ok = isinstance(v, int) if is_int else isinstance(v, (int, float))
            if isinstance(v, bool) or not ok or not math.isfinite(v) or not lo <= v <= hi:
                kind = "an integer" if is_int else "a number"
                raise EdgecellsError(f"{name}: mask.{f} must be {kind} in [{lo:g}, {hi:g}]")
            known[f] = v
        m = MaskParams(**known)
        if not 0 < m.min_scale <= m.max_scale:
            raise EdgecellsError(f"{name}: mask.min_scale must be > 0 and <= max_scale")
        return m


_MASK_RANGES: dict[str, tuple[float, float]] = {
    "dark_L": (0, 100),
    "max_threshold_L": (0, 100),
    "glass_percentile": (0, 100),
    "glass_margin_L": (0, 100),
    "blend_band_L": (0, 100),
    "min_stained_fraction": (0, 1),
    "min_stained_pixels": (0, 1 << 30),
    "max_dark_fraction": (0, 1),
    "max_clipped_fraction": (0, 1),
    "min_std_L": (0, 100),
    "min_scale": (0, 100),
    "max_scale": (0, 100),
    "stats_stride": (1, 64),
}
# CIELAB ranges in Q10: L* 0..100, a*/b* -128..127; a std is positive and below the range.
_MEAN_Q10 = ((0, 100 * Q10), (-128 * Q10, 128 * Q10), (-128 * Q10, 128 * Q10))
_STD_Q10_MAX = 128 * Q10


def _ints(v: Any, what: str, name: str) -> tuple[int, ...]:
    if not isinstance(v, list) or len(v) != 3:
        raise EdgecellsError(f"{name}: {what} must be a list of 3 integers")
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise EdgecellsError(f"{name}: {what} must be a list of 3 integers, got {v!r:.60}")
    return tuple(v)


def _q10(v: float) -> int:
    return int(math.floor(v * Q10 + 0.5))


def _bin_floor(q: int) -> int:
    """Round a Q10 lightness down to the histogram bin edge (0.25 L*)."""
    return (q >> K.BIN_SHIFT) << K.BIN_SHIFT


@dataclass(frozen=True)
class FrameStats:
    """Statistics of one image's stained pixels (Q10 CIELAB) and whether it can be used."""

    ok: bool
    reason: str | None
    n_pixels: int  # pixels looked at (after subsampling)
    n_stained: int
    mean_q10: tuple[int, int, int] = (0, 0, 0)
    std_q10: tuple[int, int, int] = (0, 0, 0)
    threshold_q10: int = 0
    stride: int = 1
    sums: tuple[int, ...] = field(default=(), repr=False)  # n, sL, sa, sb, sLL, saa, sbb

    @property
    def mean(self) -> tuple[float, float, float]:
        return tuple(v / Q10 for v in self.mean_q10)  # type: ignore[return-value]

    @property
    def std(self) -> tuple[float, float, float]:
        return tuple(v / Q10 for v in self.std_q10)  # type: ignore[return-value]

    @property
    def threshold_L(self) -> float:
        return self.threshold_q10 / Q10

    @property
    def stained_fraction(self) -> float:
        return self.n_stained / self.n_pixels if self.n_pixels else 0.0


@dataclass(frozen=True)
class NormalizeResult:
    """A normalized image, or the unchanged input with the reason it was not normalized."""

    image: np.ndarray
    applied: bool
    reason: str | None
    stats: FrameStats


def _moments(sums: Sequence[int]) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Exact integer mean and std (Q10, rounded) from n and per-channel sums/squares."""
    n = sums[0]
    means = []
    stds = []
    for c in range(3):
        s, ss = sums[1 + c], sums[4 + c]
        means.append((2 * s + n) // (2 * n))
        var_num = max(ss * n - s * s, 0)  # n^2 * variance (Q20)
        nn = n * n
        stds.append(math.isqrt((var_num + nn // 2) // nn))
    return tuple(means), tuple(stds)  # type: ignore[return-value]


def stats_from_hist(hist: np.ndarray, mask: MaskParams, stride: int) -> FrameStats:
    """Choose the stained threshold from an L* histogram and pool the stained bins."""
    counts = hist[:, 0]
    n_total = int(counts.sum())
    if n_total == 0:
        return FrameStats(False, "empty image", 0, 0, stride=stride)
    dark_bin = _q10(mask.dark_L) >> K.BIN_SHIFT
    n_dark = int(counts[:dark_bin].sum())
    if n_dark > mask.max_dark_fraction * n_total:
        return FrameStats(False, "too dark (black frame)", n_total, 0, stride=stride)
    bright = counts[dark_bin:]
    n_bright = int(bright.sum())
    _, all_std = _moments(tuple(int(v) for v in hist[dark_bin:, :7].sum(axis=0)))
    if max(all_std) < _q10(mask.min_std_L):  # one flat colour: no cells to measure
        all_mean = int(hist[dark_bin:, 1].sum()) // max(n_bright, 1)
        flat_reason = (
            "no stained pixels (all glass)"
            if all_mean >= _q10(mask.max_threshold_L)
            else "zero variance (flat image)"
        )
        return FrameStats(False, flat_reason, n_total, 0, stride=stride)
    # glass level: the bin holding the requested percentile of non-black pixels
    rank = int(math.ceil(mask.glass_percentile / 100.0 * n_bright))
    glass_bin = dark_bin + int(np.searchsorted(np.cumsum(bright), max(rank, 1)))
    glass_q10 = glass_bin << K.BIN_SHIFT
    threshold = _bin_floor(min(_q10(mask.max_threshold_L), glass_q10 - _q10(mask.glass_margin_L)))
    t_bin = threshold >> K.BIN_SHIFT
    sel = hist[dark_bin:t_bin] if t_bin > dark_bin else hist[:0]
    sums = tuple(int(v) for v in sel[:, :7].sum(axis=0)) if len(sel) else (0,) * 7
    n_st = sums[0]
    base = {"n_pixels": n_total, "n_stained": n_st, "threshold_q10": threshold, "stride": stride}
    need = max(
        mask.min_stained_pixels / max(stride * stride, 1), mask.min_stained_fraction * n_total
    )
    if n_st == 0 or n_st < need:
        return FrameStats(False, "no stained pixels (all glass)", **base)
    n_clip = int(sel[:, 7].sum())
    if n_clip > mask.max_clipped_fraction * n_st:
        return FrameStats(False, "saturated (over-exposed)", **base)
    mean, std = _moments(sums)
    if min(std) < _q10(mask.min_std_L):
        return FrameStats(False, "zero variance (flat or grayscale image)", **base)
    return FrameStats(True, None, mean_q10=mean, std_q10=std, sums=sums, **base)


@dataclass(frozen=True)
class StainTarget:
    """A stain target: the mean and std of stained pixels in CIELAB (Q10 integers)."""

    mean_q10: tuple[int, int, int]
    std_q10: tuple[int, int, int]
    n_images: int = 1
    n_pixels: int = 0
    mask: MaskParams = MaskParams()
    sources: tuple[str, ...] = ()

    @property
    def mean(self) -> tuple[float, float, float]:
        return tuple(v / Q10 for v in self.mean_q10)  # type: ignore[return-value]

    @property
    def std(self) -> tuple[float, float, float]:
        return tuple(v / Q10 for v in self.std_q10)  # type: ignore[return-value]

    @classmethod
    def fit(
        cls,
        images: np.ndarray | Iterable[np.ndarray],
        mask: MaskParams | None = None,
        names: Sequence[str] | None = None,
        kernel: str = "auto",
    ) -> StainTarget:
        """Fit from one image or many: statistics pooled over all their stained pixels.

        Images that cannot be normalized (all glass, black...) contribute nothing; if
        none has stained pixels the fit fails with an EdgecellsError.
        """
        mask = mask or MaskParams()
        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = [images]
        stats_fn, _ = _kernels(kernel)
        tables = load_tables()
        total = [0] * 7
        n_used = 0
        for i, img in enumerate(images):
            name = names[i] if names is not None and i < len(names) else f"image {i}"
            rgb = as_rgb8(img, name=name)
            st = stats_from_hist(stats_fn(rgb, 1, tables), mask, 1)
            if not st.ok:
                continue
            total = [a + b for a, b in zip(total, st.sums)]
            n_used += 1
        if n_used == 0:
            raise EdgecellsError("stain target: no image with stained pixels to fit on")
        mean, std = _moments(total)
        return cls(
            mean, std, n_images=n_used, n_pixels=total[0], mask=mask, sources=tuple(names or ())
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": TARGET_FORMAT,
            "version": TARGET_VERSION,
            "method": METHOD,
            "color_space": "CIELAB (D65, sRGB primaries)",
            "fixed_point": "Q10 (1024 per CIELAB unit)",
            "mean_q10": list(self.mean_q10),
            "std_q10": list(self.std_q10),
            "mean": [round(v, 4) for v in self.mean],
            "std": [round(v, 4) for v in self.std],
            "n_images": self.n_images,
            "n_pixels": self.n_pixels,
            "mask": asdict(self.mask),
            "sources": list(self.sources),
        }

    @classmethod
    def from_dict(cls, d: Any, name: str = "stain target") -> StainTarget:
        if not isinstance(d, dict) or d.get("format") != TARGET_FORMAT:
            raise EdgecellsError(f"{name}: not an edgecells stain target")
        if d.get("version") != TARGET_VERSION:
            raise EdgecellsError(
                f"{name}: stain target version {d.get('version')!r} is not supported "
                f"(this edgecells reads version {TARGET_VERSION})"
            )
        mean = _ints(d.get("mean_q10"), "mean_q10", name)
        std = _ints(d.get("std_q10"), "std_q10", name)
        for i, (lo, hi) in enumerate(_MEAN_Q10):
            if not lo <= mean[i] <= hi:
                raise EdgecellsError(f"{name}: mean_q10[{i}] = {mean[i]} is outside CIELAB")
        if not all(0 < v <= _STD_Q10_MAX for v in std):
            raise EdgecellsError(
                f"{name}: stain target needs 3 positive stds (std_q10 in 1..{_STD_Q10_MAX})"
            )
        mask = MaskParams.from_dict(d.get("mask", {}), name)
        n_images, n_pixels = d.get("n_images", 1), d.get("n_pixels", 0)
        for k, v in (("n_images", n_images), ("n_pixels", n_pixels)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise EdgecellsError(f"{name}: {k} must be a non-negative integer")
        src = d.get("sources", [])
        if not isinstance(src, list):
            raise EdgecellsError(f"{name}: sources must be a list")
        sources = tuple(str(x) for x in src)
        return cls(mean, std, n_images, n_pixels, mask, sources)  # type: ignore[arg-type]

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write as JSON atomically (temporary file in the same folder, fsync, rename);
        EdgecellsError (nothing left behind) when it cannot."""
        p = Path(path)
        if p.is_dir():
            raise EdgecellsError(f"{p}: is a folder; give the target file name (target.json)")
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        try:
            atomic_write(p, text.encode("utf-8"))
        except OSError as exc:
            raise EdgecellsError(f"{p}: cannot write ({exc.strerror or exc})") from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> StainTarget:
        p = Path(path)
        try:
            if p.is_file() and p.stat().st_size > (1 << 20):
                raise EdgecellsError(f"{p}: too large for a stain target")
            d = json.loads(p.read_text(encoding="utf-8"), parse_constant=_no_constant)
        except FileNotFoundError:
            raise EdgecellsError(f"{p}: no such stain target file") from None
        except IsADirectoryError:
            raise EdgecellsError(f"{p}: is a folder, not a stain target file") from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise EdgecellsError(f"{p}: not a valid stain target JSON ({exc})") from None
        return cls.from_dict(d, name=str(p))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _kernels(kernel: str) -> tuple[Any, Any]:
    if kernel == "auto":
        kernel = "numba" if K.HAVE_NUMBA else "numpy"
    if kernel not in K.KERNELS:
        raise EdgecellsError(f"unknown stain kernel {kernel!r} (have: {', '.join(K.KERNELS)})")
    return K.KERNELS[kernel]


class ReinhardNormalizer:
    """Fixed-point Reinhard normalizer with the torchstain/StainTools shape.

    >>> norm = ReinhardNormalizer().fit(reference_images)   # or ReinhardNormalizer(target)
    >>> out = norm.transform(image)                          # RGB uint8 in, RGB uint8 out

    ``kernel``: "auto" (numba when importable), "numba" or "numpy" — identical output.
    """

    def __init__(self, target: StainTarget | None = None, kernel: str = "auto") -> None:
        self.target = target
        self.kernel = "numba" if kernel == "auto" and K.HAVE_NUMBA else kernel
        if self.kernel == "auto":
            self.kernel = "numpy"
        self._stats_fn, self._transform_fn = _kernels(self.kernel)
        self._tables = load_tables()

    @property
    def mask(self) -> MaskParams:
        return self.target.mask if self.target is not None else MaskParams()

    def fit(
        self, images: np.ndarray | Iterable[np.ndarray], mask: MaskParams | None = None
    ) -> ReinhardNormalizer:
        """Fit the target on one reference image or many (pooled); returns self."""
        self.target = StainTarget.fit(images, mask=mask, kernel=self.kernel)
        return self

    def _need_target(self) -> StainTarget:
        if self.target is None:
            raise EdgecellsError("stain normalizer has no target: fit() or load one first")
        return self.target

    def frame_stats(self, frame: np.ndarray, stride: int | None = None) -> FrameStats:
        """Statistics of a frame's stained pixels, from every ``stride``-th pixel."""
        stride = self.mask.stats_stride if stride is None else max(int(stride), 1)
        rgb = as_rgb8(frame, name="frame")
        return stats_from_hist(self._stats_fn(rgb, stride, self._tables), self.mask, stride)

    def params(self, stats: FrameStats) -> np.ndarray:
        """The integer transfer parameters for a frame with these statistics."""
        target = self._need_target()
        mask = target.mask
        lo, hi = mask.min_scale, mask.max_scale
        scale = []
        for c in range(3):
            s = (target.std_q10[c] * 65536 * 2 + stats.std_q10[c]) // (2 * stats.std_q10[c])
            scale.append(min(max(s, int(lo * 65536)), int(hi * 65536)))
        return K.pack_params(
            stats.mean_q10,
            target.mean_q10,
            tuple(scale),
            stats.threshold_q10,
            _q10(mask.blend_band_L),
            _q10(mask.dark_L),
        )

    def normalize(self, image: np.ndarray, stats: FrameStats | None = None) -> NormalizeResult:
        """Normalize a whole image (statistics from all its pixels unless given)."""
        rgb = as_rgb8(image)
        st = stats if stats is not None else self.frame_stats(rgb, stride=1)
        if not st.ok:
            return NormalizeResult(rgb.copy(), False, st.reason, st)
        out = self._transform_fn(rgb, self.params(st), self._tables)
        return NormalizeResult(out, True, None, st)

    def transform(self, image: np.ndarray) -> np.ndarray:
        """Normalized copy of ``image`` (the unchanged copy if it cannot be normalized)."""
        return self.normalize(image).image

    def transform_crop(self, crop: np.ndarray, stats: FrameStats) -> np.ndarray:
        """Normalize a crop of a frame with the frame's statistics (see frame_stats)."""
        rgb = as_rgb8(crop, name="crop")
        if not stats.ok:
            return rgb.copy()
        return self._transform_fn(rgb, self.params(stats), self._tables)
