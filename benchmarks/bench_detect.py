"""Cell-detection robustness and speed: the detector against BCCD and DeepBioNet boxes,
under fixed image transforms, with the previous detector measured in the same run.

Frames: BCCD's test list (``ImageSets/Main/test.txt``) and DeepBioNet's test split
(``splits.csv``), from ``../shared/data`` (``--data``). Each set is scored as is and
under each transform:

- white balance: +-25 added to the blue or the red channel (clipped to 0..255);
- gamma 0.8 and 1.25 (``255 * (v / 255) ** gamma``);
- JPEG quality 50 (encode and decode);
- Gaussian blur, sigma 1.5 px;
- resized 0.5x (area) and 2x (bilinear) with the matching pixel size and boxes;

and once more with each frame's pixel size estimated from its own red cells
(``auto-px``; DeepBioNet mixes two magnifications).

Matching: a detection is a true positive when its centre lies inside an annotated box of
its kind, one to one (``edgecells.training.detection.match_centres``). WBC and platelet
recall/precision per condition, and the change against the untransformed frames.
Speed: ms per 640x480 frame on one thread, the detector and the previous one
(``benchmarks/legacy_detect.py``, the B-R detector before issue #10) on the same frames.

    python benchmarks/bench_detect.py [--sets bccd-test,dbn-test] [--json] [--legacy]

``--sets`` also takes ``bccd-trainval`` and ``dbn-trainval`` (the tuning frames).
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from edgecells.calibration.pixel_sizes import PIXEL_SIZES  # noqa: E402
from edgecells.edge.config import DetectConfig  # noqa: E402
from edgecells.edge.detect import NUCLEATED, PLATELET, CellDetector  # noqa: E402
from edgecells.edge.imageio import read_image  # noqa: E402
from edgecells.training.detection import (  # noqa: E402
    VOC_PLATELETS,
    VOC_WBC,
    DetectionScore,
    apply_corrections,
    match_centres,
    read_corrections,
    read_voc,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
cv2.setNumThreads(1)

Box = tuple[int, int, int, int]


def _offset(ch: int, v: int) -> Callable[[np.ndarray], np.ndarray]:
    def f(img: np.ndarray) -> np.ndarray:
        out = img.astype(np.int16)
        out[:, :, ch] += v
        return np.clip(out, 0, 255).astype(np.uint8)

    return f


def _gamma(g: float) -> Callable[[np.ndarray], np.ndarray]:
    lut = np.clip(np.round(255.0 * (np.arange(256) / 255.0) ** g), 0, 255).astype(np.uint8)
    return lambda img: cv2.LUT(img, lut)


def _jpeg(img: np.ndarray) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 50])
    return np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1])


def _blur(img: np.ndarray) -> np.ndarray:
    return cv2.GaussianBlur(img, (0, 0), 1.5)


def _resize(f: float) -> Callable[[np.ndarray], np.ndarray]:
    interp = cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR

    def r(img: np.ndarray) -> np.ndarray:
        h, w = img.shape[:2]
        return cv2.resize(img, (int(round(w * f)), int(round(h * f))), interpolation=interp)

    return r


# name -> (image transform, geometric factor)
TRANSFORMS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], float]] = {
    "none": (lambda img: img, 1.0),
    "blue+25": (_offset(2, 25), 1.0),
    "blue-25": (_offset(2, -25), 1.0),
    "red+25": (_offset(0, 25), 1.0),
    "red-25": (_offset(0, -25), 1.0),
    "gamma0.8": (_gamma(0.8), 1.0),
    "gamma1.25": (_gamma(1.25), 1.0),
    "jpeg50": (_jpeg, 1.0),
    "blur1.5": (_blur, 1.0),
    "resize0.5": (_resize(0.5), 0.5),
    "resize2": (_resize(2.0), 2.0),
}


CORRECTIONS = ROOT / "benchmarks" / "annotation_corrections" / "corrections.csv"


Frames = list[tuple[np.ndarray, dict[str, list[Box]]]]


def load_set(data: Path, name: str) -> tuple[Frames, float, list[str]]:
    """Frames with their VOC boxes, the set's pixel size (µm/px) and the frame names."""
    if name.startswith("bccd-"):
        root = data / "bccd" / "BCCD"
        lists = {"bccd-test": ["test"], "bccd-trainval": ["trainval"]}[name]
        names = [
            n
            for lst in lists
            for n in (root / "ImageSets" / "Main" / f"{lst}.txt").read_text().split()
        ]
        items = [
            (root / "JPEGImages" / f"{n}.jpg", root / "Annotations" / f"{n}.xml") for n in names
        ]
        px = float(PIXEL_SIZES["bccd"]["pixel_size_um"])  # type: ignore[arg-type]
    elif name.startswith("dbn-"):
        root = data / "deepbionet"
        splits = {"dbn-test": {"test"}, "dbn-trainval": {"train", "val"}}[name]
        with open(root / "splits.csv", newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r["split"] in splits]
        items = [
            (root / "frames" / f"{r['frame']}.jpg", root / "annotations" / f"{r['frame']}.xml")
            for r in rows
        ]
        px = float(PIXEL_SIZES["deepbionet"]["pixel_size_um"])  # type: ignore[arg-type]
    else:
        raise SystemExit(f"unknown set {name!r}")
    return [(read_image(f), read_voc(a)) for f, a in items], float(px), [f.stem for f, _ in items]


