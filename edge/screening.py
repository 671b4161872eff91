"""Per-slide screening: differential count, abnormal fraction with a Wilson CI, the flag.

The rule (configurable; values from ``config.toml [screening]`` or else the bundle's
``thresholds``):

* Each classified cell gets the top-1 class of its probabilities after temperature
  scaling (``temperature``, fitted on the validation split; :mod:`.ood`). A cell whose
  out-of-distribution score ``1 - max calibrated probability`` exceeds ``ood_threshold``
  (fitted on the validation split), or whose calibrated top probability is below
  ``min_confidence``, is **unidentified**: counted and shown for review, never forced
  into a class. So is a cell whose class contradicts the detector's kind
  (:func:`edgecells.edge.pipeline.agree_with_detector`).
* The differential counts the identified **nucleated** cells: every class except the
  non-nucleated ones (:data:`NON_NUCLEATED`, platelets). ``n`` is their number, ``k``
  how many fall in an abnormal class of the bundle's mapping; the abnormal fraction is
  ``k / n`` with a two-sided 95% Wilson score interval.
* ``INSUFFICIENT`` when fewer than ``min_cells`` cells were classified (identified
  nucleated plus unidentified: a manual differential counts what it cannot name too;
  default 100).
* ``REVIEW`` when the slide is unlike the model's validation data (stain, scale, focus:
  ``domain_reasons`` from :class:`edgecells.edge.ood.DomainCheck`) — never POSITIVE or
  NEGATIVE then.
* ``POSITIVE`` when the abnormal fraction exceeds ``threshold`` *with
  confidence*, allowing for the classifier's own per-cell false-positive rate ``f``
  (normal cells called abnormal, stored in the bundle): a slide whose true abnormal
  fraction is exactly ``threshold`` would show an observed fraction of about
  ``q = threshold + (1 - threshold) * f``; the flag is POSITIVE when the one-sided Wilson
  lower bound of ``k / n`` at ``confidence`` exceeds ``q``.
* ``REVIEW`` when the unidentified share ``u / (n + u)`` is too high: its one-sided
  Wilson lower bound exceeds ``max_unidentified_fraction + (1 -
  max_unidentified_fraction) * unidentified_rate`` (the share a slide with exactly
  ``max_unidentified_fraction`` unknown cells would show, given the per-cell unidentified
  rate on known cells, both fitted on validation data) — an unknown cell may be a blast.
* Otherwise ``NEGATIVE``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

from edgecells.edge.errors import EdgecellsError

POSITIVE = "POSITIVE"
NEGATIVE = "NEGATIVE"
INSUFFICIENT = "INSUFFICIENT"
REVIEW = "REVIEW"
FLAGS = (POSITIVE, NEGATIVE, REVIEW, INSUFFICIENT)
NON_NUCLEATED = ("platelet", "platelets", "thrombocyte")  # left out of the differential
UNIDENTIFIED = "unidentified"


def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes in ``n`` trials (``(0, 1)`` when n = 0)."""
    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= k <= n:
        raise ValueError(f"wilson_interval: need 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    z2 = z * z
    den = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / den
    lo = 0.0 if k == 0 else max(0.0, centre - half)  # exact ends, no 1e-17 residues
    hi = 1.0 if k == n else min(1.0, centre + half)
    return (lo, hi)


def wilson_lower(k: int, n: int, confidence: float) -> float:
    """One-sided Wilson lower bound at ``confidence`` (0 when n = 0)."""
    if n <= 0:
        return 0.0
    z = NormalDist().inv_cdf(confidence)
    return wilson_interval(k, n, z)[0]


def _finite(name: str, v: float, lo: float, hi: float, hi_open: bool = False) -> None:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and lo <= v and (v < hi if hi_open else v <= hi)
    if not ok:
        end = ")" if hi_open else "]"
        raise EdgecellsError(f"screening: {name} must be in [{lo}, {hi}{end}, got {v!r}")


@dataclass
class ScreeningRule:
    """The flag's parameters (see the module docstring)."""

    min_cells: int = 100
    threshold: float = 0.05
    confidence: float = 0.95
    min_confidence: float = 0.5
    false_positive_rate: float = 0.0
    temperature: float = 1.0
    ood_threshold: float = 1.0  # 1.0: no cell is unidentified by its score alone
    max_unidentified_fraction: float = 1.0  # 1.0: no REVIEW for unidentified cells
    unidentified_rate: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.min_cells, bool) or not isinstance(self.min_cells, int):
            raise EdgecellsError(f"screening: min_cells must be an integer, got {self.min_cells!r}")
        if self.min_cells < 1:
            raise EdgecellsError(f"screening: min_cells must be >= 1, got {self.min_cells}")
        _finite("threshold", self.threshold, 0, 1, hi_open=True)
        _finite("confidence", self.confidence, 0.5, 1, hi_open=True)
        _finite("min_confidence", self.min_confidence, 0, 1)
        _finite("false_positive_rate", self.false_positive_rate, 0, 1, hi_open=True)
        _finite("temperature", self.temperature, 0.05, 20)
        _finite("ood_threshold", self.ood_threshold, 0, 1)
        _finite("max_unidentified_fraction", self.max_unidentified_fraction, 0, 1)
        _finite("unidentified_rate", self.unidentified_rate, 0, 1, hi_open=True)

    @property
    def decision_fraction(self) -> float:
        """The observed fraction a slide exactly at ``threshold`` would show."""
        t, f = self.threshold, self.false_positive_rate
        return t + (1 - t) * f

    @property
    def unidentified_decision(self) -> float:
        """The unidentified share a slide with ``max_unidentified_fraction`` unknown cells
        would show."""
        t, u = self.max_unidentified_fraction, self.unidentified_rate
        return t + (1 - t) * u

    @classmethod
    def from_bundle(cls, thresholds: dict[str, Any], overrides: Any = None) -> ScreeningRule:
        """From a bundle's ``thresholds``; ``overrides`` a ScreeningConfig (None = keep)."""
        s = dict(thresholds.get("screening", {}) or {})
        o = dict(thresholds.get("ood", {}) or {})
        try:
            rule = cls(
                min_cells=int(s.get("min_cells", 100)),
                threshold=float(s.get("abnormal_fraction", 0.05)),
                confidence=float(s.get("confidence", 0.95)),
                min_confidence=float(thresholds.get("min_confidence", 0.5)),
                false_positive_rate=float(s.get("false_positive_rate", 0.0)),
                temperature=float(o.get("temperature", 1.0)),
                ood_threshold=float(o.get("threshold", 1.0)),
                max_unidentified_fraction=float(s.get("max_unidentified_fraction", 1.0)),
                unidentified_rate=float(s.get("unidentified_rate", 0.0)),
            )
        except (TypeError, ValueError) as exc:
            raise EdgecellsError(
                f"screening: bad value in the bundle's thresholds ({exc})"
            ) from None
        if overrides is not None:
            if overrides.min_cells is not None:
                rule.min_cells = int(overrides.min_cells)
            keys = ("threshold", "confidence", "min_confidence", "false_positive_rate")
            for key in (*keys, "ood_threshold"):
                v = getattr(overrides, key, None)
                if v is not None:
                    setattr(rule, key, float(v))
            rule.__post_init__()
        return rule


