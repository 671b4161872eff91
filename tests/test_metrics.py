"""edge.metrics against numbers worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgecells.edge import metrics as M
from edgecells.edge.metrics import (
    abnormal_score,
    accuracy,
    balanced_accuracy,
    choose_operating_point,
    confusion_matrix,
    evaluate_probabilities,
    per_class_report,
    roc_auc,
    roc_curve,
    sensitivity_specificity,
)


def test_confusion_accuracy_balanced():
    y = np.array([0, 0, 0, 0, 1, 1, 2])
    p = np.array([0, 0, 0, 1, 1, 0, 2])
    cm = confusion_matrix(y, p, 3)
    assert cm.tolist() == [[3, 1, 0], [1, 1, 0], [0, 0, 1]]
    assert accuracy(y, p) == pytest.approx(5 / 7)
    # recalls 3/4, 1/2, 1/1 -> mean 0.75
    assert balanced_accuracy(cm) == pytest.approx(0.75)
    # a class with no support is left out of the balanced mean
    assert balanced_accuracy(confusion_matrix(y, p, 4)) == pytest.approx(0.75)


def test_per_class_report_by_hand():
    cm = np.array([[3, 1, 0], [1, 1, 0], [0, 0, 1]])
    r = per_class_report(cm, ["a", "b", "c"])
    assert r["a"] == {"precision": 0.75, "recall": 0.75, "f1": 0.75, "support": 4}
    assert r["b"]["precision"] == 0.5 and r["b"]["recall"] == 0.5 and r["b"]["support"] == 2
    assert r["c"]["f1"] == 1.0
    empty = per_class_report(np.zeros((2, 2), dtype=int), ["x", "y"])
    assert empty["x"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_confusion_rejects_out_of_range():
    with pytest.raises(ValueError):
        confusion_matrix(np.array([0, 3]), np.array([0, 1]), 3)


def test_auc_by_hand():
    # positives 0.35, 0.8; negatives 0.1, 0.4. Pairs: (0.35>0.1) (0.35<0.4) (0.8>0.1)
    # (0.8>0.4) -> 3 of 4 = 0.75
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8])
    assert roc_auc(y, s) == pytest.approx(0.75)
    # ties count one half: all scores equal -> 0.5
    assert roc_auc(y, np.full(4, 0.3)) == pytest.approx(0.5)
    # one tie between a positive and a negative: (1 + 1 + 0.5 + 1) / 4
    assert roc_auc(y, np.array([0.1, 0.5, 0.5, 0.9])) == pytest.approx(0.875)
    assert roc_auc(y, -s) == pytest.approx(0.25)
    assert math.isnan(roc_auc(np.zeros(3), np.arange(3)))


def test_roc_curve_matches_auc():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    s = rng.random(200) + 0.3 * y
    fpr, tpr, thr = roc_curve(y, s)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(roc_auc(y, s))


def test_sensitivity_specificity_and_operating_point():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    s = np.array([0.05, 0.2, 0.3, 0.7, 0.25, 0.6, 0.8, 0.9])
    assert sensitivity_specificity(y, s, 0.5) == (0.75, 0.75)
    assert sensitivity_specificity(y, s, 0.0) == (1.0, 0.0)
    # sensitivity 1.0 needs threshold <= 0.25; best specificity there is 2/4 (0.05, 0.2
    # below). The threshold sits between 0.25 and the next lower score 0.2.
    t = choose_operating_point(y, s, 1.0)
    assert t == pytest.approx(0.225)
    assert sensitivity_specificity(y, s, t) == (1.0, 0.5)
    # 75% sensitivity is reached at 0.6 with specificity 3/4
    t = choose_operating_point(y, s, 0.75)
    assert sensitivity_specificity(y, s, t) == (0.75, 0.75)
    assert 0.3 < t < 0.6


def test_abnormal_score_sums_abnormal_classes():
    p = np.array([[0.1, 0.2, 0.7], [0.5, 0.25, 0.25]])
    assert abnormal_score(p, [1, 2]).tolist() == pytest.approx([0.9, 0.5])


def test_evaluate_probabilities_keys_and_values():
    classes = ["n1", "ab", "n2"]
    y = np.array([0, 1, 1, 2])
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7]])
    m = evaluate_probabilities(y, probs, classes, [1], operating_point=0.25, ms_per_image=1.5)
    d = m.to_dict()
    for k in (
        "n", "accuracy", "balanced_accuracy", "auc_abnormal", "sensitivity_abnormal",
        "specificity_abnormal", "operating_point", "per_class", "ms_per_image",
        "confusion_matrix", "classes",
    ):  # fmt: skip
        assert k in d
    assert d["n"] == 4 and d["accuracy"] == 0.75
    assert d["balanced_accuracy"] == pytest.approx((1 + 0.5 + 1) / 3)
    # abnormal scores: positives 0.7, 0.3; negatives 0.1, 0.2 -> AUC 1.0
    assert d["auc_abnormal"] == 1.0
    assert (d["sensitivity_abnormal"], d["specificity_abnormal"]) == (1.0, 1.0)
    assert d["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert d["abnormal_classes"] == ["ab"]
    with pytest.raises(ValueError):
        evaluate_probabilities(y, probs[:, :2], classes, [1], 0.5)


# --------------------------------------------------------------------------- scikit-learn
# The device's metrics are hand-written numpy (no scikit-learn on the device); the host
# toolchain installs scikit-learn, so check them against it on random data with ties.


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_agree_with_scikit_learn(seed: int) -> None:
    skm = pytest.importorskip("sklearn.metrics", reason="scikit-learn is not installed")
    rng = np.random.default_rng(seed)
    k, n = 6, 500
    y = rng.integers(0, k, n)
    pred = np.where(rng.random(n) < 0.7, y, rng.integers(0, k, n))
    pred[pred == 5] = 4  # one class is never predicted: precision undefined there
    cm = M.confusion_matrix(y, pred, k)
    assert (cm == skm.confusion_matrix(y, pred, labels=range(k))).all()
    assert M.accuracy(y, pred) == pytest.approx(skm.accuracy_score(y, pred))
    assert M.balanced_accuracy(cm) == pytest.approx(skm.balanced_accuracy_score(y, pred))
    rep = M.per_class_report(cm, [str(i) for i in range(k)])
    p, r, f, s = skm.precision_recall_fscore_support(y, pred, labels=range(k), zero_division=0.0)
    for i in range(k):
        got = rep[str(i)]
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((p[i], r[i], f[i]))
        assert got["support"] == s[i]
    # scores rounded to 2 decimals: many ties, the case hand-written ROC code gets wrong
    y_bin = rng.random(n) < 0.3
    score = np.round(np.clip(rng.normal(0.4 + 0.3 * y_bin, 0.25), 0, 1), 2)
    assert M.roc_auc(y_bin, score) == pytest.approx(skm.roc_auc_score(y_bin, score))
    fpr, tpr, thr = M.roc_curve(y_bin, score)
    sfpr, stpr, sthr = skm.roc_curve(y_bin, score, drop_intermediate=False)
    assert np.allclose(fpr, sfpr) and np.allclose(tpr, stpr) and np.allclose(thr[1:], sthr[1:])
    for t in (0.2, 0.5, 0.8):
        sens, spec = M.sensitivity_specificity(y_bin, score, t)
        tn, fp, fn, tp = skm.confusion_matrix(y_bin, score >= t).ravel()
        assert (sens, spec) == pytest.approx((tp / (tp + fn), tn / (tn + fp)))
