"""Site-adaptation learning curves on two microscopes the parent never saw.

    nice -n 5 python benchmarks/adapt_curves.py --dataset dbn --sizes 0,10,25,50
    nice -n 5 python benchmarks/adapt_curves.py --dataset lisc --sizes 0,10,25,50

For each N: take N labelled cells per class from the data set's TRAIN split (all there
are where a class has fewer), adapt the parent bundle with ``adapt_bundle`` (replay and
the forgetting gate from ``--replay-data``, the PBC data), and score the TEST split
through the device path:

* DeepBioNet (``dbn``): whole frames through the screening pipeline
  (:class:`edgecells.edge.pipeline.Pipeline`); the camera pixel size is what
  ``pixel_size_um = "auto"`` gives for a one-frame session, the red-cell estimate of
  :func:`edgecells.edge.scale.estimate_pixel_size` on the frame itself (DeepBioNet's
  frames come at two scales, ~0.122 and ~0.083 um/px: the source resized about half of
  them; 0.126, the VOC median, where a frame has too few red cells); the cell scored is
  the detected nucleated cell whose centre lies in the frame's single WBC box (nearest its
  centre). No detection there, a skipped frame, or ``unidentified`` count as wrong. The local cells
  are made the site's way: ``--export-crops`` of the train frames with the parent
  bundle, then each frame's crop in its WBC box filed under the frame's subtype (the
  "labelling"), so training sees exactly the device's crops.
* LISC (``lisc``): single-cell crops, ``prepare_crop`` at the model's field (LISC's
  measured 0.155 um/px, calibration/pixel_sizes.py) with the bundle's stain target then
  the bundle's int8 model (what ``edgecells classify --pixel-size 0.155`` does; the local
  cells go through the same, ``edgecells adapt --pixel-size 0.155``), top-1 with the
  bundle's ``min_confidence`` (below it: ``unidentified``, wrong). LISC crops are
  shifted copies of the same cells: training cells are drawn one crop per group (cell),
  and splits are by group (``splits.csv``).

N = 0 is the parent itself. Every bundle is scored on the val and the test split
(``--splits``): settings are chosen on val, test only reports. Prints a JSON line per
point and a Markdown table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DBN_UM_PER_PX = 7.5 / 59.5  # median red-cell box 59.5 px: fallback for a frame's estimate
LISC_UM_PER_PX = 0.155  # calibration/pixel_sizes.py (red-cell circle fit)
_SCALE_CACHE: dict[str, float] = {}
DBN_CLASSES = ("eosinophil", "lymphocyte", "monocyte", "neutrophil")
LISC_CLASSES = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")


def _rows(p: Path) -> list[dict[str, str]]:
    with open(p, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- DeepBioNet


def dbn_frames(split: str) -> list[tuple[str, str, tuple[int, int, int, int]]]:
    """(frame, subtype, WBC box) of the labelled frames of a split with one WBC box."""
    from edgecells.training.detection import read_voc

    root = DATA / "deepbionet"
    splits = {r["frame"]: r["split"] for r in _rows(root / "splits.csv")}
    out = []
    for r in _rows(root / "wbc_subtypes.csv"):
        if splits.get(r["frame"]) != split:
            continue
        ann = root / "annotations" / f"{r['frame']}.xml"
        if not ann.is_file():
            continue
        wbc = read_voc(ann).get("WBC", [])
        if len(wbc) == 1:
            out.append((r["frame"], r["label"], tuple(wbc[0])))
    return out


def frame_pixel_size(frame: str, img: np.ndarray) -> float:
    """What ``pixel_size_um = "auto"`` estimates from this frame alone (cached)."""
    from edgecells.edge.errors import EdgecellsError
    from edgecells.edge.scale import estimate_pixel_size

    if frame not in _SCALE_CACHE:
        try:
            _SCALE_CACHE[frame] = float(estimate_pixel_size([img]).pixel_size_um)
        except EdgecellsError:  # too few isolated red cells
            _SCALE_CACHE[frame] = DBN_UM_PER_PX
    return _SCALE_CACHE[frame]


class _Pipelines:
    """One classifier, a Pipeline per camera pixel size (frames differ in scale)."""

    def __init__(self, bundle: Any) -> None:
        from edgecells.edge.backends import open_classifier
        from edgecells.edge.config import load_config

        self.bundle = bundle
        self.cfg = load_config(None)
        self.clf = open_classifier(bundle, "auto", 1, precision="int8")
        self._by_px: dict[float, Any] = {}

    def process(self, i: int, frame: str, img: np.ndarray) -> Any:
        from edgecells.edge.pipeline import Pipeline
        from edgecells.edge.sources.base import Frame

        px = round(frame_pixel_size(frame, img), 5)
        if px not in self._by_px:
            self.cfg.camera.pixel_size_um = px
            self._by_px[px] = Pipeline(self.cfg, self.bundle, self.clf)
        res, _ = self._by_px[px].process(Frame(i, time.time(), img, frame))
        return res

    def close(self) -> None:
        self.clf.close()


def _cell_in_box(cells: list[dict[str, Any]], box: tuple[int, int, int, int]) -> dict | None:
    x0, y0, x1, y1 = box
    bx, by = (x0 + x1) / 2, (y0 + y1) / 2
    best, dist = None, 1e18
    for c in cells:
        if c["kind"] != "nucleated":
            continue
        cx, cy = c["x"] + c["w"] / 2, c["y"] + c["h"] / 2
        if x0 <= cx <= x1 and y0 <= cy <= y1:
            d = (cx - bx) ** 2 + (cy - by) ** 2
            if d < dist:
                best, dist = c, d
    return best


def dbn_pool(parent: Any, dest: Path) -> dict[str, list[str]]:
    """Export the train frames' crops with the parent (--export-crops), then file each
    frame's WBC-box crop under its subtype: ``dest/<label>/...`` + ``dest/index.csv``."""
    from edgecells.edge.export import CropExporter
    from edgecells.edge.imageio import read_image

    raw = dest.parent / "dbn_export"
    shutil.rmtree(raw, ignore_errors=True)
    exp = CropExporter(raw)
    pipe = _Pipelines(parent)
    pool: dict[str, list[str]] = {c: [] for c in DBN_CLASSES}
    try:
        for i, (frame, label, box) in enumerate(dbn_frames("train")):
            img = read_image(DATA / "deepbionet" / "frames" / f"{frame}.jpg")
            res = pipe.process(i, frame, img)
            if res.status != "ok":
                continue
            exp.add(img, i, frame, res.cells, res.stain_stats)
            c = _cell_in_box(res.cells, box)
            if c is None:
                continue
            from edgecells.edge.export import crop_name

            name = crop_name(i, int(c["cell"]), int(c["crop_x"]), int(c["crop_y"]))
            src = next(raw.glob(f"*/{name}"))
            (dest / label).mkdir(parents=True, exist_ok=True)
            shutil.move(src, dest / label / name)  # the technician's move
            pool[label].append(name)
    finally:
        exp.close()
        pipe.close()
    shutil.copy(raw / "index.csv", dest / "index.csv")
    shutil.rmtree(raw)
    return pool


