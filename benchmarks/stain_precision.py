"""Fixed-point vs float64 Reinhard on real images: the error distribution in levels.

    python benchmarks/stain_precision.py [--pbc 200] [--bccd 100]

Fits a target on half of a seeded sample of PBC crops, normalizes the other half and
BCCD frames with the integer path, and compares with the float64 reference given the
same stained-pixel mask. Prints mean, share within 1 level, 99.9th percentile and max.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np

from edgecells.edge import stain_kernels as K
from edgecells.edge.imageio import list_images, read_image
from edgecells.edge.reinhard_tables import load_tables
from edgecells.edge.stain import ReinhardNormalizer, StainTarget
from edgecells.edge.stain_reference import stats_float, transform_float

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pbc", type=int, default=200)
    ap.add_argument("--bccd", type=int, default=100)
    args = ap.parse_args()
    rng = random.Random(0)
    pbc = rng.sample(list_images(DATA / "pbc"), args.pbc)
    bccd = list_images(DATA / "bccd" / "BCCD" / "JPEGImages")[: args.bccd]
    half = args.pbc // 2
    target = StainTarget.fit([read_image(p) for p in pbc[:half]])
    norm = ReinhardNormalizer(target)
    tables = load_tables()
    counts = np.zeros(256, np.int64)
    skipped = 0
    for p in pbc[half:] + bccd:
        img = read_image(p)
        res = norm.normalize(img)
        if not res.applied:
            skipped += 1
            continue
        params = norm.params(res.stats)
        w = K.weights_np(img, params, tables)
        light = K.lab_q10_np(img, tables)[..., 0]
        mean, std = stats_float(img, (light >= params[11]) & (light < params[9]))
        ref = transform_float(
            img, w / 256.0, mean, std, np.array(target.mean), np.array(target.std)
        )
        counts += np.bincount(np.abs(ref.astype(np.int64) - res.image).ravel(), minlength=256)
    n = counts.sum()
    levels = np.arange(256)
    cdf = np.cumsum(counts) / n
    print(f"images: {len(pbc) - half} PBC + {len(bccd)} BCCD ({skipped} not normalizable)")
    print(f"values compared: {n}")
    print(f"mean |fixed - float64|: {(counts * levels).sum() / n:.4f} levels")
    print(f"within 1 level: {cdf[1] * 100:.4f}%")
    print(f"99.9th percentile: {int(np.searchsorted(cdf, 0.999))} levels")
    print(f"max: {int(levels[counts > 0].max())} levels")


if __name__ == "__main__":
    main()
