"""How the device's "don't know" holds up on inputs unlike its training data.

    python benchmarks/abstention.py inputs [--bundle B] [--n 300]
        out-of-domain crops through the device path: debris / empty glass / red cells
        cut from BCCD frames away from every annotated white cell, PBC test crops
        defocused (Gaussian blur) and over-exposed, against the clean PBC test crops.
    python benchmarks/abstention.py slides SESSION_DIR... [--bundle B] [--cells 100]
        simulated slides of CELLS nucleated cells drawn from a finished `edgecells screen`
        session of normal blood (its cells.csv), through the bundle's flag rule, with
        and without the session's domain verdict (summary.json screening.domain_reasons).

Needs ../shared/data (PBC, BCCD). Prints JSON.
"""

from __future__ import annotations

import argparse
import csv
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np

from edgecells.edge.backends import open_classifier
from edgecells.edge.bundle import load_bundle
from edgecells.edge.imageio import read_image
from edgecells.edge.preprocess import prepare_crop
from edgecells.edge.screening import (
    FLAGS,
    NON_NUCLEATED,
    UNIDENTIFIED,
    ScreeningRule,
    Tally,
    label_cells,
)

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
BCCD_PX_UM = 0.0721  # calibration/pixel_sizes.py
PBC_PX_UM = 0.103


def _labels(bundle, clf, crops: list[np.ndarray], pixel_um: float) -> list[str]:
    target = bundle.load_stain_target()
    norm = None
    if target is not None:
        from edgecells.edge.stain import ReinhardNormalizer

        norm = ReinhardNormalizer(target)
    rule = ScreeningRule.from_bundle(bundle.thresholds)
    out: list[str] = []
    for i in range(0, len(crops), 64):
        model_px = bundle.preprocessing.get("pixel_size_um")  # the physical field, if any
        px = pixel_um if model_px else None
        batch = np.stack(
            [prepare_crop(c, norm, bundle.input_size, px, model_px) for c in crops[i : i + 64]]
        )
        probs = np.asarray(clf.predict(batch), dtype=np.float32)
        out += label_cells(
            probs, bundle.classes, rule.min_confidence, rule.temperature, rule.ood_threshold
        )
    return out


def _rates(labels: list[str], abnormal: set[str]) -> dict[str, float]:
    n = len(labels)
    unid = sum(lbl == UNIDENTIFIED for lbl in labels)
    ab = sum(lbl in abnormal for lbl in labels)
    from collections import Counter

    return {
        "n": n,
        "unidentified": round(unid / n, 4),
        "abnormal": round(ab / n, 4),
        "named_normal": round((n - unid - ab) / n, 4),
        "top_labels": dict(Counter(labels).most_common(3)),
    }


def _wbc_boxes(xml: Path) -> list[tuple[int, int, int, int]]:
    boxes = []
    for o in ET.parse(xml).getroot().iter("object"):
        if (o.findtext("name") or "") == "WBC":
            b = o.find("bndbox")
            boxes.append(tuple(int(float(b.findtext(k))) for k in ("xmin", "ymin", "xmax", "ymax")))
    return boxes


def inputs(bundle_path: str | None, n: int) -> dict:
    b = load_bundle(bundle_path)
    clf = open_classifier(b)
    rng = np.random.default_rng(0)
    abnormal = set(b.abnormal_classes)
    res = {}
    # debris / glass / red cells: 24 um squares of BCCD frames not touching a WBC box
    side = int(round(float(b.crop.get("side_um", 24.0)) / BCCD_PX_UM))
    frames = sorted((DATA / "bccd" / "BCCD" / "JPEGImages").glob("*.jpg"))
    crops = []
    while len(crops) < n:
        f = frames[int(rng.integers(len(frames)))]
        img = read_image(f)
        h, w = img.shape[:2]
        x, y = int(rng.integers(0, w - side)), int(rng.integers(0, h - side))
        boxes = _wbc_boxes(DATA / "bccd" / "BCCD" / "Annotations" / (f.stem + ".xml"))
        if any(
            x < bx1 and bx0 < x + side and y < by1 and by0 < y + side
            for bx0, by0, bx1, by1 in boxes
        ):
            continue
        crops.append(img[y : y + side, x : x + side])
    res["bccd_background_crops"] = _rates(_labels(b, clf, crops, BCCD_PX_UM), abnormal)
    # PBC test crops: clean, defocused, over-exposed
    with open(DATA / "pbc" / "splits.csv", newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "test"]
    pick = rng.choice(len(rows), n, replace=False)
    pbc = [read_image(DATA / "pbc" / rows[i]["path"]) for i in pick]
    nuc = [rows[i]["label"] not in NON_NUCLEATED for i in pick]
    res["pbc_test_clean"] = _rates(_labels(b, clf, pbc, PBC_PX_UM), abnormal)
    for sigma in (2.0, 4.0):
        blurred = [cv2.GaussianBlur(im, (0, 0), sigma) for im in pbc]
        res[f"pbc_test_blur_sigma{sigma:g}px"] = _rates(
            _labels(b, clf, blurred, PBC_PX_UM), abnormal
        )
    for gain in (1.6, 2.2):
        bright = [np.clip(im.astype(np.float32) * gain, 0, 255).astype(np.uint8) for im in pbc]
        res[f"pbc_test_exposure_x{gain:g}"] = _rates(_labels(b, clf, bright, PBC_PX_UM), abnormal)
    clf.close()
    res["note"] = (
        f"{n} crops each; PBC crops random from the test split ({sum(nuc)} nucleated); "
        "abnormal = called erythroblast or ig"
    )
    return res


def slides(bundle_path: str | None, sessions: list[str], cells: int, n_slides: int) -> dict:
    b = load_bundle(bundle_path)
    rule = ScreeningRule.from_bundle(b.thresholds)
    ab = list(b.abnormal_mask)
    rng = np.random.default_rng(0)
    out = {}
    for s in sessions:
        d = Path(s)
        with open(d / "cells.csv", newline="", encoding="utf-8") as fh:
            labels = [r["label"] for r in csv.DictReader(fh) if r.get("kind") == "nucleated"]
        summ = json.loads((d / "summary.json").read_text(encoding="utf-8"))
        reasons = summ.get("screening", {}).get("domain_reasons", [])
        res = {}
        for name, dom in (("with_domain_check", reasons), ("without_domain_check", [])):
            counts = dict.fromkeys(FLAGS, 0)
            for _ in range(n_slides):
                t = Tally(b.classes, ab)
                for i in rng.choice(len(labels), cells):
                    t.add(labels[int(i)])
                counts[t.result(rule, dom).flag] += 1
            res[name] = counts
        out[d.name] = {
            "whole_slide": {"flag": summ["flag"], "reason": summ["reason"]},
            "nucleated_cells": len(labels),
            "cells_per_slide": cells,
            **res,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a1 = sub.add_parser("inputs")
    a1.add_argument("--bundle")
    a1.add_argument("--n", type=int, default=300)
    a2 = sub.add_parser("slides")
    a2.add_argument("sessions", nargs="+")
    a2.add_argument("--bundle")
    a2.add_argument("--cells", type=int, default=100)
    a2.add_argument("--slides", type=int, default=500)
    a = ap.parse_args()
    if a.cmd == "inputs":
        print(json.dumps(inputs(a.bundle, a.n), indent=2))
    else:
        print(json.dumps(slides(a.bundle, a.sessions, a.cells, a.slides), indent=2))


if __name__ == "__main__":
    main()
