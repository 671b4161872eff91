"""Evaluate a cell classifier (a ``.keras`` model or a model bundle) on a labelled split.

A ``.keras`` model reads its side files from its folder (written by training):
``mapping.json`` (else the ``pbc8`` preset), ``target.json`` (stain target; absent = the
model was trained without stain normalization) and ``metrics.json`` (the abnormal
operating point chosen on the validation split). A bundle carries all of these in its
manifest and runs on an edge backend (LiteRT / ONNX Runtime / OpenVINO), through the
same :func:`edgecells.edge.preprocess.prepare_crop` as the device.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgecells.calibration.datasets import Progress, load_dataset, load_split
from edgecells.edge.errors import EdgecellsError
from edgecells.edge.mappings import ClassMapping, load_mapping
from edgecells.edge.metrics import ClassifierMetrics, evaluate_probabilities
from edgecells.edge.stain import StainTarget

DEFAULT_OPERATING_POINT = 0.5  # used only when neither the model nor the user gives one


@dataclass
class LoadedModel:
    """A model ready to predict uint8 N x S x S x 3 -> probabilities N x C."""

    kind: str  # "keras" or "bundle:<model id>"
    size: int
    mapping: ClassMapping
    target: StainTarget | None
    operating_point: float | None
    predictor: Any  # callable(np.ndarray uint8) -> np.ndarray probabilities
    pixel_size_um: float | None = None  # the model's input pixel size (None: legacy model)


@dataclass
class Evaluation:
    metrics: ClassifierMetrics
    y_true: np.ndarray
    probs: np.ndarray
    skipped: list[tuple[str, str]]


def _read_json(p: Path) -> Any:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EdgecellsError(f"{p}: cannot read JSON ({exc})") from None


def load_keras_model(path: Path, batch: int = 256) -> LoadedModel:
    """A ``.keras`` classifier with its side files (mapping, stain target, metrics)."""
    import keras

    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as exc:  # noqa: BLE001 - any load failure is a bad model file
        raise EdgecellsError(f"{path}: cannot load Keras model ({type(exc).__name__})") from None
    shape = model.input_shape
    if len(shape) != 4 or shape[1] != shape[2] or shape[3] != 3:
        raise EdgecellsError(f"{path}: model input {shape} is not a square RGB image")
    folder = path.parent
    mapping = (
        load_mapping(folder / "mapping.json")
        if (folder / "mapping.json").is_file()
        else load_mapping()
    )
    if int(model.output_shape[-1]) != mapping.num_classes:
        raise EdgecellsError(
            f"{path}: model has {model.output_shape[-1]} outputs but mapping {mapping.name} "
            f"has {mapping.num_classes} classes"
        )
    target = (
        StainTarget.load(folder / "target.json") if (folder / "target.json").is_file() else None
    )
    op = None
    px = None
    if (folder / "metrics.json").is_file():
        m = _read_json(folder / "metrics.json")
        op = m.get("operating_point") if isinstance(m, dict) else None
        px = m.get("preprocess", {}).get("pixel_size_um") if isinstance(m, dict) else None
        stain = isinstance(m, dict) and m.get("config", {}).get("stain", False)
        if stain and target is None:
            raise EdgecellsError(
                f"{folder / 'target.json'}: missing; the model was trained with stain "
                "normalization and needs its stain target"
            )

    def predict(x: np.ndarray) -> np.ndarray:
        out = [
            np.asarray(model(x[i : i + batch].astype(np.float32), training=False))
            for i in range(0, len(x), batch)
        ]
        return np.concatenate(out) if out else np.zeros((0, mapping.num_classes))

    return LoadedModel("keras", int(shape[1]), mapping, target, op, predict, px)


def load_bundle_model(
    path: Path, backend: str = "auto", precision: str = "int8", threads: int | None = None
) -> LoadedModel:
    """A bundle's model on an edge backend (thin wrapper over edge.bundle/backends)."""
    from edgecells.edge.backends import open_classifier
    from edgecells.edge.bundle import load_bundle

    b = load_bundle(path)
    clf = open_classifier(b, backend=backend, threads=threads, precision=precision)
    th = b.thresholds or {}
    op = th.get("operating_point", (b.validation or {}).get("classifier_operating_point"))
    kind = f"bundle:{getattr(getattr(clf, 'model', None), 'id', backend)}"
    return LoadedModel(
        kind,
        b.input_size,
        b.class_mapping(),
        b.load_stain_target(),
        op,
        clf.predict,
        b.preprocessing.get("pixel_size_um"),
    )