@dataclass
class ScreeningResult:
    """A slide's differential and flag."""

    flag: str
    cells: int  # identified nucleated cells (the differential's n)
    abnormal: int
    abnormal_fraction: float
    ci95: tuple[float, float]
    counts: dict[str, int]
    unidentified: int
    platelets: int
    lower_bound: float
    decision_fraction: float
    reason: str
    rule: dict[str, Any] = field(default_factory=dict)
    unidentified_fraction: float = 0.0
    domain_reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ci95"] = [self.ci95[0], self.ci95[1]]
        return d


class Tally:
    """Running counts over a session (cheap to update per cell, resumable)."""

    def __init__(self, classes: Sequence[str], abnormal: Sequence[bool]) -> None:
        if len(classes) != len(abnormal):
            raise EdgecellsError("screening: classes and abnormal flags differ in length")
        self.classes = list(classes)
        self.abnormal = list(abnormal)
        self.counts = dict.fromkeys(self.classes, 0)
        self.unidentified = 0

    def add(self, label: str) -> None:
        if label == UNIDENTIFIED:
            self.unidentified += 1
        elif label in self.counts:
            self.counts[label] += 1
        else:
            raise EdgecellsError(f"screening: unknown class {label!r}")

    def result(self, rule: ScreeningRule, domain_reasons: Sequence[str] = ()) -> ScreeningResult:
        nucleated = [c for c in self.classes if c.lower() not in NON_NUCLEATED]
        n = sum(self.counts[c] for c in nucleated)
        k = sum(self.counts[c] for c, a in zip(self.classes, self.abnormal) if a)
        platelets = sum(self.counts[c] for c in self.classes if c.lower() in NON_NUCLEATED)
        return decide(n, k, rule, dict(self.counts), self.unidentified, platelets, domain_reasons)


