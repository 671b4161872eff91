"""Reading and writing images at the edges of the code (OpenCV BGR <-> RGB uint8).

Everything inside edgecells works on RGB ``uint8`` HxWx3 arrays. :func:`as_rgb8`
converts what cameras and files deliver (grayscale, RGBA/BGRA, 16-bit) and refuses
what cannot be an image (zero-size, wrong rank, absurd size) with an
:class:`~edgecells.edge.errors.EdgecellsError` naming the source.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from edgecells.edge.errors import EdgecellsError
from edgecells.edge.fileio import write_bytes_atomic

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MAX_PIXELS = 8192 * 8192  # larger frames are refused: no microscope camera sends them


def as_rgb8(image: np.ndarray, name: str = "image", bgr: bool = False) -> np.ndarray:
    """Return ``image`` as a contiguous RGB uint8 HxWx3 array.

    Accepts HxW (gray), HxWx1, HxWx3 and HxWx4 (alpha dropped), in uint8, uint16
    (scaled by 1/257), float in [0, 1], or other integer types in 0..255. ``bgr`` says
    the channels are in OpenCV order. An array that is already RGB uint8 HxWx3 and
    C-contiguous comes back as is (a type check, no copy): frames are converted once,
    where they enter (the frame sources), and later calls cost nothing.
    """
    if (
        not bgr
        and isinstance(image, np.ndarray)
        and image.dtype == np.uint8
        and image.ndim == 3
        and image.shape[2] == 3
        and image.flags.c_contiguous
        and 0 < image.shape[0] * image.shape[1] <= MAX_PIXELS
    ):
        return image
    if not isinstance(image, np.ndarray):
        raise EdgecellsError(f"{name}: not an image array")
    if image.ndim not in (2, 3) or image.size == 0 or min(image.shape[:2]) == 0:
        raise EdgecellsError(f"{name}: unusable image shape {tuple(image.shape)}")
    if image.shape[0] * image.shape[1] > MAX_PIXELS:
        raise EdgecellsError(
            f"{name}: image too large ({image.shape[1]}x{image.shape[0]}, max {MAX_PIXELS} pixels)"
        )
    if image.ndim == 3 and image.shape[2] not in (1, 3, 4):
        raise EdgecellsError(f"{name}: unusable number of channels {image.shape[2]}")
    if image.dtype == np.uint8:
        img = image
    elif image.dtype == np.uint16:
        img = ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif np.issubdtype(image.dtype, np.floating):
        if not np.all(np.isfinite(image)):
            raise EdgecellsError(f"{name}: image has NaN or infinite values")
        img = np.clip(np.floor(image * 255.0 + 0.5), 0, 255).astype(np.uint8)
    elif np.issubdtype(image.dtype, np.integer) or image.dtype == np.bool_:
        img = np.clip(image, 0, 255).astype(np.uint8)
    else:
        raise EdgecellsError(f"{name}: unsupported pixel type {image.dtype}")
    if img.ndim == 2 or img.shape[2] == 1:
        img = np.repeat(img.reshape(img.shape[0], img.shape[1], 1), 3, axis=2)
    elif img.shape[2] == 4:
        img = img[:, :, :3]
    if bgr:
        img = img[:, :, ::-1]
    return np.ascontiguousarray(img)


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file as RGB uint8 HxWx3; EdgecellsError naming the file on failure."""
    p = Path(path)
    if not p.is_file():
        raise EdgecellsError(f"{p}: no such image file")
    try:
        data = np.fromfile(p, dtype=np.uint8)
    except OSError as exc:
        raise EdgecellsError(f"{p}: cannot read ({exc.strerror or exc})") from None
    if data.size == 0:
        raise EdgecellsError(f"{p}: empty file")
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise EdgecellsError(f"{p}: not a readable image (corrupt or unsupported format)")
    return as_rgb8(img, name=str(p), bgr=img.ndim == 3)


def write_image(path: str | os.PathLike[str], image: np.ndarray) -> None:
    """Write an RGB uint8 image atomically (temporary file, fsync, rename); a failed write
    is a one-line :class:`EdgecellsError`."""
    p = Path(path)
    rgb = as_rgb8(image, name=str(p))
    suffix = p.suffix.lower() or ".png"
    ok, buf = cv2.imencode(suffix, rgb[:, :, ::-1])
    if not ok:
        raise EdgecellsError(f"{p}: cannot encode image as {suffix}")
    write_bytes_atomic(p, buf.tobytes())


def list_images(path: str | os.PathLike[str], recursive: bool = True) -> list[Path]:
    """Image files under a folder (sorted), or the file itself."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise EdgecellsError(f"{p}: no such file or folder")
    it: Iterator[Path] = p.rglob("*") if recursive else p.glob("*")
    return sorted(f for f in it if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
