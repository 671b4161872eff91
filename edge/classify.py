"""Classify single-cell images (``edgecells classify``): one row per image.

Each image is taken as one cell in its centre, cut at the bundle's field of view and
resampled from the image's pixel size (``pixel_size_um``) to the model's, then
stain-normalized — :func:`edgecells.edge.preprocess.prepare_crop`, the same steps as the
device pipeline's crops. Without a pixel size, the image's centre square is taken as the
model's whole field.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgecells.edge.errors import EdgecellsError
from edgecells.edge.imageio import IMAGE_SUFFIXES, read_image
from edgecells.edge.preprocess import prepare_crop
from edgecells.edge.screening import UNIDENTIFIED, ScreeningRule, label_cells


def expand_inputs(inputs: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Image files given directly, plus the image files inside given folders (sorted,
    recursive). A missing path or a folder without images is an error."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                raise EdgecellsError(f"{p}: no images in this folder")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise EdgecellsError(f"{p}: no such file or folder")
    if not out:
        raise EdgecellsError("no images given")
    return out


def classify_images(
    paths: list[Path],
    bundle: Any,
    classifier: Any,
    pixel_size_um: float | None = None,
    batch: int = 64,
) -> Iterator[dict[str, Any]]:
    """Yield one row per image: path, label, confidence, p_abnormal, unidentified (or
    ``error`` for an unreadable image, which is skipped, not fatal)."""
    if pixel_size_um is not None and not pixel_size_um > 0:
        raise EdgecellsError(f"--pixel-size must be > 0 µm/px, got {pixel_size_um}")
    from edgecells.edge.stain import ReinhardNormalizer

    target = bundle.load_stain_target()
    norm = ReinhardNormalizer(target) if target is not None else None
    size = bundle.input_size
    model_px = bundle.pixel_size_um if pixel_size_um is not None else None
    rule = ScreeningRule.from_bundle(bundle.thresholds)
    classes = list(bundle.classes)
    ab = np.asarray(bundle.abnormal_mask, dtype=bool)
    for i in range(0, len(paths), batch):
        chunk = paths[i : i + batch]
        ok: list[tuple[Path, np.ndarray]] = []
        for p in chunk:
            try:
                ok.append((p, prepare_crop(read_image(p), norm, size, pixel_size_um, model_px)))
            except EdgecellsError as exc:
                yield {"path": str(p), "error": str(exc)}
        if not ok:
            continue
        probs = np.asarray(classifier.predict(np.stack([x for _, x in ok])), dtype=np.float64)
        labels = label_cells(probs, classes, rule.min_confidence)
        for (p, _), pr, lab in zip(ok, probs, labels):
            top = int(pr.argmax())
            yield {
                "path": str(p),
                "label": lab,
                "top_class": classes[top],
                "confidence": round(float(pr[top]), 6),
                "p_abnormal": round(float(pr[ab].sum()), 6),
                "unidentified": lab == UNIDENTIFIED,
            }
