"""Float32 vs int8, per format: what quantization cost, and the drop gate.

Both models of a format run through the device's own backends (edge/backends), so the
figures are what the device will see. Metrics: accuracy, normal-vs-abnormal ROC AUC,
per-class recall, argmax agreement with float, mean and max absolute probability
difference. :func:`gate` fails any int8 model that loses more than ``max_drop``
percentage points of accuracy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edgecells.edge.errors import EdgecellsError


@dataclass
class ModelScores:
    accuracy: float | None
    auc_abnormal: float | None
    recall: dict[str, float] | None


@dataclass
class FormatValidation:
    """One format's float32 vs int8 comparison on ``n`` images."""

    format: str
    n: int
    float32: ModelScores
    int8: ModelScores
    agreement: float
    prob_diff_mean: float
    prob_diff_max: float
    accuracy_drop_pp: float | None
    passed: bool = True
    blame: list[dict[str, Any]] = field(default_factory=list)
    ms_per_image_float32: float | None = None
    ms_per_image_int8: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def scores(
    probs: np.ndarray, y: np.ndarray | None, classes: Sequence[str], abnormal: Sequence[int]
) -> ModelScores:
    """Accuracy, abnormal AUC and per-class recall (None without labels)."""
    from edgecells.edge import metrics

    if y is None or y.size == 0 or np.any(y < 0):
        return ModelScores(None, None, None)
    pred = probs.argmax(axis=1)
    cm = metrics.confusion_matrix(y, pred, len(classes))
    recall = {
        c: round(float(cm[i, i] / cm[i].sum()), 5) if cm[i].sum() else float("nan")
        for i, c in enumerate(classes)
    }
    auc = None
    if abnormal:
        ab = np.zeros(len(classes), dtype=bool)
        ab[list(abnormal)] = True
        y_bin = ab[y]
        if 0 < y_bin.sum() < y_bin.size:
            auc = round(float(metrics.roc_auc(y_bin, metrics.abnormal_score(probs, abnormal))), 5)
    return ModelScores(round(float(metrics.accuracy(y, pred)), 5), auc, recall)


def compare(
    fmt: str,
    p_float: np.ndarray,
    p_int8: np.ndarray,
    y: np.ndarray | None,
    classes: Sequence[str],
    abnormal: Sequence[int],
) -> FormatValidation:
    if p_float.shape != p_int8.shape:
        raise EdgecellsError(f"{fmt}: float and int8 outputs differ in shape")
    s_f = scores(p_float, y, classes, abnormal)
    s_q = scores(p_int8, y, classes, abnormal)
    diff = np.abs(p_float.astype(np.float64) - p_int8.astype(np.float64))
    drop = None
    if s_f.accuracy is not None and s_q.accuracy is not None:
        drop = round((s_f.accuracy - s_q.accuracy) * 100.0, 3)
    return FormatValidation(
        format=fmt,
        n=int(p_float.shape[0]),
        float32=s_f,
        int8=s_q,
        agreement=round(float(np.mean(p_float.argmax(1) == p_int8.argmax(1))), 5),
        prob_diff_mean=round(float(diff.mean()), 6),
        prob_diff_max=round(float(diff.max()), 6),
        accuracy_drop_pp=drop,
    )


def predict_all(
    clf: Any, x: np.ndarray, batch: int = 64, progress: Callable[[int], None] | None = None
) -> tuple[np.ndarray, float]:
    """Probabilities for all of ``x`` and the mean milliseconds per image."""
    import time

    outs = []
    t0 = time.perf_counter()
    for i in range(0, x.shape[0], batch):
        outs.append(clf.predict(x[i : i + batch]))
        if progress:
            progress(min(batch, x.shape[0] - i))
    ms = (time.perf_counter() - t0) * 1000.0 / max(1, x.shape[0])
    return np.concatenate(outs, axis=0), round(ms, 3)


def gate(results: Sequence[FormatValidation], max_drop: float) -> list[str]:
    """Mark each result passed/failed; returns one message per failing format."""
    failures = []
    for r in results:
        r.passed = r.accuracy_drop_pp is None or r.accuracy_drop_pp <= max_drop
        if not r.passed:
            failures.append(
                f"{r.format}: int8 accuracy {r.int8.accuracy:.4f} vs float32 "
                f"{r.float32.accuracy:.4f} (drop {r.accuracy_drop_pp:.2f} pp > "
                f"--max-drop {max_drop:g} pp)"
            )
    return failures