def dbn_score(bundle: Any, split: str) -> dict[str, Any]:
    from edgecells.edge.imageio import read_image

    pipe = _Pipelines(bundle)
    truth, pred = [], []
    missed = 0
    try:
        for i, (frame, label, box) in enumerate(dbn_frames(split)):
            img = read_image(DATA / "deepbionet" / "frames" / f"{frame}.jpg")
            res = pipe.process(i, frame, img)
            c = _cell_in_box(res.cells, box) if res.status == "ok" else None
            missed += c is None
            truth.append(label)
            pred.append(c["label"] if c else "none")
    finally:
        pipe.close()
    return _score(truth, pred, {"no_detection_or_skipped": missed})


# --------------------------------------------------------------------------- LISC


def lisc_items(split: str) -> list[tuple[str, str, str]]:
    root = DATA / "lisc"
    splits = {r["path"]: r["split"] for r in _rows(root / "splits.csv")}
    return [
        (r["path"], r["class"], r["group"])
        for r in _rows(root / "groups.csv")
        if splits.get(r["path"]) == split
    ]


def lisc_pool(dest: Path) -> dict[str, list[str]]:
    """One crop per cell (group) of the train split, in a seeded order, per class."""
    rng = np.random.default_rng(0)
    by_group: dict[str, tuple[str, str]] = {}
    for path, label, group in sorted(lisc_items("train")):
        by_group.setdefault(group, (path, label))  # first crop of each cell
    pool: dict[str, list[str]] = {c: [] for c in LISC_CLASSES}
    for group in sorted(by_group):
        path, label = by_group[group]
        pool[label].append(path)
    for c in pool:
        pool[c] = [pool[c][i] for i in rng.permutation(len(pool[c]))]
    return pool


