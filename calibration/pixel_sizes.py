"""Pixel sizes (µm per pixel) of the data sets in ``../shared/data``, and how they were measured.

None of the sources states its pixel size, so each was measured from red cells, taking a
normal red cell as 7.5 µm across (normal blood: 7.5-8 µm; the donors of all four sets are
described as healthy or normal):

| data set | µm/px | method | n red cells | median diameter |
|---|---:|---|---:|---:|
| PBC (CellaVision DM96, 200 px crops) | 0.103 | circle fit to red-cell outlines | 1,460 | 72.7 px |
| BCCD (640x480 frames) | 0.0721 | median side of the VOC RBC boxes | 3,086 | 104.0 px |
| DeepBioNet (Olympus BX53, 640x480) | 0.126 | median side of the VOC RBC boxes | 19,461 | 59.5 px |
| LISC (Axioskop 40, 224 px crops) | 0.155 | circle fit to red-cell outlines | 70 | 48.4 px |

- **VOC boxes** (:func:`voc_red_cell_side`): the median of (width + height) / 2 over the
  RBC boxes that do not touch the frame border. DeepBioNet's circle fit (below, 128 red
  cells on 60 frames: 60.7 px, 0.124 µm/px) agrees within 2%; on BCCD the circle fit finds
  few isolated red cells (13 on 60 frames) and is not used.
- **Circle fit** (:func:`red_cell_diameters`, for crops with no boxes): pinkish pixels
  darker than the glass (green < 97th percentile - 25, R > G + 10, R > B) form components;
  the outline points of each, away from the image border, get an algebraic least-squares
  circle; fits with a mean residual under 1 px (per 40 px radius) covering at least 6 of
  16 angular sectors count (partial red cells at a crop's edge measure too). PBC: 1,500
  random images of all classes (per class 72.4-75.4 px, 0.099-0.104 µm/px).
- So PBC's 200 px crops span 20.6 µm, LISC's 224 px 34.7 µm; a 20 µm model field fits in
  both. Reproduce: ``python -m edgecells.calibration.pixel_sizes ../shared/data``.

**The device's estimator** (``edgecells.edge.scale``, red-cell inscribed circles, 40 frames,
95% bootstrap interval; ``python benchmarks/bench_scale.py``) gives BCCD 0.0738 µm/px
(0.0728-0.0752), 2.4% from the VOC figure above. On DeepBioNet its per-frame estimates fall
into two groups: 240 frames around 0.122 µm/px and 260 around 0.083 µm/px (the source
resized its frames), so the single VOC figure above (0.126) fits only about half of the
frames; a per-frame estimate (``estimate_pixel_size([frame])``) is closer where the
frame's scale matters. The estimator cannot measure single-cell crops (PBC, LISC): it then
measures the white cell. :data:`PIXEL_SIZES` keeps its figures.

Red cells are smaller or larger in some anaemias; these are normal-blood sets.
"""

from __future__ import annotations

import glob
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

RED_CELL_UM = 7.5

# data-set folder name -> µm/px (measured as described above)
PIXEL_SIZE_UM: dict[str, float] = {
    "pbc": 0.103,
    "bccd": 0.0721,
    "deepbionet": 0.126,
    "lisc": 0.155,
}


def pixel_size_for(root: str | os.PathLike[str]) -> float | None:
    """The measured pixel size of a data folder (by its name, or a parent's), else None."""
    p = Path(root).resolve()
    for part in (p, *p.parents):
        if part.name.lower() in PIXEL_SIZE_UM:
            return PIXEL_SIZE_UM[part.name.lower()]
    return None


def voc_red_cell_side(annotations: str | os.PathLike[str]) -> tuple[float, int]:
    """Median side (px) of RBC boxes not touching the border, over VOC XML files; and n."""
    sides: list[float] = []
    for f in sorted(glob.glob(os.path.join(str(annotations), "*.xml"))):
        r = ET.parse(f).getroot()
        w = int(r.findtext("size/width", "0"))
        h = int(r.findtext("size/height", "0"))
        for o in r.findall("object"):
            if (o.findtext("name") or "").strip() != "RBC":
                continue
            b = o.find("bndbox")
            if b is None:
                continue
            x0, y0, x1, y1 = (float(b.findtext(k, "0")) for k in ("xmin", "ymin", "xmax", "ymax"))
            if x0 > 2 and y0 > 2 and x1 < w - 2 and y1 < h - 2:
                sides.append(((x1 - x0) + (y1 - y0)) / 2)
    return (float(np.median(sides)) if sides else float("nan")), len(sides)


