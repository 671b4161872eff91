"""Fit what the device needs to say "don't know", on the **validation** split only
(host side): the temperature, the out-of-distribution threshold, the flag's decision
thresholds and per-cell rates, and the domain ranges (stain, focus) of the model's data.

Every image of the split goes through the device path — :func:`prepare_crop` with the
bundle's stain target and the bundle's own int8 model — so the fitted values are those
of what the device computes. ``edgecells convert --validate DIR`` calls
:func:`fit_thresholds` at conversion; ``edgecells bundle refit BUNDLE --data DIR`` refits
an existing bundle without converting again; ``edgecells evaluate screening --split test``
reports the result on the test split.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgecells.edge.errors import EdgecellsError
from edgecells.edge.ood import PROB_FLOOR, calibrate, input_focus
from edgecells.edge.screening import (
    NON_NUCLEATED,
    UNIDENTIFIED,
    ScreeningRule,
    label_cells,
)

TARGET_UNIDENTIFIED = 0.02  # share of known validation cells the OOD threshold gives up
THRESHOLD_CANDIDATES = (0.01, 0.02, 0.03, 0.05, 0.08, 0.1)
MIN_FIT_SPECIFICITY = 0.995  # normal slides of FIT_SLIDE_CELLS cells not flagged
FIT_SLIDE_CELLS = (100, 200)
MIN_FIT_CELLS = 100  # normal nucleated validation cells needed to fit the rates
STAIN_MARGIN = 0.25  # widen the validation range by this share of its width per side
FOCUS_FACTOR = 1.5  # focus range: [p1 / f, p99 * f]


@dataclass
class SplitOutputs:
    """The device path's outputs on one labelled split."""

    probs: np.ndarray  # (N, C) the model's raw probabilities
    y: np.ndarray  # (N,) label index in the bundle's classes
    stain_mean: np.ndarray  # (N, 3) raw stained-pixel L*a*b* means (NaN: not usable)
    focus: np.ndarray  # (N,) variance of the Laplacian of the model input
    split: str
    source: str


def read_split(data: str | Path, split: str) -> list[dict[str, str]]:
    root = Path(data)
    sp = root / "splits.csv"
    if not sp.is_file():
        raise EdgecellsError(f"{root}: no splits.csv (expected the PBC data folder)")
    with open(sp, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r.get("split") == split]
    if not rows:
        raise EdgecellsError(f"{sp}: no rows in split {split!r}")
    return rows


def run_split(
    bundle: Any,
    classifier: Any,
    data: str | Path,
    split: str = "val",
    tick: Callable[[int, int], None] | None = None,
) -> SplitOutputs:
    """Classify every image of ``split`` through the device path."""
    from edgecells.edge.imageio import read_image
    from edgecells.edge.preprocess import prepare_crop

    root = Path(data)
    rows = read_split(root, split)
    unknown = sorted({r["label"] for r in rows} - set(bundle.classes))
    if unknown:
        raise EdgecellsError(f"{root}: labels {', '.join(unknown)} are not classes of the bundle")
    target = bundle.load_stain_target()
    norm = None
    if target is not None:
        from edgecells.edge.stain import ReinhardNormalizer

        norm = ReinhardNormalizer(target)
    size = bundle.input_size
    # the physical field: the data set's measured pixel size and the model's (legacy
    # bundles without one: the whole crop resampled, as they were trained)
    from edgecells.calibration.pixel_sizes import pixel_size_for

    model_px = bundle.preprocessing.get("pixel_size_um")
    data_px = pixel_size_for(root) if model_px else None
    if model_px and data_px is None:
        raise EdgecellsError(
            f"{root}: unknown pixel size (calibration/pixel_sizes.py knows pbc, bccd, "
            "deepbionet, lisc); the bundle cuts cells at a physical field"
        )
    probs, stain, focus = [], [], []
    for i in range(0, len(rows), 64):
        imgs = [read_image(root / r["path"]) for r in rows[i : i + 64]]
        batch = np.stack([prepare_crop(im, norm, size, data_px, model_px) for im in imgs])
        probs.append(np.asarray(classifier.predict(batch), dtype=np.float64))
        focus.append(input_focus(batch))
        for im in imgs:
            st = norm.frame_stats(im) if norm is not None else None
            stain.append(list(st.mean) if st is not None and st.ok else [math.nan] * 3)
        if tick is not None:
            tick(min(i + 64, len(rows)), len(rows))
    return SplitOutputs(
        probs=np.concatenate(probs),
        y=np.array([bundle.classes.index(r["label"]) for r in rows]),
        stain_mean=np.array(stain, dtype=np.float64),
        focus=np.concatenate(focus),
        split=split,
        source=f"{root.name} {split} split ({len(rows)} images)",
    )


