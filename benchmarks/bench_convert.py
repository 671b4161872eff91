"""Conversion figures: time, int8/float32 size and int8 cost, per format.

    # the reference model (targets: <2 min for all three formats, int8 within 0.5 pp,
    # agreement >= 99%, int8 <= 30% of float32):
    python benchmarks/bench_convert.py --model models/reference/model.keras \\
        --calibration calib.npz --validate ../shared/data/pbc
    # every zoo architecture (random weights, synthetic calibration set):
    python benchmarks/bench_convert.py --zoo all

Prints one table row per (model, format) and, with ``--json``, the rows as JSON.
Record results in benchmarks/RESULTS.md with the exact command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _rows(name: str, res: Any, extra: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for r in res.formats:
        v = r.validation
        rows.append(
            {
                "model": name,
                "format": r.format,
                "converts": r.error is None,
                "error": r.error,
                "convert_s": round(r.seconds, 1),
                "int8_MB": round(r.int8_bytes / 1e6, 3),
                "float32_MB": round(r.float32_bytes / 1e6, 3),
                "ratio": round(r.size_ratio, 3) if r.error is None else None,
                "acc_float32": v.float32.accuracy if v else None,
                "acc_int8": v.int8.accuracy if v else None,
                "drop_pp": v.accuracy_drop_pp if v else None,
                "auc_int8": v.int8.auc_abnormal if v else None,
                "agreement": v.agreement if v else None,
                "prob_diff_max": v.prob_diff_max if v else None,
                "ms_img_int8": v.ms_per_image_int8 if v else None,
                "ms_img_float32": v.ms_per_image_float32 if v else None,
                **extra,
            }
        )
    return rows


def bench_model(args: argparse.Namespace) -> list[dict[str, Any]]:
    from edgecells.calibration.calibset import load_calibset
    from edgecells.calibration.datasets import load_dataset, load_split
    from edgecells.convert.pipeline import convert_model, parse_formats
    from edgecells.convert.source import load_source
    from edgecells.edge.mappings import load_mapping
    from edgecells.edge.stain import StainTarget

    mapping = load_mapping(args.mapping)
    calib = load_calibset(args.calibration)
    t0 = time.perf_counter()
    src = load_source(args.model)
    load_s = time.perf_counter() - t0
    val_x = val_y = None
    desc = ""
    if args.validate:
        t = calib.manifest.get("stain_target")
        ds = load_dataset(args.validate, mapping=mapping)
        split = load_split(ds, "test", src.input_size, StainTarget.from_dict(t) if t else None)
        val_x, val_y = split.x, split.y
        desc = f"{Path(args.validate).name} test split ({split.x.shape[0]} images)"
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-convert-"))
    t0 = time.perf_counter()
    res = convert_model(
        src,
        calib,
        out,
        parse_formats(args.formats),
        classes=list(mapping.classes),
        mapping=mapping.to_dict(),
        val_x=val_x,
        val_y=val_y,
        val_desc=desc,
        max_drop=100.0,
        threads=args.threads,
        analyse_layers=False,
    )
    total = time.perf_counter() - t0
    convert_total = sum(r.seconds for r in res.formats)
    print(
        f"{src.name}: load {load_s:.1f}s, conversion of {len(res.formats)} formats "
        f"{convert_total:.1f}s, with validation {total:.1f}s; bundle {out}",
        file=sys.stderr,
    )
    return _rows(src.name, res, {"all_formats_convert_s": round(convert_total, 1)})


def bench_zoo(args: argparse.Namespace) -> list[dict[str, Any]]:
    from edgecells.convert import zoo
    from edgecells.convert.pipeline import convert_model, parse_formats
    from edgecells.convert.source import from_keras

    names = list(zoo.ZOO) if args.zoo == "all" else args.zoo.split(",")
    rows: list[dict[str, Any]] = []
    for name in names:
        classes, mapping, task = zoo.classes_and_mapping(name)
        t0 = time.perf_counter()
        model = zoo.build(name)
        build_s = time.perf_counter() - t0
        calib = zoo.synthetic_calibration(model.input_shape[1], args.calib_images)
        with tempfile.TemporaryDirectory(prefix="bench-zoo-") as tmp:
            res = convert_model(
                from_keras(model, Path(f"{name}.keras")),
                calib,
                Path(tmp) / name,
                parse_formats(args.formats),
                classes=classes,
                mapping=mapping,
                task=task,
                max_drop=100.0,
                continue_on_error=True,
                analyse_layers=False,
                threads=args.threads,
            )
        rows += _rows(
            name,
            res,
            {"params_M": round(model.count_params() / 1e6, 2), "build_s": round(build_s, 1)},
        )
        print(f"{name}: done in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        del model
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", help="model to convert (.keras/.h5/SavedModel/.onnx)")
    ap.add_argument("--calibration", help="calibration .npz (with --model)")
    ap.add_argument("--validate", help="labelled data folder; its test split is used")
    ap.add_argument("--mapping", default="pbc8")
    ap.add_argument("--out", help="bundle folder to keep (default: a temporary one)")
    ap.add_argument("--zoo", help="'all' or comma-separated zoo names")
    ap.add_argument("--formats", default="tflite,openvino,onnx")
    ap.add_argument("--calib-images", type=int, default=100, help="zoo synthetic set size")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not args.model and not args.zoo:
        ap.error("give --model (with --calibration) or --zoo")
    from edgecells.convert.pipeline import stdout_to_stderr

    rows: list[dict[str, Any]] = []
    if args.model and not args.calibration:
        ap.error("--model needs --calibration")
    with stdout_to_stderr():  # converters print to stdout; keep it for the results
        if args.model:
            rows += bench_model(args)
        if args.zoo:
            rows += bench_zoo(args)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    cols = [
        "model",
        "format",
        "converts",
        "convert_s",
        "int8_MB",
        "float32_MB",
        "ratio",
        "acc_float32",
        "acc_int8",
        "drop_pp",
        "agreement",
        "ms_img_int8",
    ]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join("-" if r.get(c) is None else str(r.get(c)) for c in cols) + " |")


if __name__ == "__main__":
    main()