def _fit_circle(pts: np.ndarray) -> tuple[float, float, float, float]:
    x, y = pts[:, 0].astype(float), pts[:, 1].astype(float)
    a = np.c_[2 * x, 2 * y, np.ones_like(x)]
    (cx, cy, c), *_ = np.linalg.lstsq(a, x * x + y * y, rcond=None)
    r = float(np.sqrt(max(c + cx * cx + cy * cy, 0.0)))
    return float(cx), float(cy), r, float(np.abs(np.hypot(x - cx, y - cy) - r).mean())


def red_cell_diameters(rgb: np.ndarray) -> list[float]:
    """Diameters (px) of red cells in an RGB image by circle fits to their outlines."""
    import cv2

    img = rgb.astype(np.int16)
    h, w = img.shape[:2]
    r_, g_, b_ = img[..., 0], img[..., 1], img[..., 2]
    glass = np.percentile(g_, 97)
    red = ((g_ < glass - 25) & (r_ > b_) & (r_ > g_ + 10)).astype(np.uint8)
    red = cv2.morphologyEx(red, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    n, lab, st, _ = cv2.connectedComponentsWithStats(red)
    out: list[float] = []
    for i in range(1, n):
        if st[i, 4] < 150:
            continue
        cs, _ = cv2.findContours(
            (lab == i).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE
        )
        p = cs[0][:, 0, :]
        p = p[(p[:, 0] > 3) & (p[:, 1] > 3) & (p[:, 0] < w - 4) & (p[:, 1] < h - 4)]
        if len(p) < 40:
            continue
        cx, cy, r, res = _fit_circle(p)
        ang = np.arctan2(p[:, 1] - cy, p[:, 0] - cx)
        sectors = len(np.unique(np.floor((ang + np.pi) / (np.pi / 8))))
        if res < max(1.0, r / 40) and sectors >= 6 and 10 < r < 200:
            out.append(2 * r)
    return out


def _main(data: str) -> None:  # pragma: no cover - a measurement script
    import random

    from edgecells.edge.imageio import read_image

    root = Path(data)
    for name, ann in (("bccd", "bccd/BCCD/Annotations"), ("deepbionet", "deepbionet/annotations")):
        side, n = voc_red_cell_side(root / ann)
        print(
            f"{name}: VOC RBC median side {side:.1f} px (n={n}) -> {RED_CELL_UM / side:.4f} um/px"
        )
    for name, pattern, k in (("pbc", "pbc/*/*.jpg", 1500), ("lisc", "lisc/*/*.jpg", 10**6)):
        files = sorted(glob.glob(str(root / pattern)))
        random.Random(0).shuffle(files)
        d = [x for f in files[:k] for x in red_cell_diameters(read_image(f))]
        med = float(np.median(d))
        print(
            f"{name}: circle fit median {med:.1f} px (n={len(d)}) -> {RED_CELL_UM / med:.4f} um/px"
        )


if __name__ == "__main__":  # pragma: no cover
    import sys

    _main(sys.argv[1] if len(sys.argv) > 1 else "../shared/data")


# The device estimator's figures (edge/scale.py; benchmarks/bench_scale.py).
PIXEL_SIZES: dict[str, dict[str, object]] = {
    "bccd": {
        "pixel_size_um": 0.0738,
        "interval": (0.0728, 0.0752),
        "voc_pixel_size_um": 0.0721,
        "method": "red cells, first 40 of all 364 frames (sorted); VOC boxes: all frames",
    },
    "deepbionet": {
        "pixel_size_um": 0.1225,
        "groups": {"0.083": 260, "0.122": 240},
        "voc_pixel_size_um": 0.1271,
        "method": "red cells per frame, median of the larger-pixel group (240 of 500 frames); "
        "the other 260 frames are at about 0.083 um/px",
    },
}
