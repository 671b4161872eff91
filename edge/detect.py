"""Cell finder: nucleated cells and platelets in whole frames (classical, fast).

Method (all sizes in micrometres, turned into pixels with the device's pixel size):

1. **Nuclear-stain channel, independent of white balance.** The glass colour (the
   brightest tenth of the frame) is the frame's own white reference; relative to it, the
   optical densities ``OD_c = ln(glass_c / c)`` do not depend on the camera's channel
   gains or exposure. Romanowsky-stained nuclei and platelets absorb green far more than
   blue; red cells absorb both about alike (pink in BCCD, grey-blue or violet in
   DeepBioNet). ``s = 100 x (OD_green - OD_blue)`` separates them (the red channel is not
   used: it is what differs most between cameras and stain batches). It is computed on
   the frame shrunk (area interpolation) to about ``work_pixel_um`` micrometres per pixel.
2. **Threshold relative to the red cells.** Per frame: ``stain_level_factor`` x the
   median of ``s`` over cell-covered pixels (mostly red cells; none when cells cover
   less than ``stain_level_min_cover`` of the frame) + ``stain_level_offset``, at least
   ``stain_od_min`` (a stain batch that colours red cells violet raises it), or a fixed
   ``stain_od``.
3. **Morphology.** An opening ``open_um`` wide removes noise, a small dilation joins the
   nuclear lobes of one cell before connected components are labelled.
4. **Nucleated cells.** Components with at least ``nucleus_min_um2`` of stained area are
   nuclei. Lobes of one segmented nucleus (neutrophils, eosinophils) that the dilation
   did not join are merged when their centroids lie closer than ``lobe_merge_um``; small
   stained bits (granules, lobes) within ``absorb_um`` of a nucleus become part of it.
   A cell's box is the extent of its stained pixels (nucleus and granules; the cytoplasm
   is not segmented). Touching cells can be split (``split_um``, off by default).
5. **Platelets.** Their own, lower threshold (``platelet_*`` keys, same red-cell rule);
   components after an opening of ``platelet_open_um`` (drops thin red-cell rims) with a
   stained area in ``[platelet_min_um2, platelet_max_um2]``, filling at least
   ``platelet_min_fill`` of their box, on the glass (``platelet_min_glass`` of a
   ``platelet_context_um`` square) and not within ``platelet_clear_um`` of a nucleated
   cell.
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

from edgecells.edge.config import DetectConfig
from edgecells.edge.errors import EdgecellsError

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
    threshold: float = 0.0  # stain threshold used, optical density units

    @property
    def nucleated(self) -> list[Cell]:
        return [c for c in self.cells if c.kind == NUCLEATED]

    @property
    def platelets(self) -> list[Cell]:
        return [c for c in self.cells if c.kind == PLATELET]


LOG_LUT = np.log(np.maximum(np.arange(256, dtype=np.float64), 0.5)).astype(np.float32)


def _quantile_u8(img: np.ndarray, q: float, mask: np.ndarray | None = None) -> int:
    """The ``q`` quantile (0..1) of a uint8 image's values (under ``mask``), by histogram."""
    hist = cv2.calcHist([img], [0], mask, [256], [0, 256]).ravel()
    total = hist.sum()
    if total <= 0:
        return 0
    return int(np.searchsorted(np.cumsum(hist), q * total))


def glass_colour(image: np.ndarray, top: float = 0.9, grey: np.ndarray | None = None) -> np.ndarray:
    """The colour of the glass: the mean RGB of the brightest tenth of the frame (by
    luma), each channel at least 1."""
    if image.size == 0:
        return np.ones(3)
    if grey is None:
        grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    t = _quantile_u8(grey, top)
    m = cv2.mean(image, mask=(grey >= t).astype(np.uint8))
    return np.maximum(np.array(m[:3], dtype=np.float64), 1.0)