def load_model(
    model: str | os.PathLike[str],
    backend: str = "auto",
    precision: str = "int8",
    threads: int | None = None,
) -> LoadedModel:
    """A ``.keras`` file, or a bundle folder / manifest.json / archive."""
    p = Path(model)
    if not p.exists():
        raise EdgecellsError(f"{p}: no such model file or bundle")
    if p.is_file() and p.suffix == ".keras":
        return load_keras_model(p)
    if p.is_dir() and not (p / "manifest.json").is_file():
        raise EdgecellsError(f"{p}: not a bundle folder (no manifest.json) and not a .keras file")
    return load_bundle_model(p, backend, precision, threads)


def evaluate_classifier(
    model: str | os.PathLike[str],
    data: str | os.PathLike[str],
    split: str = "test",
    operating_point: float | None = None,
    backend: str = "auto",
    precision: str = "int8",
    cache_dir: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    seed: int = 0,
    pixel_size_um: float | None = None,
) -> Evaluation:
    """Score ``model`` on ``split`` of ``data`` with the model's own preprocessing.

    ``pixel_size_um``: the images' pixel size (default: the data set's measured value,
    :mod:`edgecells.calibration.pixel_sizes`); each image is cut at the model's field and
    resampled to its pixel size, as on the device.
    """
    lm = load_model(model, backend, precision)
    dataset = load_dataset(data, mapping=lm.mapping, seed=seed)
    loaded = load_split(
        dataset,
        split,
        lm.size,
        lm.target,
        cache_dir,
        progress,
        model_pixel_um=lm.pixel_size_um,
        pixel_size_um=pixel_size_um,
    )
    if len(loaded.x) == 0:
        raise EdgecellsError(f"{data}: split {split!r} has no readable images")
    t0 = time.perf_counter()
    probs = np.asarray(lm.predictor(loaded.x), dtype=np.float64)
    ms = (time.perf_counter() - t0) * 1000.0 / len(loaded.x)
    op = operating_point if operating_point is not None else lm.operating_point
    metrics = evaluate_probabilities(
        loaded.y,
        probs,
        lm.mapping.classes,
        lm.mapping.abnormal_indices,
        float(op) if op is not None else DEFAULT_OPERATING_POINT,
        ms,
    )
    metrics.extra.update(
        {
            "split": split,
            "model": str(model),
            "model_kind": lm.kind,
            "input_size": lm.size,
            "model_pixel_size_um": lm.pixel_size_um,
            "image_pixel_size_um": pixel_size_um,
            "stain_normalization": lm.target is not None,
            "skipped": [{"path": p, "reason": r} for p, r in dataset.missing + loaded.skipped],
        }
    )
    return Evaluation(metrics, loaded.y, probs, dataset.missing + loaded.skipped)


def plot_evaluation(ev: Evaluation, path: str | os.PathLike[str]) -> Path:
    """Write a PNG with the confusion matrix and the normal-vs-abnormal ROC."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgecells.edge.metrics import roc_curve, sensitivity_specificity

    m = ev.metrics
    cm = np.array(m.confusion_matrix)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.5))
    ax1.imshow(cm, cmap="Blues")
    n = len(m.classes)
    ax1.set_xticks(range(n), m.classes, rotation=45, ha="right")
    ax1.set_yticks(range(n), m.classes)
    ax1.set_xlabel("predicted")
    ax1.set_ylabel("true")
    ax1.set_title(f"confusion matrix (accuracy {m.accuracy:.4f}, n={m.n})")
    vmax = cm.max() if cm.size else 1
    for i in range(n):
        for j in range(n):
            ax1.text(
                j,
                i,
                str(cm[i, j]),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if cm[i, j] > vmax / 2 else "black",
            )
    ab = [m.classes.index(c) for c in m.abnormal_classes]
    y_bin = np.isin(ev.y_true, ab)
    score = ev.probs[:, ab].sum(axis=1)
    if y_bin.any() and (~y_bin).any():
        fpr, tpr, _ = roc_curve(y_bin, score)
        ax2.plot(fpr, tpr, lw=2, label=f"AUC {m.auc_abnormal:.4f}")
        sens, spec = sensitivity_specificity(y_bin, score, m.operating_point)
        ax2.plot([1 - spec], [sens], "o", label=f"operating point {m.operating_point:.3g}")
        ax2.legend(loc="lower right")
    ax2.plot([0, 1], [0, 1], "--", color="gray", lw=1)
    ax2.set_xlabel("1 - specificity (normal cells flagged)")
    ax2.set_ylabel("sensitivity (abnormal cells found)")
    ax2.set_title("normal vs abnormal ROC")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
