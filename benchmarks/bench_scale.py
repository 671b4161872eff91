"""Pixel size from red cells (``edgecells.edge.scale``) on the shared data sets.

For BCCD (test list and all frames) and DeepBioNet (test split and all frames), the
frames as they are and resized 0.5x and 2x: the estimate (µm/px, scaled back to the
original frame), its 95% interval, the change against the 1x estimate, and the pixel
size implied by the VOC red-cell boxes (median side of the square, untruncated boxes,
7.5 µm). DeepBioNet frames come at more than one magnification: the per-frame estimates
are also clustered. PBC and LISC single-cell crops are pooled (``--crops N`` each).

    python benchmarks/bench_scale.py [--frames 40] [--crops 300] [--json]
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from edgecells.edge.errors import EdgecellsError  # noqa: E402
from edgecells.edge.imageio import read_image  # noqa: E402
from edgecells.edge.scale import RBC_DIAMETER_UM, estimate_pixel_size  # noqa: E402
from edgecells.training.detection import read_voc  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
cv2.setNumThreads(1)


def voc_pixel_size(annotations: list[Path]) -> tuple[float, int]:
    sides = []
    for a in annotations:
        for x0, y0, x1, y1 in read_voc(a).get("RBC", []):
            w, h = x1 - x0, y1 - y0
            if x0 > 1 and y0 > 1 and x1 < 638 and y1 < 478 and 0.85 <= w / max(h, 1) <= 1.18:
                sides.append((w + h) / 2)
    return RBC_DIAMETER_UM / float(np.median(sides)), len(sides)


def resized(img: np.ndarray, f: float) -> np.ndarray:
    if f == 1.0:
        return img
    h, w = img.shape[:2]
    interp = cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR
    return cv2.resize(img, (int(round(w * f)), int(round(h * f))), interpolation=interp)


def frames_of(data: Path, name: str) -> tuple[list[Path], list[Path]]:
    if name.startswith("bccd"):
        root = data / "bccd" / "BCCD"
        if name == "bccd-test":
            names = (root / "ImageSets" / "Main" / "test.txt").read_text().split()
        else:
            names = sorted(p.stem for p in (root / "Annotations").glob("*.xml"))
        return (
            [root / "JPEGImages" / f"{n}.jpg" for n in names],
            [root / "Annotations" / f"{n}.xml" for n in names],
        )
    root = data / "deepbionet"
    with open(root / "splits.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    keep = [r["frame"] for r in rows if name == "dbn-all" or r["split"] == "test"]
    return (
        [root / "frames" / f"{n}.jpg" for n in keep],
        [root / "annotations" / f"{n}.xml" for n in keep],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--frames", type=int, default=40, help="frames per estimate")
    ap.add_argument("--crops", type=int, default=300, help="PBC/LISC crops pooled")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    res: dict[str, object] = {}
    for name in ("bccd-test", "bccd-all", "dbn-test", "dbn-all"):
        files, anns = frames_of(args.data, name)
        imgs = [read_image(f) for f in files[: args.frames]]
        voc, nbox = voc_pixel_size(anns)
        row: dict[str, object] = {"voc_pixel_size_um": round(voc, 5), "voc_boxes": nbox}
        base = None
        for f in (1.0, 0.5, 2.0):
            t0 = time.perf_counter()
            e = estimate_pixel_size([resized(i, f) for i in imgs])
            ms = (time.perf_counter() - t0) * 1000 / len(imgs)
            px = e.pixel_size_um * f  # back to the original frame's pixels
            base = px if f == 1.0 else base
            row[f"x{f:g}"] = {
                "pixel_size_um": round(px, 5),
                "interval": [round(e.low_um * f, 5), round(e.high_um * f, 5)],
                "cells": e.cells,
                "frames": e.frames,
                "vs_1x": round(px / base - 1, 4) if base else 0.0,
                "ms_per_frame": round(ms, 1),
            }
        row["vs_voc"] = round(base / voc - 1, 4) if base else None
        if name == "dbn-all":
            per = []
            for f in files:
                try:
                    per.append(estimate_pixel_size([read_image(f)]).pixel_size_um)
                except EdgecellsError:
                    continue
            per_a = np.array(per)
            cut = 0.11  # between the two magnifications (see the histogram in RESULTS.md)
            lo, hi = per_a[per_a < cut], per_a[per_a >= cut]
            row["per_frame"] = {
                "frames": len(per_a),
                "below_0.11": {"frames": len(lo), "median": round(float(np.median(lo)), 5)},
                "above_0.11": {"frames": len(hi), "median": round(float(np.median(hi)), 5)},
            }
        res[name] = row
        if not args.json:
            print(name, json.dumps(row), flush=True)
    for name, pattern in (("pbc", "pbc/*/*.jpg"), ("lisc", "lisc/*/*.jpg")):
        files = sorted(args.data.glob(pattern))[
            :: max(1, len(list(args.data.glob(pattern))) // args.crops)
        ]
        if not files:
            continue
        try:
            e = estimate_pixel_size([read_image(f) for f in files[: args.crops]])
            res[name] = e.to_dict()
        except EdgecellsError as exc:
            res[name] = {"error": str(exc)}
        if not args.json:
            print(name, json.dumps(res[name]), flush=True)
    if args.json:
        print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