def label_cells(
    probs: np.ndarray,
    classes: Sequence[str],
    min_confidence: float,
    temperature: float = 1.0,
    ood_threshold: float = 1.0,
) -> list[str]:
    """Top-1 class per row, or ``unidentified`` when the calibrated top probability is
    below ``min_confidence`` or the OOD score ``1 - top`` exceeds ``ood_threshold``."""
    labels, _ = label_and_confidence(probs, classes, min_confidence, temperature, ood_threshold)
    return labels


def label_and_confidence(
    probs: np.ndarray,
    classes: Sequence[str],
    min_confidence: float,
    temperature: float = 1.0,
    ood_threshold: float = 1.0,
) -> tuple[list[str], np.ndarray]:
    """:func:`label_cells` and the calibrated top probability of each row."""
    from edgecells.edge.ood import calibrate

    if probs.ndim != 2 or probs.shape[1] != len(classes):
        raise EdgecellsError(
            f"screening: probabilities of shape {probs.shape} for {len(classes)} classes"
        )
    cal = calibrate(probs, temperature)
    top = cal.argmax(axis=1) if len(cal) else np.zeros(0, dtype=int)
    conf = cal[np.arange(len(cal)), top] if len(cal) else np.zeros(0)
    keep = (conf >= min_confidence) & (1.0 - conf <= ood_threshold)
    labels = [classes[t] if k else UNIDENTIFIED for t, k in zip(top, keep)]
    return labels, conf


def decide(
    n: int,
    k: int,
    rule: ScreeningRule,
    counts: dict[str, int] | None = None,
    unidentified: int = 0,
    platelets: int = 0,
    domain_reasons: Sequence[str] = (),
) -> ScreeningResult:
    """Apply the flag rule to ``k`` abnormal among ``n`` identified nucleated cells and
    ``unidentified`` cells; ``domain_reasons`` (slide unlike the model's data) force
    REVIEW."""
    frac = k / n if n else 0.0
    ci = wilson_interval(k, n)
    lower = wilson_lower(k, n, rule.confidence)
    q = rule.decision_fraction
    u = unidentified
    seen = n + u
    u_lower = wilson_lower(u, seen, rule.confidence)
    u_q = rule.unidentified_decision
    u_share = f"{u / seen:.0%} of cells unidentified ({u}/{seen})" if seen else ""
    if seen < rule.min_cells:
        flag = INSUFFICIENT
        reason = f"{seen} cells classified, fewer than {rule.min_cells}"
    elif domain_reasons:
        flag = REVIEW
        reason = "; ".join(domain_reasons)
    elif u_lower > u_q:
        flag = REVIEW
        reason = f"{u_share}: lower bound {u_lower:.3f} exceeds {u_q:.3f}"
    elif lower > q:
        flag = POSITIVE
        reason = (
            f"abnormal {k}/{n}: lower {rule.confidence:.0%} bound {lower:.4f} exceeds "
            f"{q:.4f} (threshold {rule.threshold} + false positives {rule.false_positive_rate})"
        )
    else:
        flag = NEGATIVE
        reason = f"abnormal {k}/{n}: lower {rule.confidence:.0%} bound {lower:.4f} <= {q:.4f}"
    return ScreeningResult(
        flag=flag,
        cells=n,
        abnormal=k,
        abnormal_fraction=frac,
        ci95=ci,
        counts=dict(counts or {}),
        unidentified=unidentified,
        platelets=platelets,
        lower_bound=lower,
        decision_fraction=q,
        reason=reason,
        rule=asdict(rule),
        unidentified_fraction=u / seen if seen else 0.0,
        domain_reasons=list(domain_reasons),
    )
