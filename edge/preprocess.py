"""The one crop preprocessing shared by training, calibration and the device.

:func:`prepare_crop` stain-normalizes a cell crop (fixed-point Reinhard, bit-exact on
every platform) and resizes it to the classifier's square input. Training, evaluation,
int8 calibration and the device runtime all call it, so the model sees the same pixels
everywhere.

Order: normalize at native resolution first (the statistics come from all the crop's
pixels, or from its frame), then center-crop to a square and resize with OpenCV's area
interpolation (downscaling) or bilinear interpolation (upscaling).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np

from edgecells.edge.imageio import as_rgb8

if TYPE_CHECKING:  # pragma: no cover
    from edgecells.edge.stain import FrameStats, ReinhardNormalizer

PREPROCESS_VERSION = "prepare_crop-v1"  # bump when the output of prepare_crop changes


def square_resize(img: np.ndarray, size: int) -> np.ndarray:
    """Center-crop ``img`` to a square (the shorter side) and resize to ``size x size``."""
    h, w = img.shape[:2]
    if h != w:
        s = min(h, w)
        y0, x0 = (h - s) // 2, (w - s) // 2
        img = img[y0 : y0 + s, x0 : x0 + s]
    if img.shape[0] == size:
        return np.ascontiguousarray(img)
    interp = cv2.INTER_AREA if img.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interp)


def prepare_crop(
    img: np.ndarray,
    normalizer: ReinhardNormalizer | None,
    size: int,
    stats: FrameStats | None = None,
) -> np.ndarray:
    """Stain-normalize (if ``normalizer``) and resize a cell crop to ``size x size`` uint8 RGB.

    ``stats``: the crop's frame statistics (device path: one ``frame_stats`` per frame);
    without them the crop is normalized with its own statistics, as in training on PBC
    single-cell images. ``normalizer=None`` skips stain normalization.
    """
    rgb = as_rgb8(img, name="crop")
    if normalizer is not None:
        if stats is not None:
            rgb = normalizer.transform_crop(rgb, stats)
        else:
            rgb = normalizer.transform(rgb)
    return square_resize(rgb, int(size))


def prepare_batch(
    images: list[np.ndarray],
    normalizer: ReinhardNormalizer | None,
    size: int,
    stats: FrameStats | None = None,
) -> np.ndarray:
    """:func:`prepare_crop` over a list, stacked as ``N x size x size x 3`` uint8."""
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        out[i] = prepare_crop(im, normalizer, size, stats)
    return out
