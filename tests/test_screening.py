"""The screening rule at its edges, the Wilson interval, unidentified cells."""

from __future__ import annotations

import numpy as np
import pytest

from edgecells.edge.config import ScreeningConfig
from edgecells.edge.errors import EdgecellsError
from edgecells.edge.screening import (
    INSUFFICIENT,
    NEGATIVE,
    POSITIVE,
    UNIDENTIFIED,
    ScreeningRule,
    Tally,
    decide,
    label_cells,
    wilson_interval,
    wilson_lower,
)

CLASSES = ["erythroblast", "ig", "neutrophil", "platelet"]
ABN = [True, True, False, False]


def test_wilson_known_values() -> None:
    lo, hi = wilson_interval(10, 100)  # textbook: 0.0552 .. 0.1744
    assert lo == pytest.approx(0.05523, abs=1e-4) and hi == pytest.approx(0.17437, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(0, 50)
    assert lo == pytest.approx(0.0, abs=1e-12) and 0.05 < hi < 0.08
    assert wilson_lower(10, 100, 0.95) > lo


def test_insufficient_below_min_cells() -> None:
    rule = ScreeningRule(min_cells=100, threshold=0.05, false_positive_rate=0.0)
    assert decide(99, 99, rule).flag == INSUFFICIENT  # even all abnormal
    assert decide(100, 50, rule).flag == POSITIVE
    assert decide(100, 0, rule).flag == NEGATIVE


def test_positive_edge_is_where_the_lower_bound_crosses() -> None:
    rule = ScreeningRule(min_cells=100, threshold=0.05, confidence=0.95, false_positive_rate=0.02)
    q = rule.decision_fraction
    assert q == pytest.approx(0.05 + 0.95 * 0.02)
    n = 200
    k_first = next(k for k in range(n + 1) if decide(n, k, rule).flag == POSITIVE)
    assert wilson_lower(k_first, n, 0.95) > q >= wilson_lower(k_first - 1, n, 0.95)
    assert decide(n, k_first - 1, rule).flag == NEGATIVE
    # a fraction just above the threshold is not enough: it must exceed it with confidence
    assert decide(n, int(0.08 * n), rule).flag == NEGATIVE


def test_false_positive_rate_raises_the_bar() -> None:
    lax = ScreeningRule(threshold=0.02, false_positive_rate=0.0)
    strict = ScreeningRule(threshold=0.02, false_positive_rate=0.05)
    n = 300
    k_lax = next(k for k in range(n) if decide(n, k, lax).flag == POSITIVE)
    k_strict = next(k for k in range(n) if decide(n, k, strict).flag == POSITIVE)
    assert k_strict > k_lax + 10


def test_label_cells_unidentified_below_cut_off() -> None:
    probs = np.array([[0.7, 0.1, 0.1, 0.1], [0.3, 0.3, 0.25, 0.15], [0, 0, 0.5, 0.5]])
    assert label_cells(probs, CLASSES, 0.5) == ["erythroblast", UNIDENTIFIED, "neutrophil"]
    with pytest.raises(EdgecellsError):
        label_cells(probs[:, :3], CLASSES, 0.5)


def test_tally_leaves_platelets_and_unidentified_out() -> None:
    t = Tally(CLASSES, ABN)
    for label in ["ig"] * 3 + ["neutrophil"] * 97 + ["platelet"] * 40 + [UNIDENTIFIED] * 5:
        t.add(label)
    r = t.result(ScreeningRule(min_cells=100, threshold=0.05))
    assert r.cells == 100 and r.abnormal == 3 and r.platelets == 40 and r.unidentified == 5
    assert r.abnormal_fraction == pytest.approx(0.03)
    assert r.flag == NEGATIVE
    d = r.to_dict()
    assert d["ci95"][0] < 0.03 < d["ci95"][1] and d["counts"]["platelet"] == 40


def test_rule_from_bundle_and_overrides() -> None:
    th = {
        "min_confidence": 0.6,
        "screening": {
            "min_cells": 150,
            "abnormal_fraction": 0.03,
            "confidence": 0.9,
            "false_positive_rate": 0.01,
        },
    }
    r = ScreeningRule.from_bundle(th)
    assert (r.min_cells, r.threshold, r.confidence, r.min_confidence) == (150, 0.03, 0.9, 0.6)
    r2 = ScreeningRule.from_bundle(th, ScreeningConfig(min_cells=50, threshold=0.1))
    assert (r2.min_cells, r2.threshold, r2.false_positive_rate) == (50, 0.1, 0.01)
    with pytest.raises(EdgecellsError):
        ScreeningRule(confidence=1.2)
