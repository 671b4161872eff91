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


def _fake_bundle(fpr: float = 0.0):
    from types import SimpleNamespace

    classes = ["erythroblast", "ig", "lymphocyte", "neutrophil", "platelet"]
    return SimpleNamespace(
        classes=classes,
        abnormal_classes=["erythroblast", "ig"],
        thresholds={
            "min_confidence": 0.5,
            "screening": {
                "min_cells": 100,
                "abnormal_fraction": 0.03,
                "confidence": 0.95,
                "false_positive_rate": fpr,
            },
        },
    )


def test_simulated_slides_perfect_and_noisy_classifier() -> None:
    from edgecells.training.slides import simulate

    truth = ["ig"] * 50 + ["erythroblast"] * 50 + ["neutrophil"] * 300 + ["lymphocyte"] * 100
    truth += ["platelet"] * 40
    res = simulate(_fake_bundle(), None, list(truth), truth, 100, 200, [0.02, 0.1], seed=1)
    normal, two, ten = res["conditions"]
    assert normal["specificity"] == 1.0 and ten["sensitivity"] == 1.0
    assert normal["slides"] == 100 and res["cell_false_positive_rate"] == 0.0
    assert 0.0 <= two["sensitivity"] < 1.0  # 4 abnormal of 200 is below 3% with confidence
    # a classifier calling 5% of normal cells abnormal: the rule must allow for it
    noisy = list(truth)
    normals = [i for i, t in enumerate(truth) if t in ("neutrophil", "lymphocyte")]
    for i in normals[::20]:
        noisy[i] = "ig"
    naive = simulate(_fake_bundle(0.0), None, noisy, truth, 100, 200, [0.1], seed=2)
    aware = simulate(_fake_bundle(0.05), None, noisy, truth, 100, 200, [0.1], seed=2)
    assert naive["conditions"][0]["specificity"] < 0.8
    assert aware["conditions"][0]["specificity"] >= 0.95
    assert aware["conditions"][1]["sensitivity"] >= 0.5


def test_evaluate_screening_command_on_fixtures(tmp_path) -> None:  # noqa: ANN001
    import json
    from pathlib import Path

    from runtime_bundle import make_bundle
    from typer.testing import CliRunner

    from edgecells.cli import app

    b = make_bundle(tmp_path / "tiny")
    pbc = Path(__file__).parent / "fixtures" / "pbc"
    r = CliRunner().invoke(
        app,
        [
            "evaluate",
            "screening",
            str(b),
            "--data",
            str(pbc),
            "--slides",
            "20",
            "--backend",
            "onnxruntime",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert [c["name"] for c in d["conditions"]] == [
        "normal",
        "abnormal 2%",
        "abnormal 5%",
        "abnormal 10%",
    ]
    for c in d["conditions"]:
        assert c["POSITIVE"] + c["NEGATIVE"] + c["INSUFFICIENT"] == 20
    r = CliRunner().invoke(app, ["evaluate", "screening", str(b), "--data", str(tmp_path)])
    assert r.exit_code != 0 and "splits.csv" in r.output


def test_detector_and_classifier_must_agree_on_the_kind() -> None:
    from edgecells.edge.pipeline import agree_with_detector

    labels = ["eosinophil", "platelet", "platelet", "ig", UNIDENTIFIED]
    kinds = ["platelet", "nucleated", "platelet", "nucleated", "platelet"]
    assert agree_with_detector(labels, kinds) == [
        UNIDENTIFIED,
        UNIDENTIFIED,
        "platelet",
        "ig",
        UNIDENTIFIED,
    ]


def test_config_overrides_are_none_unless_set() -> None:
    """No sentinel values: a [screening] key left out is None (the bundle's value)."""
    from edgecells.edge.config import config_from_dict, dump_config

    th = {"min_confidence": 0.6, "screening": {"min_cells": 150, "abnormal_fraction": 0.03}}
    cfg = config_from_dict({})
    assert cfg.screening == ScreeningConfig()
    assert all(v is None for v in vars(cfg.screening).values())
    assert "# threshold = (the bundle's value)" in dump_config(cfg)
    assert ScreeningRule.from_bundle(th, cfg.screening).min_cells == 150
    cfg = config_from_dict({"screening": {"min_cells": 40, "threshold": 0}})
    r = ScreeningRule.from_bundle(th, cfg.screening)
    assert (r.min_cells, r.threshold, r.min_confidence) == (40, 0.0, 0.6)  # 0 is a value
    for bad in ({"threshold": -1.0}, {"min_cells": 0}, {"confidence": 0.3}):
        with pytest.raises(EdgecellsError, match="screening"):
            config_from_dict({"screening": bad})