def lisc_score(bundle: Any, split: str) -> dict[str, Any]:
    """The split's crops through ``edgecells classify --pixel-size 0.155``'s code."""
    from edgecells.edge.backends import open_classifier
    from edgecells.edge.classify import classify_images

    items = lisc_items(split)
    clf = open_classifier(bundle, "auto", 1, precision="int8")
    try:
        rows = list(
            classify_images([DATA / "lisc" / p for p, _, _ in items], bundle, clf, LISC_UM_PER_PX)
        )
    finally:
        clf.close()
    pred = [r.get("label", "error") for r in rows]
    return _score([lab for _, lab, _ in items], pred, {})


def _score(truth: list[str], pred: list[str], extra: dict[str, Any]) -> dict[str, Any]:
    t, p = np.array(truth), np.array(pred)
    per = {c: round(float(np.mean(p[t == c] == c)), 4) for c in sorted(set(truth))}
    n_per = {c: int(np.sum(t == c)) for c in sorted(set(truth))}
    return {
        "n": len(truth),
        "accuracy": round(float(np.mean(t == p)), 4),
        "recall": per,
        "n_per_class": n_per,
        "unidentified": int(np.sum(p == "unidentified")),
        **extra,
    }


# --------------------------------------------------------------------------- main


def subset_dir(pool_root: Path | None, pool: dict[str, list[str]], n: int, dest: Path) -> None:
    """``dest/<class>/`` with the first n of each class (links), plus index.csv."""
    shutil.rmtree(dest, ignore_errors=True)
    for c, files in pool.items():
        for f in files[:n]:
            if pool_root is None:  # LISC: path relative to the data set
                src = DATA / "lisc" / f
                link = dest / c / Path(f).name
            else:
                src = pool_root / c / f
                link = dest / c / f
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(src, link)
    if pool_root is not None:
        shutil.copy(pool_root / "index.csv", dest / "index.csv")


_PBC_VAL: dict[str, Any] = {}


def pbc_val_accuracy(bundle: Any, replay_data: str) -> float:
    """Top-1 int8 accuracy on the original data's VAL split (as adapt_bundle loads it)."""
    from edgecells.calibration.datasets import load_dataset, load_split
    from edgecells.edge.backends import open_classifier

    if "x" not in _PBC_VAL:
        ds = load_dataset(Path(replay_data), mapping=bundle.class_mapping())
        va = load_split(
            ds,
            "val",
            bundle.input_size,
            bundle.load_stain_target(),
            model_pixel_um=bundle.pixel_size_um,
        )
        _PBC_VAL.update(x=va.x, y=va.y)
    x, y = _PBC_VAL["x"], _PBC_VAL["y"]
    clf = open_classifier(bundle, "auto", 1, precision="int8")
    try:
        probs = np.concatenate([clf.predict(x[i : i + 256]) for i in range(0, len(x), 256)])
    finally:
        clf.close()
    return round(float(np.mean(np.argmax(probs, axis=1) == y)), 5)


