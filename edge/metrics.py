"""Classifier metrics in plain numpy (no scikit-learn, no TensorFlow).

Used by host evaluation, the conversion validator (float vs int8) and device
evaluation alike. Binary screening metrics treat "abnormal" as the positive class and
score each cell by its summed abnormal-class probability.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts ``cm[true, pred]`` as an int64 ``num_classes x num_classes`` array."""
    t = np.asarray(y_true, dtype=np.int64).ravel()
    p = np.asarray(y_pred, dtype=np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError("y_true and y_pred differ in length")
    if t.size and (t.min() < 0 or p.min() < 0 or t.max() >= num_classes or p.max() >= num_classes):
        raise ValueError("class index out of range")
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    return cm


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    t = np.asarray(y_true).ravel()
    p = np.asarray(y_pred).ravel()
    return float(np.mean(t == p)) if t.size else float("nan")


def balanced_accuracy(cm: np.ndarray) -> float:
    """Mean recall over the classes that occur (rows with support > 0)."""
    support = cm.sum(axis=1)
    present = support > 0
    if not present.any():
        return float("nan")
    recall = np.diag(cm)[present] / support[present]
    return float(recall.mean())


def per_class_report(cm: np.ndarray, classes: Sequence[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, f1 and support per class (0.0 where undefined)."""
    tp = np.diag(cm).astype(np.float64)
    pred = cm.sum(axis=0).astype(np.float64)
    support = cm.sum(axis=1)
    out: dict[str, dict[str, float]] = {}
    for i, c in enumerate(classes):
        prec = tp[i] / pred[i] if pred[i] else 0.0
        rec = tp[i] / support[i] if support[i] else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        out[c] = {
            "precision": float(prec),
            "recall": float(rec),
            "f1": float(f1),
            "support": int(support[i]),
        }
    return out


def abnormal_score(probs: np.ndarray, abnormal_indices: Sequence[int]) -> np.ndarray:
    """Summed probability of the abnormal classes, one score per cell."""
    p = np.asarray(probs, dtype=np.float64)
    return p[:, list(abnormal_indices)].sum(axis=1)


def roc_curve(y_bin: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points (fpr, tpr, thresholds), predicting positive when ``score >= threshold``.

    Thresholds are the distinct scores in decreasing order, preceded by +inf (the point
    (0, 0)). Needs at least one positive and one negative.
    """
    y = np.asarray(y_bin).astype(bool).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC needs both positive and negative samples")
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    distinct = np.r_[np.nonzero(np.diff(s_sorted))[0], s_sorted.size - 1]
    tps = np.cumsum(y_sorted)[distinct]
    fps = (distinct + 1) - tps
    tpr = np.r_[0.0, tps / n_pos]
    fpr = np.r_[0.0, fps / n_neg]
    thr = np.r_[np.inf, s_sorted[distinct]]
    return fpr, tpr, thr


def roc_auc(y_bin: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve: P(score_pos > score_neg) + 0.5 P(tie). NaN if one-class."""
    y = np.asarray(y_bin).astype(bool).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # Mann-Whitney U with average ranks for ties.
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size, dtype=np.float64)
    s_sorted = s[order]
    starts = np.r_[0, np.nonzero(np.diff(s_sorted))[0] + 1]
    ends = np.r_[starts[1:], s.size]
    avg = (starts + ends - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def sensitivity_specificity(
    y_bin: np.ndarray, score: np.ndarray, threshold: float
) -> tuple[float, float]:
    """Sensitivity and specificity when predicting positive for ``score >= threshold``."""
    y = np.asarray(y_bin).astype(bool).ravel()
    pred = np.asarray(score, dtype=np.float64).ravel() >= threshold
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    sens = float((pred & y).sum() / n_pos) if n_pos else float("nan")
    spec = float((~pred & ~y).sum() / n_neg) if n_neg else float("nan")
    return sens, spec


def choose_operating_point(y_bin: np.ndarray, score: np.ndarray, min_sensitivity: float) -> float:
    """Threshold with sensitivity >= ``min_sensitivity`` and the best specificity.

    Among equally specific thresholds the highest is taken. The returned threshold is
    the midpoint between the chosen score and the next lower distinct score, so it does
    not sit exactly on a validation sample.
    """
    fpr, tpr, thr = roc_curve(y_bin, score)
    ok = np.nonzero(tpr >= min_sensitivity - 1e-12)[0]
    # tpr is non-decreasing along the curve: the first point that reaches the target has
    # the lowest fpr (best specificity) and the highest threshold.
    i = int(ok[0])
    if not np.isfinite(thr[i]):
        i = 1
    lower = thr[i + 1] if i + 1 < thr.size else 0.0
    return float((thr[i] + lower) / 2.0)


@dataclass
class ClassifierMetrics:
    """Evaluation of a classifier on labelled cells (JSON keys as documented)."""

    n: int
    accuracy: float
    balanced_accuracy: float
    auc_abnormal: float
    sensitivity_abnormal: float
    specificity_abnormal: float
    operating_point: float
    per_class: dict[str, dict[str, float]]
    confusion_matrix: list[list[int]]
    classes: list[str]
    abnormal_classes: list[str]
    ms_per_image: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        d.update(extra)
        return d


def evaluate_probabilities(
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    abnormal_indices: Sequence[int],
    operating_point: float,
    ms_per_image: float | None = None,
) -> ClassifierMetrics:
    """All metrics from labels and softmax probabilities (N x C)."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y_true, dtype=np.int64).ravel()
    if p.ndim != 2 or p.shape[0] != y.size or p.shape[1] != len(classes):
        raise ValueError(f"probabilities of shape {p.shape} do not match {y.size} labels")
    pred = p.argmax(axis=1)
    cm = confusion_matrix(y, pred, len(classes))
    ab = np.zeros(len(classes), dtype=bool)
    ab[list(abnormal_indices)] = True
    y_bin = ab[y]
    score = abnormal_score(p, abnormal_indices)
    sens, spec = sensitivity_specificity(y_bin, score, operating_point)
    return ClassifierMetrics(
        n=int(y.size),
        accuracy=accuracy(y, pred),
        balanced_accuracy=balanced_accuracy(cm),
        auc_abnormal=roc_auc(y_bin, score),
        sensitivity_abnormal=sens,
        specificity_abnormal=spec,
        operating_point=float(operating_point),
        per_class=per_class_report(cm, classes),
        confusion_matrix=cm.tolist(),
        classes=list(classes),
        abnormal_classes=[c for c, a in zip(classes, ab) if a],
        ms_per_image=ms_per_image,
    )
