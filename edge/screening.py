"""Per-slide screening: differential count, abnormal fraction with a Wilson CI, the flag.

The rule (configurable; values from ``config.toml [screening]`` or else the bundle's
``thresholds``):

* Each classified cell gets the top-1 class of its probabilities. A cell whose top
  probability is below ``min_confidence`` is **unidentified**: counted and shown for
  review, never forced into a class. So is a cell whose class contradicts the detector's
  kind (:func:`edgecells.edge.session.agree_with_detector`).
* The differential counts the identified **nucleated** cells: every class except the
  non-nucleated ones (:data:`NON_NUCLEATED`, platelets). ``n`` is their number, ``k``
  how many fall in an abnormal class of the bundle's mapping; the abnormal fraction is
  ``k / n`` with a two-sided 95% Wilson score interval.
* ``INSUFFICIENT`` when ``n < min_cells`` (default 100, as a manual differential).
* Otherwise ``POSITIVE`` when the abnormal fraction exceeds ``threshold`` *with
  confidence*, allowing for the classifier's own per-cell false-positive rate ``f``
  (normal cells called abnormal, stored in the bundle): a slide whose true abnormal
  fraction is exactly ``threshold`` would show an observed fraction of about
  ``q = threshold + (1 - threshold) * f``; the flag is POSITIVE when the one-sided Wilson
  lower bound of ``k / n`` at ``confidence`` exceeds ``q``.
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


@dataclass
class ScreeningRule:
    """The flag's parameters (see the module docstring)."""

    min_cells: int = 100
    threshold: float = 0.05
    confidence: float = 0.95
    min_confidence: float = 0.5
    false_positive_rate: float = 0.0

    def __post_init__(self) -> None:
        if self.min_cells < 1:
            raise EdgecellsError(f"screening: min_cells must be >= 1, got {self.min_cells}")
        if not 0 <= self.threshold < 1:
            raise EdgecellsError(f"screening: threshold must be in [0, 1), got {self.threshold}")
        if not 0.5 <= self.confidence < 1:
            raise EdgecellsError(
                f"screening: confidence must be in [0.5, 1), got {self.confidence}"
            )
        if not 0 <= self.false_positive_rate < 1:
            raise EdgecellsError(
                f"screening: false_positive_rate must be in [0, 1), got {self.false_positive_rate}"
            )

    @property
    def decision_fraction(self) -> float:
        """The observed fraction a slide exactly at ``threshold`` would show."""
        t, f = self.threshold, self.false_positive_rate
        return t + (1 - t) * f

    @classmethod
    def from_bundle(cls, thresholds: dict[str, Any], overrides: Any = None) -> ScreeningRule:
        """From a bundle's ``thresholds``; ``overrides`` a ScreeningConfig (< 0 = keep)."""
        s = dict(thresholds.get("screening", {}) or {})
        rule = cls(
            min_cells=int(s.get("min_cells", 100)),
            threshold=float(s.get("abnormal_fraction", 0.05)),
            confidence=float(s.get("confidence", 0.95)),
            min_confidence=float(thresholds.get("min_confidence", 0.5)),
            false_positive_rate=float(s.get("false_positive_rate", 0.0)),
        )
        if overrides is not None:
            if overrides.min_cells > 0:
                rule.min_cells = int(overrides.min_cells)
            for key in ("threshold", "confidence", "min_confidence", "false_positive_rate"):
                v = getattr(overrides, key)
                if v >= 0:
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

    def result(self, rule: ScreeningRule) -> ScreeningResult:
        nucleated = [c for c in self.classes if c.lower() not in NON_NUCLEATED]
        n = sum(self.counts[c] for c in nucleated)
        k = sum(self.counts[c] for c, a in zip(self.classes, self.abnormal) if a)
        platelets = sum(self.counts[c] for c in self.classes if c.lower() in NON_NUCLEATED)
        return decide(n, k, rule, dict(self.counts), self.unidentified, platelets)


def label_cells(probs: np.ndarray, classes: Sequence[str], min_confidence: float) -> list[str]:
    """Top-1 class per row, or ``unidentified`` below ``min_confidence``."""
    if probs.ndim != 2 or probs.shape[1] != len(classes):
        raise EdgecellsError(
            f"screening: probabilities of shape {probs.shape} for {len(classes)} classes"
        )
    top = probs.argmax(axis=1)
    conf = probs[np.arange(len(probs)), top]
    return [classes[t] if c >= min_confidence else UNIDENTIFIED for t, c in zip(top, conf)]