def AdaptConfig_default(name: str) -> object:  # noqa: N802
    from edgecells.training.adapt import AdaptConfig

    return getattr(AdaptConfig(), name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", choices=("dbn", "lisc"), required=True)
    ap.add_argument("--sizes", default="0,10,25,50")
    ap.add_argument("--epochs", type=int, default=AdaptConfig_default("epochs"))
    ap.add_argument("--bundle", default=None, help="parent bundle (default: shipped)")
    ap.add_argument("--source-model", default=None, help="parent's Keras model, if not in it")
    ap.add_argument("--replay-data", default=str(DATA / "pbc"))
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the adapted bundles")
    ap.add_argument("--formats", default="tflite", help="int8 formats to convert")
    ap.add_argument("--splits", default="val,test", help="splits scored (choose on val)")
    ap.add_argument("--lr", type=float, default=AdaptConfig_default("learning_rate"))
    ap.add_argument("--tail-layers", type=int, default=AdaptConfig_default("tail_layers"))
    ap.add_argument("--replay-per-class", type=int, default=AdaptConfig_default("replay_per_class"))
    ap.add_argument("--local-share", type=float, default=AdaptConfig_default("local_share"))
    ap.add_argument("--select-drop", type=float, default=AdaptConfig_default("select_drop_pp"))
    ap.add_argument("--no-interpolate", action="store_true", help="keep the fine-tuned weights")
    ap.add_argument("--holdout", type=float, default=AdaptConfig_default("holdout"))
    ap.add_argument("--seed", type=int, default=AdaptConfig_default("seed"))
    ap.add_argument("--soup", type=int, default=AdaptConfig_default("soup"))
    ap.add_argument(
        "--no-train-on-all",
        action="store_true",
        help="ship the gate run's model (trained without the held-out cells)",
    )
    ap.add_argument(
        "--no-refit", action="store_true", help="keep the parent's thresholds (no refit on val)"
    )
    ap.add_argument(
        "--train-bn", action="store_true", help="BatchNorm statistics follow the local cells"
    )
    args = ap.parse_args()
    splits = args.splits.split(",")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from edgecells.convert.adapt import adapt_bundle
    from edgecells.edge.bundle import load_bundle
    from edgecells.training.adapt import AdaptConfig

    if not (DATA / "pbc").is_dir():
        sys.exit("needs ../shared/data (pbc, deepbionet, lisc)")
    work = Path(args.work or tempfile.mkdtemp(prefix="adapt-curves-"))
    work.mkdir(parents=True, exist_ok=True)
    parent = load_bundle(args.bundle)
    if args.dataset == "dbn":
        pool_root: Path | None = work / "dbn_pool"
        shutil.rmtree(pool_root, ignore_errors=True)
        pool = dbn_pool(parent, pool_root)
        score = dbn_score
        px = None  # exported crops carry their geometry in index.csv
    else:
        pool_root = None
        pool = lisc_pool(work / "lisc_pool")
        score = lisc_score
        px = LISC_UM_PER_PX
    print(json.dumps({"pool": {c: len(v) for c, v in pool.items()}}), flush=True)
    parent_pbc_val = pbc_val_accuracy(parent, args.replay_data)
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        t0 = time.perf_counter()
        if n == 0:
            res = {sp: score(parent, sp) for sp in splits}
            row = {"n_per_class": 0, **res, "pbc_val": parent_pbc_val, "pbc_test": None}
        else:
            d = work / f"{args.dataset}_{n}"
            subset_dir(pool_root, pool, n, d)
            out = work / f"bundle_{args.dataset}_{n}"
            shutil.rmtree(out, ignore_errors=True)
            cfg = AdaptConfig(
                epochs=args.epochs,
                # 2: DeepBioNet's train split has only 2-3 monocytes; all of them are used
                min_per_class=2,
                learning_rate=args.lr,
                tail_layers=args.tail_layers,
                replay_per_class=args.replay_per_class,
                local_share=args.local_share,
                select_drop_pp=args.select_drop,
                interpolate=not args.no_interpolate,
                freeze_bn=not args.train_bn,
                holdout=args.holdout,
                seed=args.seed,
                soup=args.soup,
                train_on_all=not args.no_train_on_all,
            )
            r = adapt_bundle(
                args.bundle,
                d,
                out,
                cfg,
                replay_data=args.replay_data,
                source_model=args.source_model,
                pixel_size_um=px,
                formats=args.formats.split(","),
                refit_thresholds=not args.no_refit,
            )
            new = load_bundle(out)
            res = {sp: score(new, sp) for sp in splits}
            m = r.adaptation["metrics"]
            row = {
                "n_per_class": n,
                "local_counts": r.adaptation["local_data"]["counts"],
                "holdout_counts": r.adaptation["local_data"]["holdout_counts"],
                "holdout_acc": [
                    m["before"]["local_holdout"]["accuracy"],
                    m["after"]["local_holdout"]["accuracy"],
                ],
                "local_gate": m.get("local_gate"),
                **res,
                "pbc_val": pbc_val_accuracy(new, args.replay_data),
                "pbc_val_parent": parent_pbc_val,
                "pbc_test": {
                    "parent": m["before"]["check"]["accuracy"],
                    "adapted": m["after"]["check"]["accuracy"],
                    "drop_pp": m["check_drop_pp"],
                },
                "alpha": r.adaptation["interpolation"]["alpha"],
                "alphas_tried": r.adaptation["interpolation"]["tried"],
                "gate_passed": r.passed,
                "failures": r.failures,
                "adapt_seconds": round(r.seconds, 1),
                "train_seconds": r.adaptation["train_seconds"],
                "peak_rss_mb": round(r.peak_rss_mb, 1),
            }
            if not args.keep:
                shutil.rmtree(out)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({"config": vars(args)}))
    for sp in splits:
        print(f"\n| {args.dataset} cells/class | {sp} acc | per class | PBC val | PBC test |")
        print("|---|---|---|---|---|")
        for r in rows:
            t = r[sp]
            per = ", ".join(f"{c} {v:.0%} ({t['n_per_class'][c]})" for c, v in t["recall"].items())
            p = r["pbc_test"]
            pbc = "-" if p is None else f"{p['parent']:.2%} -> {p['adapted']:.2%}"
            print(
                f"| {r['n_per_class']} | {t['accuracy']:.1%} (n={t['n']}) | {per} | "
                f"{r['pbc_val']:.2%} | {pbc} |"
            )


if __name__ == "__main__":
    main()
