"""Knowing what it does not know: calibration, the OOD threshold, the REVIEW flag with its
reason, the domain check, val-fitted thresholds and range checks on bundle values."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgecells.edge.bundle import load_bundle
from edgecells.edge.errors import EdgecellsError
from edgecells.edge.ood import DomainCheck, calibrate, input_focus, ood_score
from edgecells.edge.screening import (
    INSUFFICIENT,
    NEGATIVE,
    POSITIVE,
    REVIEW,
    UNIDENTIFIED,
    ScreeningRule,
    decide,
    label_and_confidence,
)
from edgecells.training.abstention import (
    SplitOutputs,
    expected_calibration_error,
    fit_temperature,
    fit_thresholds,
    normal_slide_specificity,
    wilson_upper,
)

TINY = Path(__file__).parent / "fixtures" / "bundle_tiny"
CLASSES = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte",
           "neutrophil", "platelet"]  # fmt: skip


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_calibrate_equals_softmax_of_scaled_logits() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1, (50, 8))  # every p above the int8 floor (1/512)
    p = _softmax(z)
    for t in (0.5, 1.0, 2.5):
        np.testing.assert_allclose(calibrate(p, t), _softmax(z / t), atol=1e-6)
    assert np.allclose(calibrate(p, 2.0).sum(axis=1), 1.0)
    # int8 zeros are floored, not -inf
    q = np.array([[1.0, 0.0, 0.0]])
    assert np.isfinite(calibrate(q, 3.0)).all() and calibrate(q, 0.67)[0, 0] > 0.99
    np.testing.assert_allclose(ood_score(np.array([[0.7, 0.3]])), [0.3])


def test_fit_temperature_recovers_overconfidence_and_lowers_ece() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2.5, (4000, 8))
    y = np.array([rng.choice(8, p=row) for row in _softmax(z / 2.0)])  # truth at T = 2
    p = _softmax(z)  # the model is overconfident by a factor 2
    t = fit_temperature(p, y)
    assert 1.7 < t < 2.3
    assert expected_calibration_error(calibrate(p, t), y) < expected_calibration_error(p, y) / 2


def test_label_and_confidence_uses_ood_threshold_after_temperature() -> None:
    p = np.array([[0.05, 0.9, 0.05, 0, 0, 0, 0, 0], [0.3, 0.4, 0.3, 0, 0, 0, 0, 0]])
    labels, conf = label_and_confidence(p, CLASSES, 0.0, 1.0, ood_threshold=0.5)
    assert labels == ["eosinophil", UNIDENTIFIED]  # score 0.6 > 0.5
    labels, conf = label_and_confidence(p, CLASSES, 0.0, 1.0, ood_threshold=0.7)
    assert labels == ["eosinophil", "eosinophil"]
    _, sharp = label_and_confidence(p, CLASSES, 0.0, 0.5)
    assert sharp[1] > conf[1]  # T < 1 sharpens


def test_flag_states_and_reasons() -> None:
    rule = ScreeningRule(
        min_cells=100, threshold=0.02, false_positive_rate=0.02,
        max_unidentified_fraction=0.02, unidentified_rate=0.03,
    )  # fmt: skip
    r = decide(198, 2, rule, unidentified=2)
    assert r.flag == NEGATIVE and r.reason
    r = decide(180, 30, rule, unidentified=4)
    assert r.flag == POSITIVE and "abnormal 30/180" in r.reason
    r = decide(140, 2, rule, unidentified=60)
    assert r.flag == REVIEW and r.reason.startswith("30% of cells unidentified (60/200)")
    r = decide(50, 2, rule, unidentified=10)
    assert r.flag == INSUFFICIENT and "60 cells" in r.reason
    # a slide unlike the model's data is never POSITIVE or NEGATIVE
    r = decide(180, 30, rule, unidentified=4, domain_reasons=["scale off by 1.6x"])
    assert r.flag == REVIEW and r.reason == "scale off by 1.6x"
    r = decide(198, 0, rule, unidentified=2, domain_reasons=["stain unlike it"])
    assert r.flag == REVIEW


@pytest.mark.parametrize(
    "kw",
    [
        {"min_confidence": math.nan},
        {"min_confidence": 2.0},
        {"ood_threshold": -0.1},
        {"temperature": 0.0},
        {"threshold": math.inf},
    ],
)
def test_rule_refuses_bad_values(kw: dict) -> None:
    with pytest.raises(EdgecellsError, match="screening: "):
        ScreeningRule(**kw)


def test_domain_check_reasons() -> None:
    dom = {
        "stain_mean_lab": {"low": [40.0, 10.0, -40.0], "high": [80.0, 35.0, 10.0]},
        "input_focus": {"low": 200.0, "high": 5000.0},
        "max_scale_ratio": 1.2,
    }
    d = DomainCheck(dom)
    for _ in range(5):
        d.add_frame((60.0, 20.0, -10.0))
    d.add_cells([900.0] * 30)
    assert d.verdict(0.073) == []
    d.pixel_size_estimate_um = 0.073 / 1.6
    (reason,) = d.verdict(0.073)
    assert reason.startswith("scale off by 1.6x")
    blur = DomainCheck(dom)
    for _ in range(5):
        blur.add_frame((60.0, 5.0, -10.0))  # a* below the range
    blur.add_cells([50.0] * 30)
    reasons = blur.verdict(0.073)
    assert any(r.startswith("stain unlike the model's training data: a* 5.0") for r in reasons)
    assert any(r.startswith("cells blurrier") for r in reasons)
    assert DomainCheck({}).verdict(0.073) == []  # a bundle without ranges: no check


def test_input_focus_drops_with_blur() -> None:
    import cv2

    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (1, 64, 64, 3), dtype=np.uint8)
    b = cv2.GaussianBlur(x[0], (0, 0), 2.0)[None]
    assert input_focus(b)[0] < input_focus(x)[0] / 10


def test_specificity_sum_and_upper_bound() -> None:
    assert normal_slide_specificity(100, 0.0, 0.02, 0.95) == 1.0
    lo = normal_slide_specificity(100, 0.03, 0.01, 0.95)
    hi = normal_slide_specificity(100, 0.03, 0.05, 0.95)
    assert 0 < lo < hi <= 1
    assert 0.015 < wilson_upper(15, 1000, 0.95) < 0.03


def test_fit_thresholds_on_synthetic_validation_outputs() -> None:
    b = load_bundle(TINY)
    rng = np.random.default_rng(2)
    n = 3000
    y = rng.integers(0, 8, n)
    z = rng.normal(0, 1, (n, 8))
    z[np.arange(n), y] += 3.0  # about 90% top-1 accuracy
    p = _softmax(z)
    val = SplitOutputs(
        probs=p,
        y=y,
        stain_mean=np.column_stack(
            [rng.normal(60, 3, n), rng.normal(20, 2, n), rng.normal(-12, 3, n)]
        ),
        focus=rng.lognormal(7, 0.3, n),
        split="val",
        source="synthetic val",
    )
    fit = fit_thresholds(b, val, target_unidentified=0.02)
    th = fit["thresholds"]
    assert 0.05 <= th["ood"]["temperature"] <= 20
    assert 0 < th["ood"]["threshold"] < 1
    rep = fit["report"]
    assert 0.01 <= rep["unidentified_rate"] <= 0.04  # about the 2% asked for
    assert rep["ece_after"] <= rep["ece_before"] + 1e-9
    s = th["screening"]
    assert s["false_positive_rate"] >= rep["false_positive_rate"]  # the upper bound
    lo, hi = th["domain"]["stain_mean_lab"]["low"], th["domain"]["stain_mean_lab"]["high"]
    assert lo[0] < 60 < hi[0] and lo[1] < 20 < hi[1]
    assert "val" in s["fitted_on"] and "test" not in s["fitted_on"]


def _bad_bundle(tmp_path: Path, edit) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(TINY, dst)
    m = json.loads((dst / "manifest.json").read_text())
    edit(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


BAD_EDITS = {
    "min_confidence NaN": lambda m: m["thresholds"].__setitem__("min_confidence", math.nan),
    "min_confidence 2.0": lambda m: m["thresholds"].__setitem__("min_confidence", 2.0),
    "string": lambda m: m["thresholds"]["screening"].__setitem__("abnormal_fraction", "0.02"),
    "crop 1e9": lambda m: m["crop"].__setitem__("side_um", 1e9),
    "ood NaN": lambda m: m["thresholds"].__setitem__("ood", {"threshold": math.nan}),
}


@pytest.mark.parametrize("name", list(BAD_EDITS))
def test_bad_bundle_values_are_refused_on_load(tmp_path: Path, name: str) -> None:
    root = _bad_bundle(tmp_path, BAD_EDITS[name])
    with pytest.raises(EdgecellsError) as e:
        load_bundle(root)
    assert "manifest.json" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("cmd", ["bundle info {b}", "screen --bundle {b} --frames 1", "doctor"])
def test_cli_refuses_bad_bundle_with_one_line(tmp_path: Path, cmd: str) -> None:
    root = _bad_bundle(tmp_path, BAD_EDITS["min_confidence 2.0"])
    args = cmd.format(b=root).split()
    if args[0] == "doctor":
        args += ["--bundle", str(root), "--only", "bundle"]
    else:
        args += ["--out", str(tmp_path / "o")] if args[0] == "screen" else []
    proc = subprocess.run(
        [sys.executable, "-m", "edgecells", *args], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode != 0
    err = proc.stderr.strip() or proc.stdout.strip()
    assert "thresholds.min_confidence" in err and "Traceback" not in err


def test_session_reports_flag_reason_and_domain_review(tmp_path: Path) -> None:
    from runtime_bundle import make_bundle

    from edgecells.edge.backends import open_classifier
    from edgecells.edge.config import Config
    from edgecells.edge.imageio import list_images, read_image
    from edgecells.edge.session import Session
    from edgecells.edge.sources import open_source
    from edgecells.edge.stain import StainTarget

    fixtures = Path(__file__).parent / "fixtures"
    target = StainTarget.fit([read_image(p) for p in list_images(fixtures / "pbc")[:24]])
    root = make_bundle(tmp_path / "tiny", stain_target=target.to_dict())
    m = json.loads((root / "manifest.json").read_text())
    m["thresholds"]["screening"]["min_cells"] = 1
    m["thresholds"]["domain"] = {  # a stain range no BCCD frame falls in
        "stain_mean_lab": {"low": [0.0, 60.0, 0.0], "high": [100.0, 90.0, 50.0]},
    }
    (root / "manifest.json").write_text(json.dumps(m))
    b = load_bundle(root)
    clf = open_classifier(b, "onnxruntime", 1, precision="float32")
    out = tmp_path / "out"
    sess = Session(Config(), b, clf, out=out)
    src = open_source(str(fixtures / "bccd" / "JPEGImages"))
    src.open()
    try:
        s = sess.run(src)
    finally:
        src.close()
    assert s["flag"] == REVIEW == s["screening"]["flag"]
    assert s["reason"].startswith("stain unlike the model's training data: a* ")
    assert s["screening"]["domain"]["frames"] == 6
    assert json.loads((out / "summary.json").read_text())["screening"]["reason"] == s["reason"]
    assert "stain unlike the model" in (out / "report.html").read_text()


def test_refit_refuses_too_little_validation_data(tmp_path: Path) -> None:
    from edgecells.training.abstention import refit_bundle

    dst = tmp_path / "b"
    shutil.copytree(TINY, dst)
    before = (dst / "manifest.json").read_text()
    with pytest.raises(EdgecellsError, match="too few to fit"):
        refit_bundle(dst, Path(__file__).parent / "fixtures" / "pbc")
    assert (dst / "manifest.json").read_text() == before  # nothing half-written


def test_shipped_bundle_thresholds_are_fitted_on_validation() -> None:
    b = load_bundle()
    th = b.thresholds
    assert "val split" in th["screening"]["fitted_on"]
    assert "val split" in th["ood"]["fitted_on"] and "test" not in th["ood"]["fitted_on"]
    assert "operating_point" not in th and "per_cell_sensitivity" not in th["screening"]
    rule = ScreeningRule.from_bundle(th)
    assert rule.ood_threshold < 1 and rule.temperature != 1.0
    assert b.thresholds["domain"]["stain_mean_lab"]["low"][0] < 60


def test_evaluate_screening_refuses_other_splits(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "edgecells", "evaluate", "screening", "--data", str(tmp_path),
         "--split", "train"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode != 0 and "--split must be val or test" in proc.stderr
