"""Replay sets: a few of a model's original training images (and a held-out check set),
stored in a bundle so that ``edgecells adapt`` can keep them in the mix where the
original data is not at hand. Written by ``edgecells convert`` (convert/trainfiles.py),
read by the adaptation (training/adapt.py)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from edgecells.edge.errors import EdgecellsError

REPLAY_FORMAT = "edgecells.replay/1"


def stratified_subset(y: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """Indices of up to ``per_class`` items of each label (seeded, sorted)."""
    rng = np.random.default_rng(seed)
    idx = [i for c in np.unique(y) for i in rng.permutation(np.flatnonzero(y == c))[:per_class]]
    return np.sort(np.asarray(idx, dtype=np.int64))


def write_replay(
    path: Path,
    x: np.ndarray,
    y: np.ndarray,
    classes: list[str],
    meta: dict[str, Any],
    check_x: np.ndarray | None = None,
    check_y: np.ndarray | None = None,
) -> None:
    """``replay.npz`` (no pickle): x, y, check_x, check_y, classes, meta (JSON)."""
    s = int(x.shape[1])
    cx = check_x if check_x is not None else np.zeros((0, s, s, 3), np.uint8)
    cy = check_y if check_y is not None else np.zeros(0, np.int64)
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        x=np.asarray(x, np.uint8),
        y=np.asarray(y, np.int64),
        check_x=np.asarray(cx, np.uint8),
        check_y=np.asarray(cy, np.int64),
        classes=np.array(classes, dtype=str),
        meta=np.array(json.dumps({"format": REPLAY_FORMAT, **meta})),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())


def read_replay(path: Path) -> dict[str, Any]:
    """Load ``replay.npz`` (pickle disabled); EdgecellsError naming it when unusable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            d = {k: z[k] for k in ("x", "y", "check_x", "check_y", "classes")}
            meta = json.loads(str(z["meta"]))
    except (OSError, ValueError, KeyError) as exc:
        raise EdgecellsError(f"{path}: not a replay set ({exc})") from None
    if meta.get("format") != REPLAY_FORMAT:
        raise EdgecellsError(f"{path}: unsupported replay format {meta.get('format')!r}")
    d["classes"] = [str(c) for c in d["classes"]]
    d["meta"] = meta
    return d
