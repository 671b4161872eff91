"""Cross-microscope subtype accuracy of a bundle, through the device path, side by side.

For each bundle (``--bundle``, repeatable; the first is the one under test, the others
baselines measured in the same run), on four microscopes:

- **PBC test** (CellaVision DM96, 0.103 µm/px): single-cell crops through
  ``prepare_crop`` at the model's field (as ``edgecells evaluate classifier`` /
  ``classify``): 8-class accuracy, normal cells called abnormal, abnormal AUC and
  sensitivity/specificity at the bundle's operating point, and the operating points
  chosen on PBC val for 97% and 98% abnormal sensitivity with their test figures;
- **BCCD all / BCCD test** (640x480 frames, 0.0721 µm/px) and **DeepBioNet test**
  (0.126 µm/px): whole frames through :class:`edgecells.edge.pipeline.Pipeline` — the
  code ``edgecells screen`` runs (quality gates, detection, crop, stain, inference,
  labels). A frame's cell is the detected nucleated cell nearest the centre of its single
  VOC WBC box, among those whose centre lies inside the box; a frame with none is a miss
  (wrong). ``unidentified`` counts as wrong, not as abnormal;
- **LISC test** (224 px crops, 0.155 µm/px): through ``edgecells classify``'s code.

Columns: accuracy (top label = truth), normal called abnormal (a normal cell labelled
ig or erythroblast), and for frames the share missed by the detector / skipped frames.
With ``--robustness``: PBC test under fixed colour transforms (abnormal sensitivity at
the operating point, accuracy) and resampled 0.7x-1.4x with the matching pixel size.

    python benchmarks/bench_cross_microscope.py [--bundle B ...] [--data ../shared/data]
        [--robustness] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "edge" / "data" / "bundles" / "reference"
SAMPLES = {
    "BloodImage_00007": "neutrophil",
    "BloodImage_00011": "neutrophil",
    "BloodImage_00015": "monocyte",
}


def _open(bundle: str) -> tuple[Any, Any]:
    from edgecells.edge.backends import open_classifier
    from edgecells.edge.bundle import load_bundle

    b = load_bundle(bundle)
    prec = "int8" if b.formats("int8") else "float32"
    return b, open_classifier(b, "auto", 1, precision=prec)


def _operating_point(b: Any) -> float:
    """The classifier's abnormal operating point, fitted on PBC val (``bundle refit``
    keeps it in ``validation.classifier_operating_point``; older bundles in thresholds)."""
    th = b.thresholds or {}
    op = th.get("operating_point", (b.validation or {}).get("classifier_operating_point"))
    return float(op if op is not None else th.get("abnormal_operating_point", 0.5))


def crop_probs(
    b: Any, clf: Any, records: list[Any], transform: Any = None, scale: float = 1.0
) -> np.ndarray:
    """Class probabilities of single-cell crops through prepare_crop (at the model's
    field) and the backend."""
    from edgecells.edge.imageio import read_image
    from edgecells.edge.preprocess import prepare_crop
    from edgecells.edge.stain import ReinhardNormalizer

    t = b.load_stain_target()
    norm = ReinhardNormalizer(t) if t is not None else None
    x = np.empty((len(records), b.input_size, b.input_size, 3), np.uint8)
    for i, r in enumerate(records):
        img = read_image(r.path)
        if scale != 1.0:
            h, w = img.shape[:2]
            interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
            img = cv2.resize(img, (round(w * scale), round(h * scale)), interpolation=interp)
        if transform is not None:
            img = transform(img)
        x[i] = prepare_crop(img, norm, b.input_size, r.pixel_size_um / scale, b.pixel_size_um)
    return np.concatenate([clf.predict(x[i : i + 64]) for i in range(0, len(x), 64)])


def crop_scores(
    b: Any, clf: Any, records: list[Any], transform: Any = None, scale: float = 1.0
) -> dict[str, Any]:
    """Single-cell crops through prepare_crop (at the model's field) and the backend."""
    from edgecells.edge.screening import ScreeningRule, label_cells

    probs = crop_probs(b, clf, records, transform, scale)
    classes = list(b.classes)
    ab = np.asarray(b.abnormal_mask, bool)
    labels = label_cells(probs, classes, ScreeningRule.from_bundle(b.thresholds).min_confidence)
    truth = [r.label for r in records]
    return _score(
        labels, truth, probs[:, ab].sum(1), set(np.array(classes)[ab]), _operating_point(b)
    )


def operating_points(
    b: Any, clf: Any, val: list[Any], test: list[Any], min_sens: tuple[float, ...] = (0.97, 0.98)
) -> list[dict[str, float]]:
    """For each minimum abnormal sensitivity: the threshold on p(abnormal) with the highest
    specificity on PBC **val** at that sensitivity, and what it gives on val and test."""
    from edgecells.edge.metrics import choose_operating_point

    ab = np.asarray(b.abnormal_mask, bool)
    abnormal = set(np.array(b.classes)[ab])
    pv, pt = (crop_probs(b, clf, r)[:, ab].sum(1) for r in (val, test))
    yv, yt = (np.array([r.label in abnormal for r in recs]) for recs in (val, test))
    out = []
    for ms in min_sens:
        t = choose_operating_point(yv, pv, ms)  # what `edgecells train` fits on val
        out.append(
            {
                "min_sensitivity": ms,
                "threshold": t,
                "val_sensitivity": float((pv[yv] >= t).mean()),
                "val_specificity": float((pv[~yv] < t).mean()),
                "test_sensitivity": float((pt[yt] >= t).mean()),
                "test_specificity": float((pt[~yt] < t).mean()),
            }
        )
    return out


def _score(
    labels: list[str], truth: list[str], p_ab: np.ndarray | None, abnormal: set[str], op: float
) -> dict[str, Any]:
    n = len(truth)
    correct = sum(a == t for a, t in zip(labels, truth))
    normal = [i for i, t in enumerate(truth) if t not in abnormal]
    nca = sum(labels[i] in abnormal for i in normal)
    out: dict[str, Any] = {
        "n": n,
        "accuracy": correct / n if n else float("nan"),
        "normal_called_abnormal": nca / len(normal) if normal else float("nan"),
        "labels": dict(Counter(labels)),
    }
    abn = [i for i, t in enumerate(truth) if t in abnormal]
    if p_ab is not None and abn:
        from edgecells.edge.metrics import roc_auc

        y = np.array([t in abnormal for t in truth])
        out["auc_abnormal"] = float(roc_auc(y, p_ab))
        out["sensitivity_abnormal"] = float((p_ab[y] >= op).mean())
        out["specificity_abnormal"] = float((p_ab[~y] < op).mean())
    return out


def frame_scores(b: Any, clf: Any, records: list[Any], pixel_size_um: float) -> dict[str, Any]:
    """Whole frames through the device Pipeline; score the cell in the single WBC box."""
    from edgecells.calibration.cellsets import voc_boxes
    from edgecells.edge.config import load_config
    from edgecells.edge.imageio import read_image
    from edgecells.edge.pipeline import Pipeline
    from edgecells.edge.sources.base import Frame

    cfg = load_config(None)
    cfg.camera.pixel_size_um = pixel_size_um
    pipe = Pipeline(cfg, b, clf)
    labels, truth, missed, skipped = [], [], 0, 0
    t0 = time.perf_counter()
    for i, r in enumerate(records):
        img = read_image(r.path)
        res, _ = pipe.process(Frame(i, time.time(), img, r.path.name))
        truth.append(r.label)
        if res.status != "ok":
            skipped += 1
            labels.append("skipped:" + res.reason)
            continue
        ann = r.path.parent.parent / (
            "Annotations" if (r.path.parent.parent / "Annotations").is_dir() else "annotations"
        )
        x0, y0, x1, y1 = voc_boxes(ann / (r.path.stem + ".xml"))[0]
        best, dist = None, 1e9
        for c in res.cells:
            if c["kind"] != "nucleated":
                continue
            cx, cy = c["x"] + c["w"] / 2, c["y"] + c["h"] / 2
            if x0 <= cx <= x1 and y0 <= cy <= y1:
                d = np.hypot(cx - (x0 + x1) / 2, cy - (y0 + y1) / 2)
                if d < dist:
                    best, dist = c, d
        if best is None:
            missed += 1
            labels.append("missed")
        else:
            labels.append(best["label"])
    sec = time.perf_counter() - t0
    out = _score(labels, truth, None, set(b.abnormal_classes), 0.5)
    out.update(missed=missed, skipped=skipped, frames_per_s=len(records) / sec if sec else 0.0)
    out["per_frame"] = {r.path.stem: lab for r, lab in zip(records, labels)}
    return out


def _wb(r: float, bl: float) -> Any:
    g = np.array([r, 1.0, bl], np.float32)
    return lambda im: np.clip(im.astype(np.float32) * g + 0.5, 0, 255).astype(np.uint8)


def _gamma(gm: float) -> Any:
    lut = np.clip(255.0 * (np.arange(256) / 255.0) ** gm + 0.5, 0, 255).astype(np.uint8)
    return lambda im: lut[im]


def _tint(colour: tuple[int, int, int], a: float = 0.3) -> Any:
    c = np.array(colour, np.float32)

    def f(im: np.ndarray) -> np.ndarray:
        x = im.astype(np.float32)
        w = a * (x.mean(axis=2, keepdims=True) / 255.0) ** 2  # mostly the bright background
        return np.clip(x * (1 - w) + c * w + 0.5, 0, 255).astype(np.uint8)

    return f


TRANSFORMS = {
    "white balance red +20% blue -20%": _wb(1.2, 0.8),
    "white balance red -20% blue +20%": _wb(0.8, 1.2),
    "gamma 0.8": _gamma(0.8),
    "gamma 1.25": _gamma(1.25),
    "yellow background tint": _tint((255, 230, 140)),
    "blue background tint": _tint((150, 190, 255)),
}
SCALES = (0.7, 0.85, 1.0, 1.2, 1.4)


def run(bundle: str, data: Path, robustness: bool) -> dict[str, Any]:
    from edgecells.calibration.cellsets import bccd_records, cell_records
    from edgecells.calibration.pixel_sizes import PIXEL_SIZE_UM
    from edgecells.edge.mappings import load_mapping

    b, clf = _open(bundle)
    m = load_mapping("pbc8")
    res: dict[str, Any] = {
        "bundle": str(bundle),
        "field_um": b.field_um,
        "pixel_size_um": b.pixel_size_um,
    }
    pbc_all = cell_records(data / "pbc", m)
    pbc = [r for r in pbc_all if r.split == "test"]
    res["PBC test"] = crop_scores(b, clf, pbc)
    pbc_val = [r for r in pbc_all if r.split == "val"]
    res["PBC operating points"] = operating_points(b, clf, pbc_val, pbc)
    bccd = bccd_records(data / "bccd")
    res["BCCD all"] = frame_scores(b, clf, bccd, PIXEL_SIZE_UM["bccd"])
    test_frames = {r.path.stem for r in bccd if r.split == "test"}
    pf = res["BCCD all"]["per_frame"]
    t_lab = [pf[s] for s in sorted(test_frames)]
    t_truth = [r.label for r in sorted(bccd, key=lambda r: r.path.stem) if r.split == "test"]
    res["BCCD test"] = _score(t_lab, t_truth, None, set(b.abnormal_classes), 0.5)
    res["BCCD samples"] = {k: pf.get(k) for k in SAMPLES}
    dbn = [r for r in cell_records(data / "deepbionet", m) if r.split == "test"]
    res["DeepBioNet test"] = frame_scores(b, clf, dbn, PIXEL_SIZE_UM["deepbionet"])
    lisc = [r for r in cell_records(data / "lisc", m) if r.split == "test"]
    res["LISC test"] = crop_scores(b, clf, lisc)
    if robustness:
        res["PBC colour"] = {k: crop_scores(b, clf, pbc, t) for k, t in TRANSFORMS.items()}
        res["PBC scale"] = {str(s): crop_scores(b, clf, pbc, None, s) for s in SCALES}
    for k in ("BCCD all", "DeepBioNet test"):
        res[k].pop("per_frame", None) if k != "BCCD all" else None
    return res


COLS = ("PBC test", "BCCD all", "BCCD test", "DeepBioNet test", "LISC test")


def _pct(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{100 * v:.1f}%"


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| bundle | " + " | ".join(COLS) + " |",
        "|---|" + "---:|" * len(COLS),
    ]
    for r in results:
        cells = [f"{_pct(r[c]['accuracy'])} ({_pct(r[c]['normal_called_abnormal'])})" for c in COLS]
        lines.append(
            f"| {Path(r['bundle']).name} ({r['field_um']:.0f} µm) | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", action="append", default=None)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--robustness", action="store_true")
    ap.add_argument("--json", default=None, help="write all figures to this file")
    args = ap.parse_args()
    data = Path(args.data)
    if not (data / "pbc").is_dir():
        sys.exit(f"{data}: no shared data (pbc, bccd, deepbionet, lisc) here; pass --data")
    bundles = args.bundle or [str(REFERENCE)]
    results = [run(bd, data, args.robustness) for bd in bundles]
    print("accuracy (normal cells called abnormal), device path:\n")
    print(table(results))
    for r in results:
        name = Path(r["bundle"]).name
        p = r["PBC test"]
        print(
            f"\n{name}: PBC test AUC {p.get('auc_abnormal', float('nan')):.4f}, sensitivity "
            f"{_pct(p.get('sensitivity_abnormal'))}, "
            f"specificity {_pct(p.get('specificity_abnormal'))}"
        )
        for o in r["PBC operating points"]:
            print(
                f"{name}: PBC operating point chosen on val for sensitivity >= "
                f"{o['min_sensitivity']:.0%}: {o['threshold']:.4f} (val sensitivity "
                f"{_pct(o['val_sensitivity'])}, specificity {_pct(o['val_specificity'])}; test "
                f"{_pct(o['test_sensitivity'])}, {_pct(o['test_specificity'])})"
            )
        for k in ("BCCD all", "DeepBioNet test"):
            q = r[k]
            print(
                f"{name}: {k}: missed by the detector {q['missed']}, skipped frames "
                f"{q['skipped']}, {q['frames_per_s']:.0f} frames/s; labels {q['labels']}"
            )
        print(f"{name}: LISC test labels {r['LISC test']['labels']}")
        print(f"{name}: sample frames {r['BCCD samples']} (truth {SAMPLES})")
        if "PBC colour" in r:
            for k, v in r["PBC colour"].items():
                print(
                    f"{name}: PBC test, {k}: accuracy {_pct(v['accuracy'])}, abnormal "
                    f"sensitivity {_pct(v.get('sensitivity_abnormal'))}, normal called "
                    f"abnormal {_pct(v['normal_called_abnormal'])}"
                )
            for k, v in r["PBC scale"].items():
                print(
                    f"{name}: PBC test resampled {k}x (pixel size {0.103 / float(k):.4f}): "
                    f"accuracy {_pct(v['accuracy'])}"
                )
    if args.json:
        for r in results:
            r["BCCD all"].pop("per_frame", None)
        Path(args.json).write_text(json.dumps(results, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
