"""Per-frame quality gates: a frame that fails one is skipped (not classified), the reason
counted in the session's report.

Gates, in the order they run (thresholds in ``config.toml [quality]``):

``exposure``  fraction of pixels with any channel at 0 or 255 above ``clipped_max``.
``focus``     variance of the Laplacian of the grey frame below ``focus_min`` (blurred).
``stain``     the frame's stained-pixel statistics (from the stain normalizer) cannot be
              used (all glass, saturated, flat), or their mean lies farther than
              ``stain_max_distance`` from the bundle's target, measured in the target's
              standard deviations and averaged over L*, a*, b*.
``empty``     fewer than ``empty_min_cells`` cells (nucleated, platelets, red) detected.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from edgecells.edge.config import QualityConfig

GATES = ("exposure", "focus", "stain", "empty")


@dataclass
class FrameQuality:
    """Measurements of one frame and the first gate it failed (None: passed)."""

    focus: float = 0.0
    clipped: float = 0.0
    stain_distance: float = 0.0
    failed: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.failed is None


def focus_measure(frame: np.ndarray) -> float:
    """Variance of the Laplacian of the grey frame (higher = sharper)."""
    grey = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    lap = cv2.Laplacian(grey, cv2.CV_16S, ksize=1)
    _, std = cv2.meanStdDev(lap)
    return float(std[0, 0]) ** 2


def clipped_fraction(frame: np.ndarray) -> float:
    """Fraction of pixels with any channel at 0 or 255."""
    n = frame.shape[0] * frame.shape[1]
    inside = cv2.inRange(frame, (1, 1, 1), (254, 254, 254))  # 255 where no channel clips
    return float(n - cv2.countNonZero(inside)) / max(1, n)


def stain_distance(stats: Any, target: Any) -> float:
    """Mean over L*, a*, b* of |frame mean - target mean| / target std."""
    d = 0.0
    for m, t, s in zip(stats.mean, target.mean, target.std):
        d += abs(m - t) / max(s, 1e-6)
    return d / 3.0


class QualityGate:
    """Runs the gates; ``check_pixels`` before detection, ``check_stain`` and
    ``check_cells`` after the stain statistics and the detection."""

    def __init__(self, config: QualityConfig | None = None) -> None:
        self.cfg = config or QualityConfig()

    def check_pixels(self, frame: np.ndarray) -> FrameQuality:
        q = FrameQuality(clipped=clipped_fraction(frame))
        if q.clipped > self.cfg.clipped_max:
            q.failed = "exposure"
            q.detail = f"{q.clipped:.1%} clipped pixels (max {self.cfg.clipped_max:.1%})"
            return q
        q.focus = focus_measure(frame)
        if q.focus < self.cfg.focus_min:
            q.failed = "focus"
            q.detail = f"variance of Laplacian {q.focus:.1f} < {self.cfg.focus_min}"
        return q

    def check_stain(self, q: FrameQuality, stats: Any, target: Any) -> FrameQuality:
        if stats is None:
            return q
        if not stats.ok:
            q.failed = "stain"
            q.detail = str(stats.reason)
            return q
        if target is not None:
            q.stain_distance = stain_distance(stats, target)
            if q.stain_distance > self.cfg.stain_max_distance:
                q.failed = "stain"
                q.detail = (
                    f"stain {q.stain_distance:.2f} target std away "
                    f"(max {self.cfg.stain_max_distance})"
                )
        return q

    def check_cells(self, q: FrameQuality, n_cells: int) -> FrameQuality:
        if n_cells < self.cfg.empty_min_cells:
            q.failed = "empty"
            q.detail = f"{n_cells} cells found (min {self.cfg.empty_min_cells})"
        return q


class QualityTally:
    """Counts of frames passed and failed per gate (for the report)."""

    def __init__(self) -> None:
        self.passed = 0
        self.failed: Counter[str] = Counter()
        self.unreadable = 0

    def count(self, status: str, reason: str = "") -> None:
        """One frame: ``status`` "ok" passed; else skipped for ``reason`` (a gate's name
        or "unreadable")."""
        if status == "ok":
            self.passed += 1
        elif reason == "unreadable":
            self.unreadable += 1
        else:
            self.failed[reason] += 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "failed": {g: int(self.failed.get(g, 0)) for g in GATES},
            "unreadable": self.unreadable,
        }
