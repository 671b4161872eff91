"""The camera's pixel size (µm/px) from the diameters of red cells.

Red cells of normal blood are 7.5-8 µm across on a dried smear, so the median diameter
of the red cells in a few frames gives the pixel size:
``pixel_size_um = rbc_diameter_um / median diameter in pixels``. A stage micrometer is
better (red cells are smaller in iron deficiency and thalassaemia, larger in
macrocytic anaemias and in thick areas of a smear), so a configured value is the
default; ``[camera] pixel_size_um = "auto"`` and ``edgecells scale`` use this estimate,
and ``edgecells doctor`` compares the two.

Method, per frame (no pixel size needed; the frame is shrunk by an integer factor to at
most ``MAX_SIDE`` pixels on its longer side):

1. cell pixels: darker than the glass on the mean of the three channels, at the Otsu
   threshold between glass and cells; outlines smoothed (closing, opening) and pale
   centres (holes) filled;
2. each red cell's inscribed circle: the regional maxima of the distance transform,
   at least ``MIN_RADIUS_PX`` deep, whose circle lies inside the frame (red cells touch
   and overlap in thick areas: the centre of each still gives a peak of its radius);
3. diameter = 2 x peak depth.

Over all frames: the peaks above ``CORE`` x their 95th percentile (overlaps and
fragments give shallower peaks), times ``INSCRIBED_TO_DIAMETER`` (inscribed circle to
cell diameter, fitted against VOC red-cell boxes), their median, and a 95% bootstrap
interval of that median (``BOOTSTRAP`` resamples, fixed seed).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np

from edgecells.edge.errors import EdgecellsError

RBC_DIAMETER_UM = 7.5  # normal red-cell diameter on a dried smear (7.5-8 µm)
MAX_SIDE = 800  # frames are shrunk by an integer factor to at most this many pixels
MIN_RADIUS_PX = 4  # shallower distance-transform peaks (working size) are not red cells
CORE = 0.6  # peaks below this fraction of the 95th percentile are overlaps and fragments
# inscribed-circle diameter -> red-cell diameter: the median ratio of the VOC red-cell box
# side to the inscribed diameter: 1.149 on DeepBioNet train+val, 1.231 on BCCD trainval
# (60 frames each); their geometric mean (checked on the test frames)
INSCRIBED_TO_DIAMETER = 1.19
BOOTSTRAP = 500
SEED = 0


@dataclass
class ScaleEstimate:
    """A pixel size estimated from red cells, with its 95% interval."""

    pixel_size_um: float
    low_um: float
    high_um: float
    diameter_px: float
    cells: int
    frames: int
    rbc_diameter_um: float = RBC_DIAMETER_UM

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("pixel_size_um", "low_um", "high_um"):
            d[k] = round(d[k], 5)
        d["diameter_px"] = round(d["diameter_px"], 2)
        return d


def _glass_grey(image: np.ndarray) -> float:
    sub = image[::2, ::2].reshape(-1, 3).sum(axis=1, dtype=np.int32)
    k = int(0.9 * (len(sub) - 1))
    t = np.partition(sub, k)[k]
    return float(sub[sub >= t].mean())


def red_cell_diameters(frame: np.ndarray) -> np.ndarray:
    """Equivalent diameters (full-frame pixels) of the isolated round red cells."""
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise EdgecellsError(f"scale: expected RGB uint8 HxWx3, got {frame.shape}")
    h, w = frame.shape[:2]
    k = max(1, int(np.ceil(max(h, w) / MAX_SIDE)))
    small = frame
    if k > 1:
        small = cv2.resize(frame, (w // k, h // k), interpolation=cv2.INTER_AREA)
    grey = cv2.transform(small, np.full((1, 3), 1 / 3, np.float32))  # mean of R, G, B
    if grey.ndim == 3:
        grey = grey[:, :, 0]
    grey = grey.astype(np.uint8)
    glass = _glass_grey(small) / 3
    t, _ = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    if glass - t < 8:  # no population darker than the glass: an empty or uniform field
        return np.zeros(0)
    body = (grey <= t).astype(np.uint8)
    # smooth the outline: an opening a fortieth of the frame's shorter side (a few px)
    r = max(1, min(body.shape) // 160)
    kern = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    body = cv2.morphologyEx(body, cv2.MORPH_CLOSE, kern)
    # fill holes (pale centres): background not connected to the frame's border
    pad = cv2.copyMakeBorder(1 - body, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=1)
    ff = pad.copy()
    cv2.floodFill(ff, None, (0, 0), 2)
    holes = (ff[1:-1, 1:-1] == 1).astype(np.uint8)
    body |= holes
    body = cv2.morphologyEx(body, cv2.MORPH_OPEN, kern)
    # inscribed circles: regional maxima of the distance to the background, at least
    # MIN_RADIUS_PX deep and a fortieth of the frame's shorter side apart, whose circle
    # lies inside the frame
    dist = cv2.distanceTransform(body, cv2.DIST_L2, 5)
    m = max(3, min(body.shape) // 40)
    mx = cv2.dilate(dist, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * m + 1, 2 * m + 1)))
    ys, xs = np.nonzero((dist >= mx) & (dist >= MIN_RADIUS_PX))
    v = dist[ys, xs].astype(np.float64)
    hh, ww = body.shape
    ok = (xs - v > 1) & (ys - v > 1) & (xs + v < ww - 1) & (ys + v < hh - 1)
    return 2 * (v[ok] + 0.5) * k


def estimate_from_diameters(
    diameters: np.ndarray, frames: int, rbc_diameter_um: float = RBC_DIAMETER_UM
) -> ScaleEstimate:
    """The pixel size from pooled red-cell diameters (pixels), with a bootstrap interval."""
    d = np.asarray(diameters, dtype=np.float64)
    if len(d) < 5:
        raise EdgecellsError(
            f"scale: only {len(d)} isolated red cells in {frames} frames (need at least 5); "
            "use more frames, a thinner area of the smear, or a stage micrometer"
        )
    d = d[d >= CORE * np.percentile(d, 95)] * INSCRIBED_TO_DIAMETER
    med = float(np.median(d))
    rng = np.random.default_rng(SEED)
    boot = np.median(rng.choice(d, size=(BOOTSTRAP, len(d)), replace=True), axis=1)
    lo_d, hi_d = np.percentile(boot, [2.5, 97.5])
    return ScaleEstimate(
        pixel_size_um=rbc_diameter_um / med,
        low_um=rbc_diameter_um / float(hi_d),
        high_um=rbc_diameter_um / float(lo_d),
        diameter_px=med,
        cells=len(d),
        frames=frames,
        rbc_diameter_um=rbc_diameter_um,
    )


def estimate_pixel_size(
    frames: Iterable[np.ndarray], rbc_diameter_um: float = RBC_DIAMETER_UM
) -> ScaleEstimate:
    """Estimate µm/px from the isolated red cells of ``frames`` (RGB uint8)."""
    if not rbc_diameter_um > 0:
        raise EdgecellsError(f"scale: red-cell diameter must be > 0 µm, got {rbc_diameter_um}")
    parts = []
    n = 0
    for f in frames:
        parts.append(red_cell_diameters(f))
        n += 1
    if n == 0:
        raise EdgecellsError("scale: no frames to measure")
    return estimate_from_diameters(np.concatenate(parts), n, rbc_diameter_um)


def estimate_from_source(uri: str, camera: Any, frames: int) -> ScaleEstimate:
    """Read up to ``frames`` frames from a source URI (``""`` = the sample frames) and
    estimate the pixel size from their red cells; unreadable frames are skipped."""
    from edgecells.edge.sources import open_source

    images = []
    src = open_source(uri, camera)
    src.open()
    try:
        while len(images) < frames:
            f = src.read()
            if f is None:
                break
            if f.image is not None:
                images.append(f.image)
    finally:
        src.close()
    if not images:
        raise EdgecellsError(f"scale: {uri or 'samples'} gave no readable frame")
    return estimate_pixel_size(images, float(camera.rbc_diameter_um))


def resolve_pixel_size(cfg: Any, uri: str | None = None) -> dict[str, Any]:
    """Make ``cfg.camera.pixel_size_um`` a number: the configured value, or (``"auto"``)
    the estimate from the source's first ``scale_frames`` frames. Returns what a session
    records: the value used, where it came from and, when estimated, the interval."""
    from edgecells.edge.config import AUTO

    cam = cfg.camera
    if cam.pixel_size_um != AUTO:
        return {"pixel_size_um": float(cam.pixel_size_um), "pixel_size_source": "configured"}
    src = cfg.session.source if uri is None else uri
    est = estimate_from_source(src, cam, int(cam.scale_frames))
    cam.pixel_size_um = est.pixel_size_um
    return {
        "pixel_size_um": round(est.pixel_size_um, 5),
        "pixel_size_source": "estimated",
        "pixel_size_estimate": est.to_dict(),
    }
