"""The ``training`` files of a bundle: what ``edgecells adapt`` needs to fine-tune it.

* ``training/model.keras`` (role ``source``): the float Keras model the int8 models were
  converted from, byte for byte when the source was a ``.keras`` file (its SHA-256 is
  then the manifest's ``provenance.source_model_sha256``).
* ``training/replay.npz``: the original training data to keep in the mix while adapting
  (replay), and a small held-out check set to measure forgetting where the original
  data is not at hand (on the device). ``x``/``y``: the calibration set (drawn from the
  training split, stratified, already through ``prepare_crop`` with the bundle's stain
  target); ``check_x``/``check_y``: up to :data:`CHECK_PER_CLASS` images per class of
  the held-out validation data given to ``convert``.

Both are listed in the manifest with SHA-256 and size and verified on load like the
models. Together they add about 7.7 MB to a 64 px bundle (3.1 MB model, 4.7 MB
replay and check images).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from edgecells.calibration.replay import stratified_subset, write_replay
from edgecells.edge.bundle import file_entry

TRAIN_DIR = "training"
SOURCE_NAME = f"{TRAIN_DIR}/model.keras"
REPLAY_NAME = f"{TRAIN_DIR}/replay.npz"
CHECK_PER_CLASS = 25


def add_training_files(
    out: Path,
    manifest: dict[str, Any],
    source: Any,
    replay_x: np.ndarray,
    replay_y: np.ndarray,
    replay_desc: str,
    check_x: np.ndarray | None = None,
    check_y: np.ndarray | None = None,
    check_desc: str = "",
    extra_meta: dict[str, Any] | None = None,
) -> None:
    """Write the training files into bundle folder ``out`` and the manifest's
    ``training`` section (``source``: a Keras :class:`~.source.SourceModel`)."""
    classes = list(manifest["classes"])
    dest = out / SOURCE_NAME
    dest.parent.mkdir(parents=True, exist_ok=True)
    if source.path.suffix == ".keras" and source.path.is_file() and source.sha256:
        shutil.copyfile(source.path, dest)  # byte for byte: the hash provenance names
    else:
        source.keras_model.save(dest)
    if check_x is not None and check_y is not None and len(check_y):
        keep = stratified_subset(np.asarray(check_y), CHECK_PER_CLASS)
        check_x, check_y = np.asarray(check_x)[keep], np.asarray(check_y)[keep]
    else:
        check_x = check_y = None
    counts = {c: int(np.sum(replay_y == i)) for i, c in enumerate(classes)}
    check_counts = (
        {c: int(np.sum(check_y == i)) for i, c in enumerate(classes)} if check_y is not None else {}
    )
    meta = {
        "replay_data": replay_desc,
        "check_data": check_desc if check_y is not None else "",
        "counts": counts,
        "check_counts": check_counts,
        "stain_target": (manifest.get("stain_target") or {}).get("mean_q10"),
        **(extra_meta or {}),
    }
    write_replay(out / REPLAY_NAME, replay_x, replay_y, classes, meta, check_x, check_y)
    src_entry = file_entry(out, SOURCE_NAME).to_dict()
    rep_entry = file_entry(out, REPLAY_NAME).to_dict()
    manifest["training"] = {
        "source_model": {**src_entry, "format": "keras", "role": "source"},
        "replay": {
            **rep_entry,
            "n": int(len(replay_y)),
            "counts": counts,
            "data": replay_desc,
            "check_n": int(len(check_y)) if check_y is not None else 0,
            "check_data": meta["check_data"],
        },
    }
