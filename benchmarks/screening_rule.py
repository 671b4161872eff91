"""Operating characteristics of the screening flag for a classifier with given per-cell
rates (no model needed): specificity on normal slides and sensitivity at 2/5/10%
abnormal, for several thresholds.

    python benchmarks/screening_rule.py [--cell-sensitivity 0.9] [--cell-fpr 0.02]
        [--thresholds 0.05,0.03,0.02,0.01] [--slides 2000] [--cells 200]

Uses the same simulation as ``edgecells evaluate screening`` (edge/screening.py), with
labels drawn from the given rates instead of a bundle's predictions.
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import numpy as np

from edgecells.training.slides import simulate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cell-sensitivity", type=float, default=0.9)
    ap.add_argument("--cell-fpr", type=float, default=0.02)
    ap.add_argument("--thresholds", default="0.05,0.03,0.02,0.01")
    ap.add_argument("--slides", type=int, default=2000)
    ap.add_argument("--cells", type=int, default=200)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    truth = ["ig"] * 2000 + ["neutrophil"] * 8000
    labels = [
        ("ig" if rng.random() < (a.cell_sensitivity if t == "ig" else a.cell_fpr) else "neutrophil")
        for t in truth
    ]
    for th in (float(x) for x in a.thresholds.split(",")):
        bundle = SimpleNamespace(
            classes=["ig", "neutrophil"],
            abnormal_classes=["ig"],
            thresholds={
                "min_confidence": 0.5,
                "screening": {
                    "min_cells": 100,
                    "abnormal_fraction": th,
                    "confidence": 0.95,
                    "false_positive_rate": a.cell_fpr,
                },
            },
        )
        r = simulate(bundle, None, labels, truth, a.slides, a.cells, [0.02, 0.05, 0.10])
        c = r["conditions"]
        print(
            f"threshold {th:.3f}: specificity {c[0]['specificity']:.4f}  sensitivity 2% "
            f"{c[1]['sensitivity']:.3f}  5% {c[2]['sensitivity']:.3f}  10% "
            f"{c[3]['sensitivity']:.4f}"
        )


if __name__ == "__main__":
    main()
