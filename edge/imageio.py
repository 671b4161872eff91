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
from edgecells.edge.fileio import atomic_write, default_file_mode  # noqa: F401 (re-export)

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


# --------------------------------------------------------------------------- header sniffing

_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _u16(b: bytes, i: int, big: bool) -> int:
    return int.from_bytes(b[i : i + 2], "big" if big else "little")


def _u32(b: bytes, i: int, big: bool) -> int:
    return int.from_bytes(b[i : i + 4], "big" if big else "little")


def _jpeg_size(b: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 4 <= len(b):
        if b[i] != 0xFF:
            return None
        marker = b[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01,) or 0xD0 <= marker <= 0xD8:  # no length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        seg = _u16(b, i + 2, True)
        if marker in _JPEG_SOF:
            if i + 9 > len(b):
                return None
            return _u16(b, i + 7, True), _u16(b, i + 5, True)
        if seg < 2:
            return None
        i += 2 + seg
    return None


def _tiff_size(b: bytes) -> tuple[int, int] | None:
    big = b[:2] == b"MM"
    if _u16(b, 2, big) != 42:
        return None  # BigTIFF (43) and others: not sniffed
    ifd = _u32(b, 4, big)
    if ifd + 2 > len(b):
        return None
    n = _u16(b, ifd, big)
    w = h = None
    for k in range(n):
        e = ifd + 2 + 12 * k
        if e + 12 > len(b):
            return None
        tag, typ = _u16(b, e, big), _u16(b, e + 2, big)
        val = _u16(b, e + 8, big) if typ == 3 else _u32(b, e + 8, big) if typ == 4 else None
        if tag == 256:
            w = val
        elif tag == 257:
            h = val
    return (w, h) if w is not None and h is not None else None


def image_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) from the first bytes of a PNG, JPEG, BMP, WebP or TIFF file, read
    from its header without decoding; None when the format is not one of these or the
    header is cut short. ``head`` should hold the first 64 KiB (JPEG headers may carry
    metadata before the frame header; TIFF's first directory must lie within)."""
    b = bytes(head)
    try:
        if b[:8] == b"\x89PNG\r\n\x1a\n" and b[12:16] == b"IHDR":
            return _u32(b, 16, True), _u32(b, 20, True)
        if b[:2] == b"\xff\xd8":
            return _jpeg_size(b)
        if b[:2] == b"BM" and len(b) >= 26:
            if _u32(b, 14, False) == 12:
                return _u16(b, 18, False), _u16(b, 20, False)
            w = int.from_bytes(b[18:22], "little", signed=True)
            h = int.from_bytes(b[22:26], "little", signed=True)
            return abs(w), abs(h)
        if b[:4] == b"RIFF" and b[8:12] == b"WEBP":
            kind = b[12:16]
            if kind == b"VP8X" and len(b) >= 30:
                w = int.from_bytes(b[24:27], "little") + 1
                h = int.from_bytes(b[27:30], "little") + 1
                return w, h
            if kind == b"VP8 " and len(b) >= 30 and b[23:26] == b"\x9d\x01\x2a":
                return _u16(b, 26, False) & 0x3FFF, _u16(b, 28, False) & 0x3FFF
            if kind == b"VP8L" and len(b) >= 25 and b[20] == 0x2F:
                bits = _u32(b, 21, False)
                return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
            return None
        if b[:4] in (b"II*\x00", b"MM\x00*"):
            return _tiff_size(b)
    except IndexError:
        return None
    return None


_HEAD_BYTES = 64 << 10


def check_image_size(data: np.ndarray | bytes, name: str) -> tuple[int, int]:
    """The image's (width, height) from its header, refused above :data:`MAX_PIXELS`
    before anything is decoded; EdgecellsError when the header cannot be read."""
    head = bytes(data[:_HEAD_BYTES])
    size = image_size(head)
    if size is None:
        raise EdgecellsError(
            f"{name}: not a readable image (unknown format or damaged header; "
            "PNG, JPEG, BMP, WebP and TIFF are read)"
        )
    w, h = size
    if w <= 0 or h <= 0:
        raise EdgecellsError(f"{name}: unusable image size {w}x{h}")
    if w * h > MAX_PIXELS:
        raise EdgecellsError(
            f"{name}: image too large ({w}x{h}, max {MAX_PIXELS} pixels); refused before decoding"
        )
    return w, h


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file as RGB uint8 HxWx3; EdgecellsError naming the file on failure.

    The size in the file's header is checked before decoding (:func:`check_image_size`):
    a small file that declares a huge image never allocates it."""
    p = Path(path)
    if not p.is_file():
        raise EdgecellsError(f"{p}: no such image file")
    try:
        data = np.fromfile(p, dtype=np.uint8)
    except OSError as exc:
        raise EdgecellsError(f"{p}: cannot read ({exc.strerror or exc})") from None
    if data.size == 0:
        raise EdgecellsError(f"{p}: empty file")
    check_image_size(data, str(p))
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise EdgecellsError(f"{p}: not a readable image (corrupt or unsupported format)")
    return as_rgb8(img, name=str(p), bgr=img.ndim == 3)


def write_image(path: str | os.PathLike[str], image: np.ndarray) -> None:
    """Write an RGB uint8 image atomically (temporary file, fsync, rename).

    The suffix picks the format (no suffix: PNG); one OpenCV cannot write, or a write
    that fails, raises OSError (the caller decides what a failed write means); nothing is
    left behind. The file gets :func:`default_file_mode`."""
    p = Path(path)
    rgb = as_rgb8(image, name=str(p))
    suffix = p.suffix.lower() or ".png"
    if suffix not in IMAGE_SUFFIXES:
        raise EdgecellsError(
            f"{p}: cannot write images as {suffix!r} (use {', '.join(IMAGE_SUFFIXES)})"
        )
    try:
        ok, buf = cv2.imencode(suffix, rgb[:, :, ::-1])
    except cv2.error:
        ok = False
    if not ok:
        raise EdgecellsError(f"{p}: cannot encode image as {suffix}")
    atomic_write(p, buf.tobytes())


def list_images(path: str | os.PathLike[str], recursive: bool = True) -> list[Path]:
    """Image files under a folder (sorted), or the file itself."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise EdgecellsError(f"{p}: no such file or folder")
    it: Iterator[Path] = p.rglob("*") if recursive else p.glob("*")
    return sorted(f for f in it if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
