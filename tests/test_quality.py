"""Quality gates: focus, exposure, stain, empty field, and their counting."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from edgecells.edge.config import QualityConfig
from edgecells.edge.imageio import read_image
from edgecells.edge.quality import (
    QualityGate,
    QualityTally,
    clipped_fraction,
    focus_measure,
    stain_distance,
)
from edgecells.edge.stain import ReinhardNormalizer, StainTarget

FRAME = Path(__file__).parent / "fixtures" / "bccd" / "JPEGImages" / "BloodImage_00007.jpg"


def test_good_frame_passes() -> None:
    q = QualityGate().check_pixels(read_image(FRAME))
    assert q.ok and q.focus > QualityConfig().focus_min and q.clipped < 0.01


def test_blurred_frame_fails_focus() -> None:
    img = read_image(FRAME)
    blurred = cv2.GaussianBlur(img, (0, 0), 2.0)
    assert focus_measure(blurred) < focus_measure(img) / 2
    q = QualityGate().check_pixels(blurred)
    assert q.failed == "focus" and "Laplacian" in q.detail


def test_overexposed_frame_fails_exposure() -> None:
    img = read_image(FRAME).astype(np.int32)
    bright = np.clip(img * 2, 0, 255).astype(np.uint8)
    assert clipped_fraction(bright) > 0.5
    assert QualityGate().check_pixels(bright).failed == "exposure"


def test_stain_far_from_target_and_unusable_stats() -> None:
    img = read_image(FRAME)
    target = StainTarget.fit([img])
    norm = ReinhardNormalizer(target)
    gate = QualityGate(QualityConfig(stain_max_distance=1.0))
    q = gate.check_stain(gate.check_pixels(img), norm.frame_stats(img), target)
    assert q.ok and q.stain_distance < 0.2
    green = img.copy()
    green[:, :, 1] = (green[:, :, 1].astype(np.int32) * 3 // 4).astype(np.uint8)
    st = norm.frame_stats(green)
    assert stain_distance(st, target) > 1.0
    assert gate.check_stain(gate.check_pixels(green), st, target).failed == "stain"
    glass = np.full((480, 640, 3), 220, np.uint8)
    q = gate.check_stain(gate.check_pixels(glass), norm.frame_stats(glass), target)
    assert q.failed == "stain"


def test_empty_field_and_tally() -> None:
    gate = QualityGate(QualityConfig(empty_min_cells=3))
    t = QualityTally()
    img = read_image(FRAME)
    for q in (
        gate.check_cells(gate.check_pixels(img), 2),
        gate.check_cells(gate.check_pixels(img), 3),
        gate.check_pixels(cv2.GaussianBlur(img, (0, 0), 3)),
    ):
        t.count("ok" if q.ok else "skip", str(q.failed or ""))
    t.count("skip", "unreadable")
    d = t.to_dict()
    assert d["passed"] == 1 and d["failed"]["empty"] == 1 and d["failed"]["focus"] == 1
    assert d["unreadable"] == 1 and sum(d["failed"].values()) == 2
