"""Self-test samples for a bundle (host side: written by ``edgecells convert``).

``edgecells doctor`` on the device runs them (:func:`edgecells.edge.doctor.run_selftest`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgecells.edge.doctor import SELFTEST_DIR, argmax_labels
from edgecells.edge.errors import EdgecellsError


def make_selftest(
    bundle_root: str | os.PathLike[str],
    crops: Sequence[np.ndarray],
    truths: Sequence[str | None] | None = None,
    backend: str = "auto",
    min_margin: float = 0.2,
    per_class: int = 1,
) -> dict[str, Any]:
    """Add self-test samples to a bundle: prepared crops (input size, RGB uint8) whose
    prediction by the bundle's deploy model has a top-1 minus top-2 probability margin of
    at least ``min_margin`` (so int8 kernels of other runtimes give the same label). With
    ``truths``, only crops predicted as their true class are kept. At most ``per_class``
    per predicted class. Writes ``selftest/*.png`` and the manifest's ``selftest`` entry;
    returns that entry."""
    from edgecells.edge.backends import open_classifier
    from edgecells.edge.bundle import load_bundle, sha256_file, write_manifest
    from edgecells.edge.imageio import write_image

    root = Path(bundle_root)
    b = load_bundle(root)
    precision = "int8" if b.formats("int8") else "float32"
    clf = open_classifier(b, backend, precision=precision)
    try:
        batch = np.stack([np.asarray(c, dtype=np.uint8) for c in crops])
        probs = clf.predict(batch)
        model_id = clf.model.id
    finally:
        clf.close()
    top2 = np.sort(probs, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    labels = argmax_labels(probs, b.classes)
    samples: list[dict[str, Any]] = []
    taken: dict[str, int] = {}
    for i, label in enumerate(labels):
        truth = truths[i] if truths is not None else None
        if margin[i] < min_margin or (truths is not None and truth != label):
            continue
        if taken.get(label, 0) >= per_class:
            continue
        taken[label] = taken.get(label, 0) + 1
        rel = f"{SELFTEST_DIR}/{len(samples):02d}_{label}.png"
        (root / SELFTEST_DIR).mkdir(exist_ok=True)
        write_image(root / rel, batch[i])
        samples.append(
            {
                "path": rel,
                "sha256": sha256_file(root / rel),
                "bytes": (root / rel).stat().st_size,
                "label": label,
                "truth": truth,
                "probability": round(float(probs[i].max()), 4),
            }
        )
    if not samples:
        raise EdgecellsError(
            f"{root}: no crop was predicted with a margin >= {min_margin}"
            + (" and as its true class" if truths is not None else "")
        )
    entry = {"model_id": model_id, "samples": samples}
    manifest = dict(b.manifest)
    manifest["selftest"] = entry
    write_manifest(root, manifest)
    return entry