# --------------------------------------------------------------------------- calibration


def nll(probs: np.ndarray, y: np.ndarray, temperature: float) -> float:
    cal = calibrate(probs, temperature)
    return float(-np.mean(np.log(np.maximum(cal[np.arange(len(y)), y], 1e-12))))


def fit_temperature(probs: np.ndarray, y: np.ndarray) -> float:
    """The temperature minimizing the negative log-likelihood (golden section on log T)."""
    lo, hi = math.log(0.1), math.log(10.0)
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(probs, y, math.exp(a)), nll(probs, y, math.exp(b))
    for _ in range(40):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(probs, y, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(probs, y, math.exp(b))
    return round(math.exp((lo + hi) / 2), 4)


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """ECE of the top-1 confidence, equal-width bins over (0, 1]."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    e = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            e += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(e)


# --------------------------------------------------------------------------- slides


def simulate_flags(
    labels: Sequence[str],
    pick_sets: Sequence[np.ndarray],
    classes: Sequence[str],
    abnormal: Sequence[bool],
    rule: ScreeningRule,
) -> dict[str, int]:
    """Flag counts of slides, each the cells ``labels[pick]`` of one ``pick`` array."""
    from edgecells.edge.screening import FLAGS, Tally

    out = dict.fromkeys(FLAGS, 0)
    for pick in pick_sets:
        t = Tally(classes, abnormal)
        for i in pick:
            t.add(labels[int(i)])
        out[t.result(rule).flag] += 1
    return out


def wilson_upper(k: int, n: int, confidence: float) -> float:
    """One-sided Wilson upper bound of ``k / n`` at ``confidence`` (0 when n = 0)."""
    from edgecells.edge.screening import wilson_lower

    return 0.0 if n <= 0 else 1.0 - wilson_lower(n - k, n, confidence)


def normal_slide_specificity(n: int, rate: float, threshold: float, confidence: float) -> float:
    """P(a slide of ``n`` cells, each wrong with probability ``rate``, is not flagged):
    the binomial mass of counts whose lower Wilson bound stays <= the decision fraction
    ``threshold + (1 - threshold) * rate``."""
    from edgecells.edge.screening import wilson_lower

    q = threshold + (1 - threshold) * rate
    pmf = [math.comb(n, k) * rate**k * (1 - rate) ** (n - k) for k in range(n + 1)]
    return float(sum(p for k, p in enumerate(pmf) if wilson_lower(k, n, confidence) <= q))


def _smallest_threshold(rate: float, confidence: float) -> float | None:
    for cand in THRESHOLD_CANDIDATES:
        if all(
            normal_slide_specificity(n, rate, cand, confidence) >= MIN_FIT_SPECIFICITY
            for n in FIT_SLIDE_CELLS
        ):
            return cand
    return None


def fit_rule(
    probs: np.ndarray,
    y: np.ndarray,
    classes: Sequence[str],
    ab_mask: np.ndarray,
    base: ScreeningRule,
    target_unidentified: float = TARGET_UNIDENTIFIED,
) -> tuple[ScreeningRule, dict[str, Any]]:
    """Temperature, OOD threshold, per-cell rates and decision thresholds from labelled
    validation outputs (``probs`` the model's raw probabilities, ``y`` class indices)."""
    classes = list(classes)
    t = fit_temperature(probs, y)
    cal = calibrate(probs, t)
    # OOD threshold: the score (1 - calibrated top) of the known validation cells at the
    # (1 - target) quantile: that share of known cells becomes unidentified
    score = 1.0 - cal.max(axis=1)
    ood_t = float(np.quantile(score, 1.0 - target_unidentified, method="higher"))
    ood_t = round(min(max(ood_t, 0.0), 1.0), 6)
    min_conf = base.min_confidence
    labels = label_cells(probs, classes, min_conf, t, ood_t)
    nucleated = np.array([classes[k].lower() not in NON_NUCLEATED for k in y])
    # a nucleated cell called a platelet is unidentified on the device (agree_with_detector)
    labels = [
        UNIDENTIFIED if nuc and lbl.lower() in NON_NUCLEATED else lbl
        for lbl, nuc in zip(labels, nucleated)
    ]
    normal = nucleated & ~ab_mask[y]
    abn = nucleated & ab_mask[y]
    lab_ab = np.array([lbl != UNIDENTIFIED and ab_mask[classes.index(lbl)] for lbl in labels])
    unid = np.array([lbl == UNIDENTIFIED for lbl in labels])
    if normal.sum() < MIN_FIT_CELLS:
        raise EdgecellsError(
            f"{int(normal.sum())} normal nucleated validation cells: too few to fit the flag's "
            f"thresholds (need {MIN_FIT_CELLS})"
        )
    fpr_obs = float(lab_ab[normal].mean()) if normal.any() else 0.0
    sens = float(lab_ab[abn].mean()) if abn.any() else None
    u_obs = float(unid[nucleated].mean()) if nucleated.any() else 0.0
    # the rule allows for the one-sided upper confidence bound of each per-cell rate, not
    # the point estimate: a validation split of ~1,000 normal cells pins a 1.5% rate only
    # to about +-0.7 points, and an optimistic rate costs specificity on new slides
    fpr = wilson_upper(int(lab_ab[normal].sum()), int(normal.sum()), base.confidence)
    u_rate = wilson_upper(int(unid[nucleated].sum()), int(nucleated.sum()), base.confidence)
    # decision thresholds: the smallest candidate for which a normal slide of 100 and
    # of 200 cells, whose cells err at the upper-bound rate, stays below the decision
    # fraction with probability >= MIN_FIT_SPECIFICITY (exact binomial sum)
    chosen_t = _smallest_threshold(fpr, base.confidence)
    chosen_u = _smallest_threshold(u_rate, base.confidence)
    if chosen_t is None or chosen_u is None or max(fpr, u_rate) >= 0.5:
        raise EdgecellsError(
            f"no decision threshold up to {THRESHOLD_CANDIDATES[-1]} keeps normal slides "
            f"NEGATIVE {MIN_FIT_SPECIFICITY:.1%} of the time (per-cell false-positive rate "
            f"{fpr:.1%}, unidentified {u_rate:.1%})"
        )
    rule = ScreeningRule(
        min_cells=base.min_cells,
        threshold=chosen_t,
        confidence=base.confidence,
        min_confidence=min_conf,
        false_positive_rate=round(fpr, 5),
        temperature=t,
        ood_threshold=ood_t,
        max_unidentified_fraction=chosen_u,
        unidentified_rate=round(u_rate, 5),
    )
    report = {
        "temperature": t,
        "ece_before": round(expected_calibration_error(probs, y), 4),
        "ece_after": round(expected_calibration_error(cal, y), 4),
        "nll_before": round(nll(probs, y, 1.0), 4),
        "nll_after": round(nll(probs, y, t), 4),
        "ood_threshold": ood_t,
        "unidentified_rate": round(u_obs, 4),
        "unidentified_rate_upper": round(u_rate, 4),
        "false_positive_rate": round(fpr_obs, 4),
        "false_positive_rate_upper": round(fpr, 4),
        "per_cell_sensitivity": None if sens is None else round(sens, 4),
        "abnormal_fraction": chosen_t,
        "max_unidentified_fraction": chosen_u,
        "prob_floor": PROB_FLOOR,
    }
    return rule, report


def fit_thresholds(
    bundle: Any,
    val: SplitOutputs,
    target_unidentified: float = TARGET_UNIDENTIFIED,
) -> dict[str, Any]:
    """Everything the device's abstention and flag need, from the validation outputs.

    Returns ``{"thresholds": {...}, "report": {...}}``: the thresholds replace the
    bundle's ``ood``, ``domain`` and the fitted ``screening`` keys."""
    old = bundle.thresholds or {}
    base = ScreeningRule.from_bundle(old)
    rule, rep = fit_rule(
        val.probs,
        val.y,
        bundle.classes,
        np.asarray(bundle.abnormal_mask, dtype=bool),
        base,
        target_unidentified,
    )
    t, ood_t, min_conf = rule.temperature, rule.ood_threshold, rule.min_confidence
    chosen_t, chosen_u = rule.threshold, rule.max_unidentified_fraction
    fpr, u_rate, conf_b = rule.false_positive_rate, rule.unidentified_rate, rule.confidence
    # domain ranges: per-image values of the validation split
    st = val.stain_mean[np.isfinite(val.stain_mean).all(axis=1)]
    lo, hi = np.percentile(st, 0.5, axis=0), np.percentile(st, 99.5, axis=0)
    pad = STAIN_MARGIN * (hi - lo)
    f1, f99 = np.percentile(val.focus, [1, 99])
    screening = dict(old.get("screening", {}) or {})
    for k in ("per_cell_sensitivity", "rates_measured_on", "comment"):
        screening.pop(k, None)
    screening.update(
        abnormal_fraction=chosen_t,
        false_positive_rate=round(fpr, 5),
        max_unidentified_fraction=chosen_u,
        unidentified_rate=round(u_rate, 5),
        fitted_on=f"{val.source}, device path; per-cell rates: one-sided "
        f"{conf_b:.0%} upper bounds; decision thresholds: smallest of "
        f"{list(THRESHOLD_CANDIDATES)} with >= {MIN_FIT_SPECIFICITY:.1%} of normal slides "
        "of 100 and of 200 cells below the decision fraction at those rates",
    )
    thresholds = {
        "min_confidence": min_conf,
        "screening": screening,
        "ood": {
            "score": "1 - max softmax(log p / temperature)",
            "temperature": t,
            "threshold": ood_t,
            "target_unidentified": target_unidentified,
            "fitted_on": val.source,
        },
        "domain": {
            "stain_mean_lab": {
                "low": [round(float(v), 2) for v in lo - pad],
                "high": [round(float(v), 2) for v in hi + pad],
                "what": "median over a slide's frames of the stained-pixel L*a*b* mean "
                "(before normalization); range: validation images' 0.5-99.5th "
                f"percentiles widened by {STAIN_MARGIN:.0%} of the range per side",
            },
            "input_focus": {
                "low": round(float(f1 / FOCUS_FACTOR), 2),
                "high": round(float(f99 * FOCUS_FACTOR), 2),
                "what": "median over a slide's nucleated cells of the variance of the "
                f"Laplacian of the model input; range: validation 1st/99th percentiles "
                f"/ and x {FOCUS_FACTOR}",
            },
            "max_scale_ratio": 1.2,
            "fitted_on": val.source,
        },
    }
    report = {"data": val.source, **rep}
    return {"thresholds": thresholds, "report": report}


# the abnormal sensitivity `edgecells train` chooses its operating point for (TrainConfig)
OPERATING_SENSITIVITY = 0.98


def apply_thresholds(manifest: dict[str, Any], fitted: dict[str, Any]) -> dict[str, Any]:
    """``manifest`` with the fitted thresholds in place (``operating_point`` moves to
    ``validation``: the device never reads it)."""
    th = dict(manifest.get("thresholds") or {})
    op = th.pop("operating_point", None)
    th.update(fitted["thresholds"])
    manifest["thresholds"] = th
    if op is not None:
        manifest.setdefault("validation", {})["classifier_operating_point"] = op
    manifest.setdefault("validation", {})["abstention"] = fitted["report"]
    return manifest


def refit_bundle(
    bundle_path: str | Path,
    data: str | Path,
    model_id: str | None = None,
    target_unidentified: float = TARGET_UNIDENTIFIED,
    tick: Callable[[int, int], None] | None = None,
    views: list[str] | None = None,
) -> dict[str, Any]:
    """Refit a bundle folder's thresholds on ``data``'s validation split (manifest rewritten
    atomically; model files untouched). Returns the fit report.

    ``views``: first set the bundle's test-time views (``preprocessing.test_time_views``),
    so that the thresholds are fitted on the probabilities the device will average."""
    from edgecells.edge.backends import open_classifier
    from edgecells.edge.bundle import check_views, load_bundle, read_manifest, write_manifest

    b = load_bundle(bundle_path)
    if b.source and Path(b.source).is_file():
        raise EdgecellsError(f"{b.source}: refit a bundle folder, not an archive")
    if views is not None:  # in memory until the fit succeeds: nothing half-written
        v = check_views(list(views), str(b.root), "--views")
        b.preprocessing = {**b.preprocessing, "test_time_views": v}
    clf = open_classifier(b, model_id=model_id) if model_id else open_classifier(b)
    try:
        val = run_split(b, clf, data, "val", tick)
    finally:
        clf.close()
    fitted = fit_thresholds(b, val, target_unidentified)
    fitted["report"]["model"] = getattr(clf, "model_id", None) or model_id or "default"
    fitted["report"]["test_time_views"] = b.test_time_views
    # the fitted values hold only for this averaged output: record what they were fitted on
    fitted["thresholds"]["ood"]["test_time_views"] = b.test_time_views
    manifest = apply_thresholds(read_manifest(b.root), fitted)
    if views is not None and "classifier_operating_point" in manifest.get("validation", {}):
        # the classifier's abnormal operating point (reported, not used by the device) is
        # re-chosen on the same validation split for the averaged output, at the training
        # default's sensitivity
        from edgecells.edge.metrics import choose_operating_point

        ab = np.asarray(b.abnormal_mask, bool)
        y_ab = ab[val.y]
        if y_ab.any() and (~y_ab).any():
            manifest["validation"]["classifier_operating_point"] = choose_operating_point(
                y_ab, val.probs[:, ab].sum(axis=1), OPERATING_SENSITIVITY
            )
    if views is not None:
        pre = {k: x for k, x in manifest["preprocessing"].items() if k != "test_time_views"}
        if b.test_time_views != ["identity"]:
            pre["test_time_views"] = b.test_time_views
        manifest["preprocessing"] = pre
    write_manifest(b.root, manifest)
    load_bundle(b.root)
    return fitted["report"]