def corrected(frames: Frames, stems: list[str], set_name: str) -> Frames:
    """The same frames with the annotation corrections of ``annotation_corrections/``
    applied to their boxes (white cells the VOC files missed or misplaced, found by eye)."""
    fixes = read_corrections(CORRECTIONS)
    source = "bccd" if set_name.startswith("bccd-") else "deepbionet"
    return [
        (img, apply_corrections(boxes, fixes.get((source, stem), [])))
        for (img, boxes), stem in zip(frames, stems)
    ]


def score(
    detector: CellDetector, frames: list[tuple[np.ndarray, dict[str, list[Box]]]], factor: float
) -> tuple[DetectionScore, DetectionScore]:
    wbc, plt = DetectionScore(), DetectionScore()
    for img, boxes in frames:
        d = detector.detect(img)
        for s, kind, names in ((wbc, NUCLEATED, VOC_WBC), (plt, PLATELET, VOC_PLATELETS)):
            truth = [
                tuple(int(round(v * factor)) for v in b) for n in names for b in boxes.get(n, [])
            ]
            pred = [(c.cx, c.cy) for c in d.cells if c.kind == kind]
            s.n_true += len(truth)
            s.n_pred += len(pred)
            s.tp += match_centres(pred, truth)  # type: ignore[arg-type]
    return wbc, plt


def score_auto(
    cfg: DetectConfig, frames: list[tuple[np.ndarray, dict[str, list[Box]]]], px: float
) -> tuple[DetectionScore, DetectionScore]:
    """Score with each frame's own pixel size, estimated from its red cells (the set's
    value where a frame has too few)."""
    from edgecells.edge.errors import EdgecellsError
    from edgecells.edge.scale import estimate_pixel_size

    wbc, plt = DetectionScore(), DetectionScore()
    for img, boxes in frames:
        try:
            fpx = estimate_pixel_size([img]).pixel_size_um
        except EdgecellsError:
            fpx = px
        w, p = score(CellDetector(cfg, fpx), [(img, boxes)], 1.0)
        for a, b in ((wbc, w), (plt, p)):
            a.n_true += b.n_true
            a.n_pred += b.n_pred
            a.tp += b.tp
    return wbc, plt


