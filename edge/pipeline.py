"""One frame through the device pipeline, without file output (used by screen, profile
and doctor): quality gates -> stain statistics -> detect -> crops -> one inference batch
-> labels. :mod:`.session` adds the files, counts and resume on top.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgecells.edge.config import Config
from edgecells.edge.detect import NUCLEATED, CellDetector
from edgecells.edge.errors import EdgecellsError
from edgecells.edge.latency import LatencyStats
from edgecells.edge.ood import calibrate, input_focus
from edgecells.edge.preprocess import field_side_px, prepare_cell
from edgecells.edge.quality import FrameQuality, QualityGate
from edgecells.edge.screening import (
    NON_NUCLEATED,
    UNIDENTIFIED,
    ScreeningRule,
    label_and_confidence,
)
from edgecells.edge.sources.base import Frame

log = logging.getLogger("edgecells.pipeline")


@dataclass
class FrameResult:
    """What happened to one frame (for callers and tests)."""

    index: int
    status: str  # "ok" or "skip"
    reason: str = ""
    cells: list[dict[str, Any]] = field(default_factory=list)
    red_cells: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    stain_stats: Any = None  # the frame's FrameStats the crops were normalized with
    # domain statistics (edge/ood.py DomainCheck): the frame's stained-pixel L*a*b* mean,
    # and the focus of each nucleated cell's model input
    stain_mean: tuple[float, float, float] | None = None
    focus: list[float] = field(default_factory=list)


def agree_with_detector(labels: list[str], kinds: list[str]) -> list[str]:
    """A cell whose class contradicts what the detector found — a platelet-sized detection
    called a nucleated class, or a nucleus called a platelet — is ``unidentified``
    (counted and shown for review, kept out of the differential)."""
    out = []
    for label, kind in zip(labels, kinds):
        if label != UNIDENTIFIED and (label.lower() in NON_NUCLEATED) != (kind != NUCLEATED):
            label = UNIDENTIFIED
        out.append(label)
    return out


class Pipeline:
    """Frame -> classified cells, without any file output (used by screen and profile)."""

    def __init__(self, cfg: Config, bundle: Any, classifier: Any) -> None:
        self.cfg = cfg
        self.bundle = bundle
        self.classifier = classifier
        self.classes: list[str] = list(bundle.classes)
        self.abnormal_mask = np.asarray(bundle.abnormal_mask, dtype=bool)
        self.rule = ScreeningRule.from_bundle(bundle.thresholds, cfg.screening)
        if isinstance(cfg.camera.pixel_size_um, str):  # "auto" not resolved by the caller
            raise EdgecellsError(
                'camera.pixel_size_um is "auto": estimate it first (edge.scale.resolve_pixel_size)'
            )
        self.detector = CellDetector(cfg.detect, cfg.camera.pixel_size_um)
        self.gate = QualityGate(cfg.quality)
        self.target = bundle.load_stain_target()
        self.normalizer = None
        if self.target is not None:
            from edgecells.edge.stain import ReinhardNormalizer

            self.normalizer = ReinhardNormalizer(self.target)
        # every cell is cut at the model's field (µm) and resampled from the camera's pixel
        # size to the model's, then stain-normalized with the crop's own statistics: the
        # same edge.preprocess.prepare_cell that training, calibration and evaluation use
        self.input_size = bundle.input_size
        self.camera_px = float(cfg.camera.pixel_size_um)
        self.model_px = float(bundle.pixel_size_um)
        self.crop_px = field_side_px(self.input_size * self.model_px, self.camera_px)
        self.latency = LatencyStats()

    def abnormal_names(self) -> set[str]:
        return {c for c, a in zip(self.classes, self.abnormal_mask) if a}

    def crop_side(self, w: int, h: int) -> int:
        """The crop's side in camera pixels: the model's field, whatever the cell's size."""
        return self.crop_px

    def process(self, frame: Frame) -> tuple[FrameResult, np.ndarray | None]:
        """Run one frame (already captured; its capture time is added by the caller).

        Returns the result and the crops (N, S, S, 3) that were classified."""
        t: dict[str, float] = {}
        res = FrameResult(frame.index, "skip")
        if frame.image is None:
            res.reason = "unreadable"
            res.timings = t
            return res, None
        img = frame.image
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            res.reason = "unreadable"
            return res, None
        p0 = time.perf_counter()
        q = self.gate.check_pixels(img)
        stats = None
        if q.ok and self.normalizer is not None:
            stats = self.normalizer.frame_stats(img)
            q = self.gate.check_stain(q, stats, self.target)
        p1 = time.perf_counter()
        t["stain"] = (p1 - p0) * 1000
        if not q.ok:
            return self._skip(res, q, t), None
        det = self.detector.detect(img)
        p2 = time.perf_counter()
        t["detect"] = (p2 - p1) * 1000
        res.red_cells = det.red_cells
        q = self.gate.check_cells(q, len(det.cells) + det.red_cells)
        if not q.ok:
            return self._skip(res, q, t), None
        cells = det.cells
        s = self.input_size
        batch = np.empty((len(cells), s, s, 3), dtype=np.uint8)
        sides = [self.crop_side(c.w, c.h) for c in cells]
        for i, c in enumerate(cells):
            batch[i] = prepare_cell(
                img, c.cx, c.cy, self.camera_px, s, self.model_px, self.normalizer
            )
        p3 = time.perf_counter()
        t["crop"] = (p3 - p2) * 1000
        if len(cells):
            probs = np.asarray(self.classifier.predict(batch), dtype=np.float32)
        else:
            probs = np.zeros((0, len(self.classes)), dtype=np.float32)
        p4 = time.perf_counter()
        t["inference"] = (p4 - p3) * 1000
        r = self.rule
        raw_labels, conf = label_and_confidence(
            probs, self.classes, r.min_confidence, r.temperature, r.ood_threshold
        )
        labels = agree_with_detector(raw_labels, [c.kind for c in cells])
        cal = calibrate(probs, r.temperature)
        p_ab = cal[:, self.abnormal_mask].sum(axis=1) if len(cal) else np.zeros(0)
        if stats is not None and getattr(stats, "ok", False):
            res.stain_mean = tuple(float(v) for v in stats.mean)  # type: ignore[assignment]
        nuc = [i for i, c in enumerate(cells) if c.kind == NUCLEATED]
        if nuc:
            res.focus = [float(v) for v in input_focus(batch[nuc])]
        for i, c in enumerate(cells):
            side = sides[i]
            res.cells.append(
                {
                    "frame": frame.index,
                    "cell": i,
                    "x": c.x,  # the detected cell's own box, full-frame pixels
                    "y": c.y,
                    "w": c.w,
                    "h": c.h,
                    "crop_x": int(round(c.cx - side / 2)),  # the square the classifier saw
                    "crop_y": int(round(c.cy - side / 2)),
                    "crop_side": side,
                    "kind": c.kind,
                    "label": labels[i],
                    "confidence": float(conf[i]),
                    "p_abnormal": float(p_ab[i]),
                }
            )
        res.status = "ok"
        res.timings = t
        res.stain_stats = stats
        return res, batch

    def _skip(self, res: FrameResult, q: FrameQuality, t: dict[str, float]) -> FrameResult:
        res.reason = str(q.failed)
        res.timings = t
        log.info("frame %d skipped: %s (%s)", res.index, q.failed, q.detail)
        return res