class CellDetector:
    """Finds nucleated cells and platelets; ``pixel_size_um`` is the camera's µm/pixel."""

    def __init__(self, config: DetectConfig | None = None, pixel_size_um: float = 0.073) -> None:
        if not pixel_size_um > 0:
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
        o = int(round(self.cfg.open_um / self.work_um))
        self._open = np.ones((o, o), np.uint8) if o >= 2 else None
        self._glass = np.full(3, 255.0)
        self._grey = np.zeros((1, 1), np.uint8)
        self._on_glass = np.zeros((1, 1), bool)
        r = int(round(self.cfg.split_um / self.work_um))
        self._split = (
            cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
            if self.cfg.split_um > 0 and r >= 1
            else None
        )
        self.split_min_px = self.cfg.split_min_um2 / px2
        self.split_dist_px = self.cfg.split_dist_um / self.work_um
        po = int(round(self.cfg.platelet_open_um / self.work_um))
        self._popen = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (po, po)) if po >= 2 else None

    def _shrink(self, frame: np.ndarray) -> np.ndarray:
        if self.scale == 1:
            return frame
        h, w = frame.shape[:2]
        size = (max(1, w // self.scale), max(1, h // self.scale))
        return cv2.resize(frame, size, interpolation=cv2.INTER_AREA)

    def stain_channel(self, small: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The nuclear-stain channel (uint8, 100 x optical density) and the glass colour."""
        self._grey = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
        glass = glass_colour(small, grey=self._grey)
        self._glass = glass
        # cell-covered pixels: darker than cell_od below the glass (luma)
        glass_y = 0.299 * glass[0] + 0.587 * glass[1] + 0.114 * glass[2]
        self._on_glass = self._grey >= glass_y * np.exp(-self.cfg.cell_od)
        lb = cv2.LUT(small[:, :, 2], LOG_LUT)
        lg = cv2.LUT(small[:, :, 1], LOG_LUT)
        # 100 x (OD_green - OD_blue) relative to the glass; saturating to 0..255
        off = float(np.log(glass[2]) - np.log(glass[1]))
        f = cv2.subtract(lb, lg)
        f = (f - off) * 100.0
        np.clip(f, 0, 255, out=f)
        return f.astype(np.uint8), glass

    def red_level(self, s: np.ndarray, small: np.ndarray) -> float:
        """The red cells' level on the stain channel (optical density): the
        ``stain_level_pct`` percentile over cell-covered pixels (darker than ``cell_od``
        below the glass); 0 when cells cover less than ``stain_level_min_cover`` of the
        frame (too few red cells to go by)."""
        cells = (~self._on_glass).astype(np.uint8)
        if cv2.countNonZero(cells) < self.cfg.stain_level_min_cover * cells.size:
            return 0.0
        return _quantile_u8(s, self.cfg.stain_level_pct / 100.0, cells) / 100.0

    def thresholds(self, level: float) -> tuple[float, float]:
        """Nucleus and platelet thresholds (optical density) for a red-cell level: a
        fixed ``stain_od`` when set, else ``stain_level_factor`` x level +
        ``stain_level_offset``, at least ``stain_od_min``; platelets alike with the
        ``platelet_*`` keys (never above the nucleus threshold)."""
        cfg = self.cfg
        if cfg.stain_od > 0:
            t = float(cfg.stain_od)
        else:
            t = max(cfg.stain_od_min, cfg.stain_level_factor * level + cfg.stain_level_offset)
        tp = max(cfg.platelet_od_min, cfg.platelet_level_factor * level + cfg.platelet_level_offset)
        return t, min(t, tp)

    def detect(self, frame: np.ndarray) -> Detections:
        """Detect cells in an RGB uint8 HxWx3 frame."""
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise EdgecellsError(f"detect: expected RGB uint8 HxWx3, got {frame.shape}")
        small = self._shrink(frame)
        s, _ = self.stain_channel(small)
        t, tp = self.thresholds(self.red_level(s, small))
        mask = (s > int(round(t * 100))).astype(np.uint8)
        if self._open is not None:
            mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, self._open)
        joined = cv2.dilate(mask, self._join)
        n, labels = cv2.connectedComponents(joined, connectivity=8)
        cells: list[Cell] = []
        if n > 1:
            cells = self._components(mask, labels, n)
        cells += self._platelets(s, tp, cells)
        if self.margin_px > 0:
            h, w = frame.shape[:2]
            m = self.margin_px
            cells = [c for c in cells if m <= c.cx <= w - m and m <= c.cy <= h - m]
        red = self._count_red(small, mask)
        return Detections(cells=cells, red_cells=red, threshold=t)

    def _split_touching(
        self, mask: np.ndarray, labels: np.ndarray, n: int
    ) -> tuple[np.ndarray, int, dict[int, int]]:
        """Split components holding two or more large nuclear bodies (touching white
        cells): the cores left by an opening of ``split_um`` radius with at least
        ``split_min_um2`` each; the component's pixels go to the nearest core. Returns the
        new labels, their count and, for the labels made, the core each belongs to."""
        seeds: dict[int, int] = {}
        if self._split is None:
            return labels, n, seeds
        cores = cv2.morphologyEx(mask, cv2.MORPH_OPEN, self._split)
        nc, _, cst, ccen = cv2.connectedComponentsWithStats(cores, connectivity=8)
        big = [j for j in range(1, nc) if cst[j, cv2.CC_STAT_AREA] >= self.split_min_px]
        if len(big) < 2:
            return labels, n, seeds
        owner: dict[int, list[int]] = {}
        for j in big:
            x, y = int(round(ccen[j, 0])), int(round(ccen[j, 1]))
            owner.setdefault(int(labels[y, x]), []).append(j)
        for lab, js in owner.items():
            if lab == 0 or len(js) < 2:
                continue
            # two cells' nuclei lie at least split_dist_um apart (one cell's lobes closer)
            c = ccen[js]
            far = np.hypot(*(c[:, None, :] - c[None, :, :]).transpose(2, 0, 1))
            if far[np.triu_indices(len(js), 1)].min() < self.split_dist_px:
                continue
            ys, xs = np.nonzero(labels == lab)
            d = np.stack([(xs - ccen[j, 0]) ** 2 + (ys - ccen[j, 1]) ** 2 for j in js])
            near = d.argmin(axis=0)
            for k, j in enumerate(js):
                new = lab if k == 0 else n
                if k:
                    n += 1
                sel = near == k
                labels[ys[sel], xs[sel]] = new
                seeds[new] = j
        return labels, n, seeds

    def _components(self, mask: np.ndarray, labels: np.ndarray, n: int) -> list[Cell]:
        labels, n, seeds = self._split_touching(mask, labels, n)
        # stained area, centroid and box per component, on the undilated mask
        ys, xs = np.nonzero(mask)
        lab = labels[ys, xs]
        area = np.bincount(lab, minlength=n).astype(np.float64)
        sx = np.bincount(lab, weights=xs, minlength=n)
        sy = np.bincount(lab, weights=ys, minlength=n)
        ok = area > 0
        cx = np.zeros(n)
        cy = np.zeros(n)
        cx[ok] = sx[ok] / area[ok]
        cy[ok] = sy[ok] / area[ok]
        big = np.iinfo(np.int32).max
        x0 = np.full(n, big, np.int64)
        y0 = np.full(n, big, np.int64)
        x1 = np.full(n, -1, np.int64)
        y1 = np.full(n, -1, np.int64)
        np.minimum.at(x0, lab, xs)
        np.minimum.at(y0, lab, ys)
        np.maximum.at(x1, lab, xs + 1)
        np.maximum.at(y1, lab, ys + 1)
        idx = [i for i in range(1, n) if area[i] > 0]
        nuclei = [i for i in idx if area[i] >= self.nucleus_min_px]
        # merge nuclear parts whose centroids are close (lobes of one cell), largest first
        nuclei.sort(key=lambda i: -area[i])
        groups: list[list[int]] = []
        for i in nuclei:
            for g in groups:
                if i in seeds and seeds.get(g[0], seeds[i]) != seeds[i]:
                    continue  # split from a touching cell: never merged back
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
        for i in rest:
            hit = None
            for k, (bx0, by0, bx1, by1) in enumerate(boxes):
                a = self.absorb_px
                if bx0 - a <= cx[i] <= bx1 + a and by0 - a <= cy[i] <= by1 + a:
                    hit = k
                    break
            if hit is not None:
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
        return out

    def _platelets(self, s: np.ndarray, tp: float, nuclei: list[Cell]) -> list[Cell]:
        """Platelets: components of ``s > tp`` with a stained area in the platelet range,
        compact (at least ``platelet_min_fill`` of their box), on the glass, and not within
        ``platelet_clear_um`` of a nucleated cell's box (granules of its cytoplasm)."""
        mask = (s > int(round(tp * 100))).astype(np.uint8)
        if self._popen is not None:
            mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, self._popen)
        n, _, stats, cents = cv2.connectedComponentsWithStats(mask, connectivity=8)
        if n <= 1:
            return []
        k = self.scale
        um2 = self.work_um**2
        a = self.cfg.platelet_clear_um / self.pixel_size_um
        boxes = [(c.x - a, c.y - a, c.x + c.w + a, c.y + c.h + a) for c in nuclei]
        area = stats[:, cv2.CC_STAT_AREA]
        bw = stats[:, cv2.CC_STAT_WIDTH]
        bh = stats[:, cv2.CC_STAT_HEIGHT]
        fill = area / np.maximum(bw * bh, 1)
        ok = (area >= self.platelet_min_px) & (area <= self.platelet_max_px)
        ok &= fill >= self.cfg.platelet_min_fill
        if self.cfg.platelet_min_glass > 0 and ok.any():
            # platelets lie on the glass: the share of glass pixels in a square of
            # platelet_context_um around the centroid (red-cell debris lies on red cells)
            glass = self._on_glass.astype(np.float32)
            ctx = max(3, int(round(self.cfg.platelet_context_um / self.work_um)) | 1)
            share = cv2.blur(glass, (ctx, ctx))
            iy = np.clip(cents[:, 1].round().astype(int), 0, s.shape[0] - 1)
            ix = np.clip(cents[:, 0].round().astype(int), 0, s.shape[1] - 1)
            ok &= share[iy, ix] >= self.cfg.platelet_min_glass
        out: list[Cell] = []
        for i in np.nonzero(ok[1:])[0] + 1:
            cx, cy = (cents[i, 0] + 0.5) * k, (cents[i, 1] + 0.5) * k
            if any(x0 <= cx <= x1 and y0 <= cy <= y1 for x0, y0, x1, y1 in boxes):
                continue
            out.append(
                Cell(
                    PLATELET,
                    float(cx),
                    float(cy),
                    int(stats[i, cv2.CC_STAT_LEFT] * k),
                    int(stats[i, cv2.CC_STAT_TOP] * k),
                    int(bw[i] * k),
                    int(bh[i] * k),
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
                fill = np.zeros(nh, bool)
                fill[small_holes] = True
                body[fill[hl]] = 1
        dist = cv2.distanceTransform(body, cv2.DIST_L2, 3)
        r = self.rbc_r_px
        ksz = 2 * int(r) + 1
        peaks = (dist >= r) & (dist >= cv2.dilate(dist, np.ones((ksz, ksz), np.uint8)))
        npk, _ = cv2.connectedComponents(peaks.astype(np.uint8), connectivity=8)
        return int(npk - 1)

    def __call__(self, frame: np.ndarray) -> Detections:
        return self.detect(frame)


def cut_crop(frame: np.ndarray, cx: float, cy: float, size: int) -> np.ndarray:
    """A ``size x size`` crop centred on (cx, cy); reflected at the frame's edges."""
    h, w = frame.shape[:2]
    size = int(size)
    if size <= 0:
        raise EdgecellsError(f"crop size must be > 0 pixels, got {size}")
    x0 = int(round(cx - size / 2))
    y0 = int(round(cy - size / 2))
    x1, y1 = x0 + size, y0 + size
    if x0 >= 0 and y0 >= 0 and x1 <= w and y1 <= h:
        return frame[y0:y1, x0:x1]
    pad_l, pad_t = max(0, -x0), max(0, -y0)
    pad_r, pad_b = max(0, x1 - w), max(0, y1 - h)
    inner = frame[max(0, y0) : min(h, y1), max(0, x0) : min(w, x1)]
    if inner.size == 0:
        raise EdgecellsError(f"crop centre ({cx:.0f}, {cy:.0f}) lies outside the frame")
    mode = cv2.BORDER_REFLECT_101 if min(inner.shape[:2]) > 1 else cv2.BORDER_REPLICATE
    try:
        return cv2.copyMakeBorder(inner, pad_t, pad_b, pad_l, pad_r, mode)
    except cv2.error:
        return cv2.copyMakeBorder(inner, pad_t, pad_b, pad_l, pad_r, cv2.BORDER_REPLICATE)
