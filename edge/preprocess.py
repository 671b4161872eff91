"""The one cell preprocessing shared by training, calibration, evaluation and the device.

A cell is seen at a fixed **physical** field: the model's input covers ``side_um``
micrometres (``input_size x pixel_size_um``, both in the bundle manifest). Whatever the
source — a 640x480 camera frame at 0.072 µm/px, a 200 px PBC crop at 0.103 µm/px, a LISC
crop at 0.155 µm/px — the same three steps run, in this order:

1. **cut** a square of ``round(side_um / source_pixel_um)`` source pixels centred on the
   cell (reflected at the image's edges);
2. **resample** it to ``input_size x input_size`` (OpenCV area interpolation when
   shrinking, bilinear when enlarging): the model's pixel size, whatever the camera's;
3. **stain-normalize** the small crop with the fixed-point Reinhard transfer, using the
   statistics of the crop's own (resampled) pixels. Normalizing after resampling is
   cheaper (64x64 pixels instead of the native field) and the statistics are those of the
   same physical field everywhere.

The statistics source is the crop itself, on the device as in training: single-cell
training sets (PBC, LISC) have no frame to take statistics from, so frame statistics could
not be reproduced in training, and a fixed reference would not adapt to a microscope's
stain at all. Measured across microscopes (models/reference/MODEL_CARD.md).

:func:`prepare_cell` does the three steps for a cell at (cx, cy) of a frame (device path);
:func:`prepare_crop` for a single-cell image centred in its file (training, calibration,
evaluation, ``edgecells classify``). Both end in the same code; a parity test feeds a PBC
image through the device pipeline as a frame and compares with the training arrays.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np

from edgecells.edge.errors import EdgecellsError
from edgecells.edge.imageio import as_rgb8

if TYPE_CHECKING:  # pragma: no cover
    from edgecells.edge.stain import ReinhardNormalizer

# bump when the output of prepare_crop / prepare_cell changes (training caches key on it)
PREPROCESS_VERSION = "prepare_cell-v2"
STATS_SOURCE = "crop"  # statistics of the resampled crop's own pixels


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
    return cv2.resize(np.ascontiguousarray(img), (size, size), interpolation=interp)


def field_side_px(side_um: float, pixel_size_um: float) -> int:
    """Source pixels spanned by a ``side_um`` field at ``pixel_size_um`` µm/px (>= 8)."""
    if not (pixel_size_um > 0 and side_um > 0):
        raise EdgecellsError(
            f"pixel size ({pixel_size_um}) and field ({side_um} µm) must be > 0 micrometres"
        )
    return max(8, int(round(side_um / pixel_size_um)))


def cut_square(image: np.ndarray, cx: float, cy: float, side: int) -> np.ndarray:
    """A ``side x side`` crop centred on (cx, cy); reflected at the image's edges."""
    h, w = image.shape[:2]
    side = int(side)
    if side <= 0:
        raise EdgecellsError(f"crop size must be > 0 pixels, got {side}")
    x0 = int(round(cx - side / 2))
    y0 = int(round(cy - side / 2))
    x1, y1 = x0 + side, y0 + side
    if x0 >= 0 and y0 >= 0 and x1 <= w and y1 <= h:
        return image[y0:y1, x0:x1]
    inner = image[max(0, y0) : min(h, y1), max(0, x0) : min(w, x1)]
    if inner.size == 0:
        raise EdgecellsError(f"crop centre ({cx:.0f}, {cy:.0f}) lies outside the image")
    pads = (max(0, -y0), max(0, y1 - h), max(0, -x0), max(0, x1 - w))
    # reflect as often as needed (a field larger than the image reflects more than once)
    out = inner
    while any(pads):
        ih, iw = out.shape[:2]
        t, b, lft, r = (
            min(pads[0], ih - 1),
            min(pads[1], ih - 1),
            min(pads[2], iw - 1),
            min(pads[3], iw - 1),
        )
        if ih < 2 or iw < 2:
            out = cv2.copyMakeBorder(out, *pads, cv2.BORDER_REPLICATE)
            break
        out = cv2.copyMakeBorder(out, t, b, lft, r, cv2.BORDER_REFLECT_101)
        pads = (pads[0] - t, pads[1] - b, pads[2] - lft, pads[3] - r)
    return out


def normalize_small(small: np.ndarray, normalizer: ReinhardNormalizer | None) -> np.ndarray:
    """Step 3: Reinhard with the crop's own statistics (``None``: unchanged)."""
    if normalizer is None:
        return small
    return normalizer.transform(small)


def prepare_cell(
    image: np.ndarray,
    cx: float,
    cy: float,
    pixel_size_um: float,
    size: int,
    model_pixel_um: float,
    normalizer: ReinhardNormalizer | None,
) -> np.ndarray:
    """The cell at (cx, cy) of ``image`` (``pixel_size_um`` µm/px) as the model's input:
    cut at the model's field (``size x model_pixel_um`` µm), resample to ``size``,
    stain-normalize. Returns ``size x size x 3`` uint8 RGB."""
    rgb = as_rgb8(image, name="image")
    side = field_side_px(size * model_pixel_um, pixel_size_um)
    small = square_resize(cut_square(rgb, cx, cy, side), int(size))
    return normalize_small(small, normalizer)


def prepare_crop(
    img: np.ndarray,
    normalizer: ReinhardNormalizer | None,
    size: int,
    pixel_size_um: float | None = None,
    model_pixel_um: float | None = None,
) -> np.ndarray:
    """A single-cell image (the cell in its centre) as the model's input.

    With both pixel sizes (the image's and the model's, µm/px): :func:`prepare_cell` at the
    image's centre — the physical field. Without them (legacy bundles that record no
    pixel size): the centre square of the whole image, resampled, then normalized.
    """
    rgb = as_rgb8(img, name="crop")
    if pixel_size_um is not None and model_pixel_um is not None:
        h, w = rgb.shape[:2]
        return prepare_cell(rgb, w / 2, h / 2, pixel_size_um, size, model_pixel_um, normalizer)
    return normalize_small(square_resize(rgb, int(size)), normalizer)
