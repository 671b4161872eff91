"""Knowing what it does not know: calibrated confidences, the per-cell out-of-distribution
score and the slide-level domain check (device side; numpy only).

* **Calibration.** The model's probabilities are temperature-scaled with the bundle's
  ``thresholds.ood.temperature`` ``T`` (fitted on the validation split at convert time):
  ``softmax(z / T) = p^(1/T) / sum(p^(1/T))``, computed from the probabilities themselves
  (an int8 model's zero outputs are floored at half a quantization step first).
* **Per-cell score.** ``1 - max calibrated probability`` (maximum softmax after
  temperature scaling, chosen over energy and feature distance by the leave-one-class-out
  test in ``benchmarks/RESULTS.md``). A cell whose score exceeds
  ``thresholds.ood.threshold`` is ``unidentified``.
* **Domain check.** :class:`DomainCheck` compares what a session saw — the frames' stain
  statistics, the focus of the model inputs and, when the session has a pixel-size
  estimate, the configured pixel size — with the ranges the
  bundle recorded from its validation data (``thresholds.domain``). A slide outside them is
  flagged REVIEW with the reason, never POSITIVE or NEGATIVE.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

DEFAULT_MAX_SCALE_RATIO = 1.2  # configured vs estimated pixel size
PROB_FLOOR = 1.0 / 512  # half of an int8 softmax's quantization step (1/256)


def calibrate(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature-scaled probabilities ``softmax(log(p) / T)`` (rows sum to 1)."""
    p = np.asarray(probs, dtype=np.float64)
    if temperature == 1.0 or len(p) == 0:
        return p
    logp = np.log(np.maximum(p, PROB_FLOOR)) / float(temperature)
    logp -= logp.max(axis=1, keepdims=True)
    e = np.exp(logp)
    return e / e.sum(axis=1, keepdims=True)


def ood_score(calibrated: np.ndarray) -> np.ndarray:
    """Per-cell out-of-distribution score: ``1 - max calibrated probability``."""
    if len(calibrated) == 0:
        return np.zeros(0)
    return 1.0 - np.asarray(calibrated).max(axis=1)


def input_focus(batch: np.ndarray) -> np.ndarray:
    """Variance of the Laplacian of each model input (N x S x S x 3 uint8), grey."""
    out = np.empty(len(batch))
    for i, x in enumerate(batch):
        grey = cv2.cvtColor(np.ascontiguousarray(x), cv2.COLOR_RGB2GRAY)
        _, std = cv2.meanStdDev(cv2.Laplacian(grey, cv2.CV_16S, ksize=1))
        out[i] = float(std[0, 0]) ** 2
    return out


class _Reservoir:
    """A bounded sample of a stream of numbers (median without keeping everything)."""

    def __init__(self, cap: int = 4096, seed: int = 0) -> None:
        self.cap = cap
        self.n = 0
        self.values: list[float] = []
        self.rng = np.random.default_rng(seed)

    def add(self, v: float) -> None:
        self.n += 1
        if len(self.values) < self.cap:
            self.values.append(float(v))
        else:
            j = int(self.rng.integers(0, self.n))
            if j < self.cap:
                self.values[j] = float(v)

    def median(self) -> float | None:
        return float(np.median(self.values)) if self.values else None


@dataclass
class DomainCheck:
    """Accumulates a session's domain statistics; :meth:`verdict` compares them with the
    bundle's ``thresholds.domain`` (an empty dict: no check)."""

    domain: dict[str, Any]
    min_frames: int = 3
    min_cells: int = 20
    stain: list[_Reservoir] = field(default_factory=lambda: [_Reservoir() for _ in range(3)])
    focus: _Reservoir = field(default_factory=_Reservoir)
    pixel_size_estimate_um: float | None = None  # set by a session that estimates it

    def add_frame(self, stain_mean: Any) -> None:
        if stain_mean is None:
            return
        for r, v in zip(self.stain, stain_mean):
            r.add(v)

    def add_cells(self, focus: Any) -> None:
        for v in focus:
            self.focus.add(v)

    def measurements(self, configured_pixel_um: float | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {
            "stain_mean_lab": [r.median() for r in self.stain],
            "input_focus": self.focus.median(),
            "frames": self.stain[0].n,
            "cells": self.focus.n,
        }
        if self.pixel_size_estimate_um is not None:
            d["pixel_size_estimate_um"] = self.pixel_size_estimate_um
            d["pixel_size_configured_um"] = configured_pixel_um
        return d

    def verdict(self, configured_pixel_um: float | None = None) -> list[str]:
        """Reasons the slide is unlike the bundle's validation data ([] = in range)."""
        dom = self.domain or {}
        reasons: list[str] = []
        # scale: only from a pixel-size estimate the session has (red-cell diameters);
        # detected nucleus sizes were measured too unreliable to stand in for one
        if self.pixel_size_estimate_um and configured_pixel_um:
            ratio = configured_pixel_um / self.pixel_size_estimate_um
            lim = float(dom.get("max_scale_ratio", DEFAULT_MAX_SCALE_RATIO))
            if not 1 / lim <= ratio <= lim:
                reasons.append(
                    f"scale off by {ratio:.2g}x (configured pixel size {configured_pixel_um:g} "
                    f"um, estimated {self.pixel_size_estimate_um:.3g} um)"
                )
        stain = dom.get("stain_mean_lab")
        if stain and self.stain[0].n >= self.min_frames:
            med = [r.median() for r in self.stain]
            out = [
                f"{ch} {m:.1f} (model's data {lo:.1f}..{hi:.1f})"
                for ch, m, lo, hi in zip(("L*", "a*", "b*"), med, stain["low"], stain["high"])
                if m is not None and not lo <= m <= hi
            ]
            if out:
                reasons.append("stain unlike the model's training data: " + ", ".join(out))
        focus = dom.get("input_focus")
        med = self.focus.median()
        if focus and med is not None and self.focus.n >= self.min_cells:
            lo, hi = float(focus["low"]), float(focus["high"])
            if med < lo:
                reasons.append(f"cells blurrier than the model's data (focus {med:.0f} < {lo:.0f})")
            elif med > hi:
                reasons.append(
                    f"cells sharper or noisier than the model's data (focus {med:.0f} > {hi:.0f})"
                )
        return reasons
