"""Site adaptation on a Pi-class budget: time and peak memory of `edgecells adapt` for 25
labelled cells per class, CPU only, the device way (the bundle's own replay and check
sets; no original data at hand).

    nice -n 5 python benchmarks/bench_adapt.py [--epochs 8] [--per-class 25]

1. Baseline, same run: `edgecells convert` of the reference model (models/reference/
   model.keras, PBC calibration set of 300 at the model's field, validation on the PBC
   test split) into a
   trainable bundle (it carries training/model.keras and training/replay.npz).
2. 25 LISC training cells per class (one crop per cell), then `edgecells adapt
   --pixel-size 0.155` (LISC's measured pixel size: the cells are cut at the model's
   field, as `edgecells classify --pixel-size` does) on that bundle in a child process
   (CUDA hidden): wall time and its peak resident memory
   (getrusage in the child, reported in its --json), against the 10-minute target and
   the conversion baseline.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
TARGET_S = 600.0
LISC_UM_PER_PX = 0.155  # calibration/pixel_sizes.py


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS MiB of the child, stdout."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 3):
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return wall, max(peak, before) / 1024, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--per-class", type=int, default=25)
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    if not (DATA / "pbc").is_dir() or not (DATA / "lisc").is_dir():
        sys.exit("needs ../shared/data/pbc and ../shared/data/lisc")
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-adapt-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"}
    ec = [sys.executable, "-m", "edgecells"]

    # the reference model's physical field (training's metrics.json)
    metrics = json.loads((ROOT / "models/reference/metrics.json").read_text())
    model_px = float(metrics["preprocess"]["pixel_size_um"])
    calib = work / "calib.npz"
    if not calib.is_file():
        subprocess.run(
            ec + ["calibrate", "--data", str(DATA / "pbc"), "--target",
                  str(ROOT / "models/reference/target.json"), "--size", "64",
                  "--pixel-size", str(model_px), "--out", str(calib), "--no-coverage",
                  "--json"],
            check=True, capture_output=True, env=env,
        )  # fmt: skip
    parent = work / "parent"
    conv_s, conv_mb, _ = run(
        ec + ["convert", str(ROOT / "models/reference/model.keras"), "--calibration",
              str(calib), "--validate", str(DATA / "pbc"), "--out", str(parent), "--json"],
        env,
    )  # fmt: skip
    size_mb = sum(f.stat().st_size for f in parent.rglob("*") if f.is_file()) / 1e6
    train_mb = sum(f.stat().st_size for f in (parent / "training").rglob("*")) / 1e6

    with open(DATA / "lisc" / "splits.csv", newline="") as f:
        split = {r["path"]: r["split"] for r in csv.DictReader(f)}
    with open(DATA / "lisc" / "groups.csv", newline="") as f:
        first: dict[str, tuple[str, str]] = {}
        for r in sorted(csv.DictReader(f), key=lambda r: r["path"]):
            if split.get(r["path"]) == "train":
                first.setdefault(r["group"], (r["path"], r["class"]))
    cells = work / "cells"
    taken: dict[str, int] = {}
    for path, label in first.values():
        if taken.get(label, 0) >= args.per_class:
            continue
        taken[label] = taken.get(label, 0) + 1
        dst = cells / label / Path(path).name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            os.symlink(DATA / "lisc" / path, dst)

    new = work / "adapted"
    if new.exists():
        import shutil

        shutil.rmtree(new)
    ad_s, _, out = run(
        ec + ["adapt", "--bundle", str(parent), "--data", str(cells), "--out", str(new),
              "--epochs", str(args.epochs), "--pixel-size", str(LISC_UM_PER_PX), "--json",
              "--force"],
        env,
    )  # fmt: skip
    res = json.loads(out)
    two_pass = bool(res["metrics"].get("local_gate"))
    m = res["metrics"]
    gate = m["local_gate"] if two_pass else {k: m[k]["local_holdout"] for k in ("before", "after")}
    report = {
        "machine": f"{os.cpu_count()} CPUs, CPU only",
        "load_average_1min": round(os.getloadavg()[0], 1),
        "cells": taken,
        "epochs": args.epochs,
        "convert_baseline_s": round(conv_s, 1),
        "convert_peak_rss_mb": round(conv_mb, 1),
        "bundle_mb": round(size_mb, 2),
        "training_files_mb": round(train_mb, 2),
        "adapt_s": round(ad_s, 1),
        "adapt_train_s": res["train_seconds"],
        "adapt_peak_rss_mb": res["peak_rss_mb"],  # the adapt process's own getrusage
        "adapt_vs_target": round(ad_s / TARGET_S, 3),
        "adapt_vs_convert": round(ad_s / conv_s, 2),
        "gate_passed": res["passed"],
        "failures": res["failures"],
        "alpha": res["interpolation"]["alpha"],
        "check_before_after": [
            res["metrics"]["before"]["check"]["accuracy"],
            res["metrics"]["after"]["check"]["accuracy"],
        ],
        # the held-out cells' gate: parent against the run fine-tuned without them (float);
        # with --no-train-on-all (one pass) the shipped int8 model's figures instead
        "local_holdout_before_after": [
            gate["before"]["accuracy"],
            gate["after"]["accuracy"],
        ],
        "local_holdout_scored_on": "gate run, float" if two_pass else "shipped model, int8",
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
