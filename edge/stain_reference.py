"""Float64 reference of the fixed-point Reinhard normalizer: the same math, no rounding.

Used by tests and benchmarks to bound the fixed-point error. Given the same
stained-pixel weights (the integer path's mask), it computes the statistics and the
transfer in float64 with exact colour conversions (same matrices, exact sRGB and
CIELAB functions, same clamps), then rounds once at the end.
"""

from __future__ import annotations

import numpy as np

from edgecells.edge.reinhard_tables import (
    F_MAX,
    F_MIN,
    ONE_LIN,
    RGB_TO_XYZN,
    XYZN_TO_RGB,
    lab_f,
    lab_f_inv,
    linear_to_srgb,
    srgb_to_linear,
)
from edgecells.edge.stain import MaskParams


def lab_float(img: np.ndarray) -> np.ndarray:
    """CIELAB (float64, HxWx3) of an RGB uint8 image."""
    lin = srgb_to_linear(img.astype(np.float64) / 255.0)
    t = np.clip(lin @ RGB_TO_XYZN.T, 0.0, 1.0)
    f = lab_f(t)
    L = 116.0 * f[..., 1] - 16.0
    a = 500.0 * (f[..., 0] - f[..., 1])
    b = 200.0 * (f[..., 1] - f[..., 2])
    return np.stack([L, a, b], axis=-1)


def stats_float(img: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (population) std of CIELAB over the pixels where ``mask`` is true."""
    lab = lab_float(img)[mask.astype(bool)]
    return lab.mean(axis=0), lab.std(axis=0)


def transform_float(
    img: np.ndarray,
    weights: np.ndarray,
    src_mean: np.ndarray,
    src_std: np.ndarray,
    tgt_mean: np.ndarray,
    tgt_std: np.ndarray,
    mask_params: MaskParams | None = None,
) -> np.ndarray:
    """Reinhard transfer in float64; ``weights`` in [0, 1] blend it with the input."""
    mp = mask_params or MaskParams()
    scale = np.clip(np.asarray(tgt_std) / np.asarray(src_std), mp.min_scale, mp.max_scale)
    lab = (lab_float(img) - src_mean) * scale + tgt_mean
    fy = (lab[..., 0] + 16.0) / 116.0
    fx = fy + lab[..., 1] / 500.0
    fz = fy - lab[..., 2] / 200.0
    f = np.clip(np.stack([fx, fy, fz], axis=-1), F_MIN / ONE_LIN, F_MAX / ONE_LIN)
    t = lab_f_inv(f)
    lin = np.clip(t @ XYZN_TO_RGB.T, 0.0, 1.0)
    new = linear_to_srgb(lin) * 255.0
    w = np.asarray(weights, dtype=np.float64)[..., None]
    return np.clip(np.floor(w * new + (1.0 - w) * img + 0.5), 0, 255).astype(np.uint8)