def decide(
    n: int,
    k: int,
    rule: ScreeningRule,
    counts: dict[str, int] | None = None,
    unidentified: int = 0,
    platelets: int = 0,
) -> ScreeningResult:
    """Apply the flag rule to ``k`` abnormal among ``n`` identified nucleated cells."""
    frac = k / n if n else 0.0
    ci = wilson_interval(k, n)
    lower = wilson_lower(k, n, rule.confidence)
    q = rule.decision_fraction
    if n < rule.min_cells:
        flag = INSUFFICIENT
        reason = f"{n} identified nucleated cells, fewer than {rule.min_cells}"
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
    )


# --------------------------------------------------------------------------- evaluation


def classify_split(
    bundle: Any, classifier: Any, data: Any, tick: Any = None, split: str = "test"
) -> tuple[list[str], list[str]]:
    """Predicted labels (``unidentified`` below the bundle's cut-off) and true labels of
    the PBC images in ``split`` (``data/splits.csv``: path, label, split)."""
    import csv
    from pathlib import Path

    from edgecells.edge.imageio import read_image
    from edgecells.edge.preprocess import prepare_crop

    root = Path(data)
    sp = root / "splits.csv"
    if not sp.is_file():
        raise EdgecellsError(f"{root}: no splits.csv (expected the PBC data folder)")
    with open(sp, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r.get("split") == split]
    if not rows:
        raise EdgecellsError(f"{sp}: no rows in split {split!r}")
    target = bundle.load_stain_target()
    norm = None
    if target is not None:
        from edgecells.edge.stain import ReinhardNormalizer

        norm = ReinhardNormalizer(target)
    rule = ScreeningRule.from_bundle(bundle.thresholds)
    size = bundle.input_size
    labels: list[str] = []
    truth: list[str] = []
    batch_n = 64
    for i in range(0, len(rows), batch_n):
        chunk = rows[i : i + batch_n]
        batch = np.stack([prepare_crop(read_image(root / r["path"]), norm, size) for r in chunk])
        probs = np.asarray(classifier.predict(batch), dtype=np.float32)
        labels += label_cells(probs, bundle.classes, rule.min_confidence)
        truth += [r["label"] for r in chunk]
        if tick is not None:
            tick(len(labels), len(rows))
    return labels, truth


def simulate(
    bundle: Any,
    cfg: Any,
    labels: list[str],
    truth: list[str],
    slides: int,
    cells: int,
    fractions: Sequence[float],
    seed: int = 0,
) -> dict[str, Any]:
    """Simulated slides: ``cells`` nucleated cells drawn (with replacement) from the
    classified test cells; normal slides hold normal cells only, abnormal slides
    ``round(f * cells)`` abnormal cells. Returns flag counts and sensitivity/specificity."""
    rng = np.random.default_rng(seed)
    rule = ScreeningRule.from_bundle(bundle.thresholds, cfg.screening if cfg else None)
    abnormal_set = set(bundle.abnormal_classes)
    nucleated = [i for i, t in enumerate(truth) if t.lower() not in NON_NUCLEATED]
    normal_idx = np.array([i for i in nucleated if truth[i] not in abnormal_set])
    abn_idx = np.array([i for i in nucleated if truth[i] in abnormal_set])
    if len(normal_idx) == 0 or len(abn_idx) == 0:
        raise EdgecellsError("screening evaluation needs normal and abnormal test cells")
    ab_flags = [c in abnormal_set for c in bundle.classes]
    conditions = []
    for f in [0.0, *fractions]:
        k = int(round(f * cells))
        flags = {POSITIVE: 0, NEGATIVE: 0, INSUFFICIENT: 0}
        for _ in range(slides):
            pick = np.concatenate(
                [rng.choice(abn_idx, k), rng.choice(normal_idx, cells - k)]
            ).astype(int)
            t = Tally(bundle.classes, ab_flags)
            for i in pick:
                t.add(labels[i])
            flags[t.result(rule).flag] += 1
        row: dict[str, Any] = {
            "name": "normal" if f == 0 else f"abnormal {f:.0%}",
            "fraction": f,
            "slides": slides,
            **flags,
        }
        if f == 0:
            row["specificity"] = flags[NEGATIVE] / slides
        else:
            row["sensitivity"] = flags[POSITIVE] / slides
        conditions.append(row)
    # per-cell rates on the test split (what the rule has to allow for)
    n_norm = len(normal_idx)
    fp = sum(labels[i] in abnormal_set for i in normal_idx) / n_norm
    tp = sum(labels[i] in abnormal_set for i in abn_idx) / len(abn_idx)
    return {
        "cells_per_slide": cells,
        "slides_per_condition": slides,
        "seed": seed,
        "rule": asdict(rule),
        "cell_false_positive_rate": round(fp, 4),
        "cell_sensitivity": round(tp, 4),
        "unidentified_rate": round(sum(lbl == UNIDENTIFIED for lbl in labels) / len(labels), 4),
        "conditions": conditions,
    }