def time_detector(det: object, frames: list[np.ndarray], repeat: int = 5) -> float:
    """Best of ``repeat`` passes, mean ms per frame (the best pass is the least disturbed
    by other work on the machine)."""
    det.detect(frames[0])  # type: ignore[attr-defined]
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for f in frames:
            det.detect(f)  # type: ignore[attr-defined]
        runs.append((time.perf_counter() - t0) * 1000 / len(frames))
    return float(min(runs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--sets", default="bccd-test,dbn-test")
    ap.add_argument("--transforms", default=",".join(TRANSFORMS))
    ap.add_argument("--legacy", action="store_true", help="also score the previous detector")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from legacy_detect import CellDetector as LegacyDetector

    cfg = DetectConfig()
    result: dict[str, object] = {"sets": {}, "speed_ms_per_frame": {}}
    for set_name in args.sets.split(","):
        frames, px, stems = load_set(args.data, set_name)
        rows = {}
        for tname in args.transforms.split(","):
            fn, factor = TRANSFORMS[tname]
            tframes = [(fn(img), boxes) for img, boxes in frames]
            dets = {"new": CellDetector(cfg, px / factor)}
            if tname == "none":
                # the pixel size estimated per frame from its red cells (edge/scale.py)
                w, p = score_auto(cfg, tframes, px)
                rows["auto-px/new"] = {"wbc": w.to_dict(), "platelets": p.to_dict()}
                if not args.json:
                    print(
                        f"{set_name:13s} {'auto-px':10s} new WBC R {w.recall:6.2%} "
                        f"P {w.precision:6.2%} ({w.tp}/{w.n_true}/{w.n_pred})  PLT "
                        f"R {p.recall:6.2%} P {p.precision:6.2%} ({p.tp}/{p.n_true}/{p.n_pred})",
                        flush=True,
                    )
            if tname == "none":
                # the same frames scored against the corrected labels
                w, p = score(dets["new"], corrected(tframes, stems, set_name), factor)
                rows["corrected-labels/new"] = {"wbc": w.to_dict(), "platelets": p.to_dict()}
                if not args.json:
                    print(
                        f"{set_name:13s} {'corrected':10s} new WBC R {w.recall:6.2%} "
                        f"P {w.precision:6.2%} ({w.tp}/{w.n_true}/{w.n_pred})  (labels: "
                        "benchmarks/annotation_corrections)",
                        flush=True,
                    )
            if args.legacy:
                dets["old"] = LegacyDetector(None, px / factor)  # type: ignore[assignment]
            for dname, det in dets.items():
                w, p = score(det, tframes, factor)
                rows[f"{tname}/{dname}"] = {"wbc": w.to_dict(), "platelets": p.to_dict()}
                if not args.json:
                    print(
                        f"{set_name:13s} {tname:10s} {dname:3s} WBC R {w.recall:6.2%} "
                        f"P {w.precision:6.2%} ({w.tp}/{w.n_true}/{w.n_pred})  PLT "
                        f"R {p.recall:6.2%} P {p.precision:6.2%} ({p.tp}/{p.n_true}/{p.n_pred})",
                        flush=True,
                    )
        result["sets"][set_name] = {"pixel_size_um": px, "conditions": rows}  # type: ignore[index]
        if set_name.startswith("bccd"):
            imgs = [img for img, _ in frames]
            new, old = CellDetector(cfg, px), LegacyDetector(None, px)
            speed = {"new": time_detector(new, imgs), "old": time_detector(old, imgs)}
            # again, interleaved, so that a change in the machine's load hits both
            speed["new"] = min(speed["new"], time_detector(new, imgs))
            speed["old"] = min(speed["old"], time_detector(old, imgs))
            speed["ratio_new_over_old"] = speed["new"] / speed["old"]
            result["speed_ms_per_frame"] = speed
            if not args.json:
                print(
                    f"speed (one thread, best pass, {len(imgs)} 640x480 frames): "
                    f"new {speed['new']:.2f} ms,"
                    f" old {speed['old']:.2f} ms, ratio {speed['ratio_new_over_old']:.2f}"
                )
    if args.json:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
