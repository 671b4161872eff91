"""The cell finder as it was before issue #10 (B - R channel of the raw frame, pixel-sized
opening), kept only as the baseline of ``bench_detect.py``. Not part of the package.

Cell finder: nucleated cells and platelets in whole frames (classical, fast).

Method (all sizes in micrometres, turned into pixels with the device's pixel size):

1. **Nuclear-stain channel.** Romanowsky stains colour nuclei and platelets blue-violet;
   red cells are pink and glass is near neutral. ``s = clip(B - R, 0, 255)`` separates
   them; it is computed on the frame shrunk (area interpolation) to about
   ``work_pixel_um`` micrometres per pixel, which keeps detection a few milliseconds.
2. **Threshold.** Otsu on ``s`` per frame, clamped to ``[stain_threshold_min,
   stain_threshold_max]`` (a frame with no nucleus has no second mode, the clamp keeps
   the threshold in the stain's range), or a fixed ``stain_threshold``.
3. **Morphology.** An opening removes single-pixel noise, a small dilation joins the
   nuclear lobes of one cell before connected components are labelled.
4. **Nucleated cells.** Components with at least ``nucleus_min_um2`` of stained area are
   nuclei. Lobes of one segmented nucleus (neutrophils, eosinophils) that the dilation
   did not join are merged when their centroids lie closer than ``lobe_merge_um``; small
   stained bits (granules, lobes) within ``absorb_um`` of a nucleus become part of it.
5. **Platelets.** Remaining components with a stained area in ``[platelet_min_um2,
   platelet_max_um2]``.
6. **Red cells** (counted for the quality gates, not classified): darker-than-glass pixels
   on the green channel, holes filled (pale centres), nuclei removed; touching red cells
   are split by counting the peaks of the distance transform that are at least
   ``rbc_min_radius_um`` deep and ``rbc_min_radius_um`` apart.

Crops for the classifier are squares centred on each cell, ``crop_um`` micrometres wide
(from the model bundle's crop geometry), cut from the full-resolution frame with edge
reflection where the square leaves the frame (:func:`cut_crop`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from edgecells.edge.errors import EdgecellsError


@dataclass
class DetectConfig:
    """The previous [detect] defaults."""

    nucleus_min_um2: float = 12.0
    platelet_min_um2: float = 0.3
    platelet_max_um2: float = 12.0
    stain_threshold: int = 0
    stain_threshold_min: int = 20
    stain_threshold_max: int = 80
    edge_margin_um: float = 0.0
    work_pixel_um: float = 0.15
    join_um: float = 0.3
    lobe_merge_um: float = 10.0
    absorb_um: float = 1.0
    rbc_min_radius_um: float = 2.0
    rbc_min_contrast: int = 12


NUCLEATED = "nucleated"
PLATELET = "platelet"


@dataclass
class Cell:
    """One detected cell; box (x, y, w, h) and centre in full-frame pixels."""

    kind: str
    cx: float
    cy: float
    x: int
    y: int
    w: int
    h: int
    area_um2: float


@dataclass
class Detections:
    """What :func:`detect_cells` found in one frame."""

    cells: list[Cell] = field(default_factory=list)
    red_cells: int = 0
    threshold: int = 0

    @property
    def nucleated(self) -> list[Cell]:
        return [c for c in self.cells if c.kind == NUCLEATED]

    @property
    def platelets(self) -> list[Cell]:
        return [c for c in self.cells if c.kind == PLATELET]


class CellDetector:
    """Finds nucleated cells and platelets; ``pixel_size_um`` is the camera's µm/pixel."""

    def __init__(self, config: DetectConfig | None = None, pixel_size_um: float = 0.073) -> None:
        if pixel_size_um <= 0:
            raise EdgecellsError(f"pixel size must be > 0 um/pixel, got {pixel_size_um}")
        self.cfg = config or DetectConfig()
        self.pixel_size_um = float(pixel_size_um)
        self.scale = max(1, int(round(self.cfg.work_pixel_um / self.pixel_size_um)))
        self.work_um = self.pixel_size_um * self.scale  # um per working pixel
        px2 = self.work_um**2
        self.nucleus_min_px = self.cfg.nucleus_min_um2 / px2
        self.platelet_min_px = self.cfg.platelet_min_um2 / px2
        self.platelet_max_px = self.cfg.platelet_max_um2 / px2
        self.merge_px = self.cfg.lobe_merge_um / self.work_um
        self.absorb_px = self.cfg.absorb_um / self.work_um
        self.margin_px = self.cfg.edge_margin_um / self.pixel_size_um
        self.rbc_r_px = max(1.0, self.cfg.rbc_min_radius_um / self.work_um)
        d = max(1, int(round(self.cfg.join_um / self.work_um)))
        self._join = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * d + 1, 2 * d + 1))
        self._open = np.ones((2, 2), np.uint8)

    def _shrink(self, frame: np.ndarray) -> np.ndarray:
        if self.scale == 1:
            return frame
        h, w = frame.shape[:2]
        size = (max(1, w // self.scale), max(1, h // self.scale))
        return cv2.resize(frame, size, interpolation=cv2.INTER_AREA)

    def detect(self, frame: np.ndarray) -> Detections:
        """Detect cells in an RGB uint8 HxWx3 frame."""
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise EdgecellsError(f"detect: expected RGB uint8 HxWx3, got {frame.shape}")
        small = self._shrink(frame)
        r = small[:, :, 0]
        b = small[:, :, 2]
        s = cv2.subtract(b, r)  # saturating uint8: clip(B - R, 0, 255)
        cfg = self.cfg
        if cfg.stain_threshold > 0:
            t = int(cfg.stain_threshold)
        else:
            otsu, _ = cv2.threshold(s, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
            t = int(min(max(otsu, cfg.stain_threshold_min), cfg.stain_threshold_max))
        mask = (s > t).astype(np.uint8)
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, self._open)
        joined = cv2.dilate(mask, self._join)
        n, labels, stats, _ = cv2.connectedComponentsWithStats(joined, connectivity=8)
        cells: list[Cell] = []
        if n > 1:
            cells = self._components(mask, labels, stats, n)
        if self.margin_px > 0:
            h, w = frame.shape[:2]
            m = self.margin_px
            cells = [c for c in cells if m <= c.cx <= w - m and m <= c.cy <= h - m]
        red = self._count_red(small, mask)
        return Detections(cells=cells, red_cells=red, threshold=t)

    def _components(
        self, mask: np.ndarray, labels: np.ndarray, stats: np.ndarray, n: int
    ) -> list[Cell]:
        # stained area and centroid per component, on the undilated mask
        lab = labels[mask > 0]
        ys, xs = np.nonzero(mask)
        area = np.bincount(lab, minlength=n).astype(np.float64)
        sx = np.bincount(lab, weights=xs, minlength=n)
        sy = np.bincount(lab, weights=ys, minlength=n)
        ok = area > 0
        cx = np.zeros(n)
        cy = np.zeros(n)
        cx[ok] = sx[ok] / area[ok]
        cy[ok] = sy[ok] / area[ok]
        x0 = stats[:, cv2.CC_STAT_LEFT].astype(np.float64)
        y0 = stats[:, cv2.CC_STAT_TOP].astype(np.float64)
        x1 = x0 + stats[:, cv2.CC_STAT_WIDTH]
        y1 = y0 + stats[:, cv2.CC_STAT_HEIGHT]
        idx = [i for i in range(1, n) if area[i] > 0]
        nuclei = [i for i in idx if area[i] >= self.nucleus_min_px]
        # merge nuclear parts whose centroids are close (lobes of one cell), largest first
        nuclei.sort(key=lambda i: -area[i])
        groups: list[list[int]] = []
        for i in nuclei:
            for g in groups:
                gx = np.average(cx[g], weights=area[g])
                gy = np.average(cy[g], weights=area[g])
                if np.hypot(cx[i] - gx, cy[i] - gy) < self.merge_px:
                    g.append(i)
                    break
            else:
                groups.append([i])
        taken = {i for g in groups for i in g}
        rest = [i for i in idx if i not in taken]
        # absorb small stained bits near a nucleus (granules, lobes below nucleus size)
        boxes = []
        for g in groups:
            boxes.append([x0[g].min(), y0[g].min(), x1[g].max(), y1[g].max()])
        leftover = []
        for i in rest:
            hit = None
            for k, (bx0, by0, bx1, by1) in enumerate(boxes):
                a = self.absorb_px
                if bx0 - a <= cx[i] <= bx1 + a and by0 - a <= cy[i] <= by1 + a:
                    hit = k
                    break
            if hit is None:
                leftover.append(i)
            else:
                groups[hit].append(i)
        k = self.scale
        um2 = self.work_um**2
        out: list[Cell] = []
        for g in groups:
            a = area[g].sum()
            gx = float(np.average(cx[g], weights=area[g]) + 0.5) * k
            gy = float(np.average(cy[g], weights=area[g]) + 0.5) * k
            bx0, by0 = x0[g].min() * k, y0[g].min() * k
            bx1, by1 = x1[g].max() * k, y1[g].max() * k
            out.append(
                Cell(
                    NUCLEATED,
                    gx,
                    gy,
                    int(bx0),
                    int(by0),
                    int(bx1 - bx0),
                    int(by1 - by0),
                    float(a * um2),
                )
            )
        for i in leftover:
            if self.platelet_min_px <= area[i] <= self.platelet_max_px:
                out.append(
                    Cell(
                        PLATELET,
                        float(cx[i] + 0.5) * k,
                        float(cy[i] + 0.5) * k,
                        int(x0[i] * k),
                        int(y0[i] * k),
                        int((x1[i] - x0[i]) * k),
                        int((y1[i] - y0[i]) * k),
                        float(area[i] * um2),
                    )
                )
        return out

    def _count_red(self, small: np.ndarray, stain: np.ndarray) -> int:
        g = small[:, :, 1]
        t, _ = cv2.threshold(g, 0, 255, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
        glass = float(np.percentile(g[::4, ::4], 95)) if g.size else 0.0
        if glass - t < self.cfg.rbc_min_contrast:
            return 0  # no darker-than-glass population: empty field
        body = (g < t).astype(np.uint8)
        body[cv2.dilate(stain, self._join) > 0] = 0
        # fill pale centres: holes not connected to the border
        inv = 1 - body
        nh, hl, hs, _ = cv2.connectedComponentsWithStats(inv, connectivity=4)
        if nh > 1:
            hmax = np.pi * (2 * self.rbc_r_px) ** 2
            border = set(np.unique(np.concatenate([hl[0], hl[-1], hl[:, 0], hl[:, -1]])))
            small_holes = [
                i for i in range(1, nh) if i not in border and hs[i, cv2.CC_STAT_AREA] <= hmax
            ]
            if small_holes:
                body[np.isin(hl, small_holes)] = 1
        dist = cv2.distanceTransform(body, cv2.DIST_L2, 3)
        r = self.rbc_r_px
        ksz = 2 * int(r) + 1
        peaks = (dist >= r) & (dist >= cv2.dilate(dist, np.ones((ksz, ksz), np.uint8)))
        npk, _ = cv2.connectedComponents(peaks.astype(np.uint8), connectivity=8)
        return int(npk - 1)

    def __call__(self, frame: np.ndarray) -> Detections:
        return self.detect(frame)
