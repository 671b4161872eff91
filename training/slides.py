"""Simulated slides from labelled single-cell images (host-side evaluation of the flag).

The flag rule itself lives in :mod:`edgecells.edge.screening` (it runs on the device);
this module draws slides from a classified labelled split
(:func:`edgecells.training.abstention.run_split` classifies it through the device path).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from edgecells.edge.errors import EdgecellsError
from edgecells.edge.screening import (
    FLAGS,
    NEGATIVE,
    NON_NUCLEATED,
    POSITIVE,
    REVIEW,
    UNIDENTIFIED,
    ScreeningRule,
    Tally,
)


def simulate(
    bundle: Any,
    cfg: Any,
    labels: list[str],
    truth: list[str],
    slides: int,
    cells: int,
    fractions: Sequence[float],
    seed: int = 0,
) -> dict[str, Any]:
    """Simulated slides: ``cells`` nucleated cells drawn (with replacement) from the
    classified cells; normal slides hold normal cells only, abnormal slides
    ``round(f * cells)`` abnormal cells. Returns flag counts, specificity (NEGATIVE /
    normal slides), sensitivity (POSITIVE / abnormal slides) and the share of abnormal
    slides flagged POSITIVE or REVIEW (sent to a person)."""
    rng = np.random.default_rng(seed)
    rule = ScreeningRule.from_bundle(bundle.thresholds, cfg.screening if cfg else None)
    # the drawn cells are nucleated: as on the device (agree_with_detector), one the
    # classifier calls a platelet is unidentified, not dropped from the slide
    labels = [
        UNIDENTIFIED if lbl.lower() in NON_NUCLEATED and t.lower() not in NON_NUCLEATED else lbl
        for lbl, t in zip(labels, truth)
    ]
    abnormal_set = set(bundle.abnormal_classes)
    nucleated = [i for i, t in enumerate(truth) if t.lower() not in NON_NUCLEATED]
    normal_idx = np.array([i for i in nucleated if truth[i] not in abnormal_set])
    abn_idx = np.array([i for i in nucleated if truth[i] in abnormal_set])
    if len(normal_idx) == 0 or len(abn_idx) == 0:
        raise EdgecellsError("screening evaluation needs normal and abnormal test cells")
    ab_flags = [c in abnormal_set for c in bundle.classes]
    conditions = []
    for f in [0.0, *fractions]:
        k = int(round(f * cells))
        flags = dict.fromkeys(FLAGS, 0)
        for _ in range(slides):
            pick = np.concatenate(
                [rng.choice(abn_idx, k), rng.choice(normal_idx, cells - k)]
            ).astype(int)
            t = Tally(bundle.classes, ab_flags)
            for i in pick:
                t.add(labels[i])
            flags[t.result(rule).flag] += 1
        row: dict[str, Any] = {
            "name": "normal" if f == 0 else f"abnormal {f:.0%}",
            "fraction": f,
            "slides": slides,
            **flags,
        }
        if f == 0:
            row["specificity"] = flags[NEGATIVE] / slides
        else:
            row["sensitivity"] = flags[POSITIVE] / slides
            row["positive_or_review"] = (flags[POSITIVE] + flags[REVIEW]) / slides
        conditions.append(row)
    # per-cell rates on this split (the rule's own were fitted on the validation split)
    n_norm = len(normal_idx)
    fp = sum(labels[i] in abnormal_set for i in normal_idx) / n_norm
    tp = sum(labels[i] in abnormal_set for i in abn_idx) / len(abn_idx)
    return {
        "cells_per_slide": cells,
        "slides_per_condition": slides,
        "seed": seed,
        "rule": asdict(rule),
        "cell_false_positive_rate": round(fp, 4),
        "cell_sensitivity": round(tp, 4),
        "unidentified_rate": round(sum(lbl == UNIDENTIFIED for lbl in labels) / len(labels), 4),
        "conditions": conditions,
    }
