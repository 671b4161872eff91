"""Site adaptation, the training half: read a folder of locally labelled cells, turn them
into exactly the model inputs the device made, and fine-tune the parent's float model
on them with the original training data in the mix (replay). CPU only; TensorFlow is
imported inside the functions. ``edgecells.convert.adapt`` wires this to conversion,
gating and the new bundle.

The local data folder (what ``edgecells screen --export-crops DIR`` writes, after a
technician moved each file into the right class folder)::

    DIR/<class>/*.png|jpg    one folder per class of the bundle; the folder is the label
    DIR/index.csv            optional: frame statistics and geometry of exported crops
    DIR/unidentified/, DIR/_*/   ignored (cells nobody labelled, rejects)

A crop listed in ``index.csv`` (matched by file name) is rebuilt as the device saw it:
reflected at the frame edge to the full square (the model's field), resampled, normalized
with its own statistics (:func:`edgecells.edge.export.device_input`). Any other image is a
single-cell crop and goes through ``prepare_crop`` as ``edgecells classify`` does: cut at
the model's field around its centre when the images' pixel size is given
(``--pixel-size``), else its centre square resampled whole.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgecells.edge.errors import EdgecellsError
from edgecells.edge.export import INDEX_NAME, device_input, read_index
from edgecells.edge.imageio import IMAGE_SUFFIXES, read_image
from edgecells.training.train import AugmentConfig, TrainConfig, make_train_dataset

MIN_PER_CLASS = 3  # fewer labelled cells than this in a class folder: refuse
UNLABELLED_FOLDERS = ("unidentified",)  # plus any folder whose name starts with _ or .


@dataclass
class LocalCells:
    """Locally labelled cells as model inputs (``x`` N x S x S x 3 uint8, ``y`` indices
    into ``classes``), with the files they came from."""

    root: Path
    classes: list[str]
    x: np.ndarray
    y: np.ndarray
    files: list[str]  # relative to root, posix
    sha256: list[str]
    from_index: int  # how many were rebuilt from index.csv (frame statistics)

    def counts(self, idx: np.ndarray | None = None) -> dict[str, int]:
        y = self.y if idx is None else self.y[idx]
        return {c: int(np.sum(y == i)) for i, c in enumerate(self.classes) if np.any(y == i)}


@dataclass
class AdaptConfig:
    """Every number of an adaptation run (saved in the new bundle's manifest)."""

    epochs: int = 8
    batch: int = 64
    learning_rate: float = 1e-3
    warmup_epochs: float = 0.5
    weight_decay: float = 2e-5
    label_smoothing: float = 0.05
    local_share: float = 0.5  # share of each epoch's images that are (repeated) local cells
    holdout: float = 0.2  # share of each class's local cells held out for the gate
    # after the gate run (trained without the held-out cells, scored on them), fine-tune
    # again on every local cell and ship that: chosen on val (LISC, 5 seeds: 1,240 against
    # 1,235 of 5 x 259 val cells; RESULTS.md)
    train_on_all: bool = True
    min_per_class: int = MIN_PER_CLASS
    replay_per_class: int = 500  # replay images per class drawn from --replay-data
    # BatchNorm layers keep the parent's statistics (inference mode): a few dozen local
    # cells in the mix would otherwise drag them away from the original data (forgetting)
    freeze_bn: bool = True
    tail_layers: int = 0  # >0: only the last N layers with weights train (0: all)
    # Weight interpolation (WiSE-FT, Wortsman et al. 2022): the final weights are
    # parent + alpha x (fine-tuned - parent), alpha the largest of ALPHAS whose float
    # accuracy on the original data's selection set falls by at most select_drop points.
    # 1.0 = the forgetting gate's default tolerance. Half of it (0.5, before) left
    # adaptation a no-op whenever fine-tuning cost just over 0.5 points of PBC val at
    # every alpha (measured: alpha 0.1, LISC val 52% instead of 96-98%; RESULTS.md).
    interpolate: bool = True
    select_drop_pp: float = 1.0
    # Model soup (Wortsman et al. 2022, "Model soups", ICML): fine-tune this many times
    # from the parent's weights with seeds seed, seed+1000, ... and keep the mean of the
    # weights; one model on the device. Measured on LISC (2 seeds, soup 3): val 498 against
    # 497 of 2 x 259 cells for plain fine-tuning, no steadier on test; so 1 by default.
    soup: int = 1
    seed: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def read_local_cells(
    root: str | os.PathLike[str],
    classes: Sequence[str],
    normalizer: Any,
    size: int,
    min_per_class: int = MIN_PER_CLASS,
    progress: Callable[[int], None] | None = None,
    pixel_size_um: float | None = None,
    model_pixel_um: float | None = None,
) -> LocalCells:
    """Read ``root/<class>/*`` as model inputs; a one-line EdgecellsError for a folder that
    is not a class of the bundle, an unreadable image, or too few cells in a class.
    ``pixel_size_um``/``model_pixel_um``: the single-cell images' and the model's pixel
    sizes (µm/px), to cut those images at the model's field (exported crops need none)."""
    r = Path(root)
    if not r.is_dir():
        raise EdgecellsError(f"{r}: no such folder of labelled cells")
    folders = sorted(d for d in r.iterdir() if d.is_dir())
    labelled = [
        d for d in folders if not d.name.startswith(("_", ".")) and d.name not in UNLABELLED_FOLDERS
    ]
    unknown = [d.name for d in labelled if d.name not in classes]
    if unknown:
        raise EdgecellsError(
            f"{r}: folder(s) {', '.join(unknown)} are not classes of this bundle "
            f"({', '.join(classes)}); rename them, or prefix them with _ to ignore them"
        )
    index = read_index(r) if (r / INDEX_NAME).is_file() else {}
    files: list[tuple[Path, int]] = []
    for d in labelled:
        files += [
            (p, list(classes).index(d.name))
            for p in sorted(d.iterdir())
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        ]
    counts = {c: sum(1 for _, k in files if k == i) for i, c in enumerate(classes)}
    if not files:
        raise EdgecellsError(
            f"{r}: no labelled cells (expected images in folders named after the bundle's "
            f"classes: {', '.join(classes)})"
        )
    few = {c: n for c, n in counts.items() if 0 < n < min_per_class}
    if few:
        raise EdgecellsError(
            f"{r}: too few cells in "
            + ", ".join(f"{c} ({n})" for c, n in few.items())
            + f"; label at least {min_per_class} per class, or move them to a _skip folder"
        )
    x = np.empty((len(files), size, size, 3), dtype=np.uint8)
    y = np.empty(len(files), dtype=np.int64)
    rel, shas = [], []
    n_index = 0
    for i, (p, k) in enumerate(files):
        img = read_image(p)  # EdgecellsError naming a corrupt file
        row = index.get(p.name)
        try:
            x[i] = device_input(img, row, normalizer, size, pixel_size_um, model_pixel_um)
        except EdgecellsError as exc:
            raise EdgecellsError(f"{p}: {exc}") from None
        n_index += row is not None
        y[i] = k
        rel.append(p.relative_to(r).as_posix())
        shas.append(_sha256(p))
        if progress:
            progress(1)
    return LocalCells(r, list(classes), x, y, rel, shas, n_index)


def split_holdout(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, hold out ``round(fraction * n)`` cells (at least 1, and always keep at
    least 2 to train on); returns (train indices, held-out indices)."""
    rng = np.random.default_rng(seed)
    train, hold = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = 0 if fraction <= 0 else min(max(1, int(round(fraction * len(idx)))), len(idx) - 2)
        k = max(k, 0)
        hold += idx[:k].tolist()
        train += idx[k:].tolist()
    return np.sort(np.asarray(train, np.int64)), np.sort(np.asarray(hold, np.int64))


def mix(
    local_x: np.ndarray,
    local_y: np.ndarray,
    replay_x: np.ndarray,
    replay_y: np.ndarray,
    local_share: float,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Replay images plus the local cells repeated so that they make up about
    ``local_share`` of the mix; returns (x, y, repeats)."""
    if len(replay_x) == 0:
        return local_x, local_y, 1
    want = local_share / max(1e-6, 1.0 - local_share) * len(replay_x)
    reps = max(1, int(round(want / max(1, len(local_x)))))
    x = np.concatenate([replay_x] + [local_x] * reps)
    y = np.concatenate([replay_y] + [local_y] * reps)
    return x, y, reps


def load_trainable(path: str | os.PathLike[str], seed: int) -> Any:
    """Load a Keras model to fine-tune, seeding first: random layers (Dropout) draw their
    seed when they are built, so a model loaded before seeding fine-tunes differently in
    every process (measured: three runs of one LISC adaptation, 242-245 of 267 test
    cells). Raises what Keras raises for a bad file."""
    import keras

    from edgecells.training.train import set_determinism

    set_determinism(seed)
    return keras.models.load_model(path, compile=False)


def finetune(
    model: Any,
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    cfg: AdaptConfig,
    on_step: Callable[[int], None] | None = None,
) -> list[dict[str, float]]:
    """Fine-tune ``model`` in place on the mix (x, y) with the training augmentation;
    every layer but BatchNorm (``cfg.freeze_bn``) trains, at a third of the learning rate
    of training from scratch. Returns the per-epoch log."""
    import keras

    from edgecells.training.train import set_determinism

    set_determinism(cfg.seed)
    weighted = [layer for layer in model.layers if layer.weights]
    frozen = weighted[: -cfg.tail_layers] if cfg.tail_layers > 0 else []
    for layer in model.layers:
        if layer in frozen or (
            cfg.freeze_bn and isinstance(layer, keras.layers.BatchNormalization)
        ):
            layer.trainable = False  # Keras 3: BatchNorm then also runs in inference mode
    size = int(model.input_shape[1])
    tcfg = TrainConfig(size=size, batch=cfg.batch, seed=cfg.seed, augment=cfg.augment)
    steps = max(1, math.ceil(len(x) / cfg.batch))
    total = max(1, cfg.epochs * steps)
    warm = int(min(total - 1, max(0, cfg.warmup_epochs * steps)))
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=cfg.learning_rate * 0.1,
        decay_steps=total - warm,
        alpha=0.01,
        warmup_target=cfg.learning_rate,
        warmup_steps=warm,
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=schedule, weight_decay=cfg.weight_decay),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing),
        metrics=["accuracy"],
    )
    ds = make_train_dataset(x, y, num_classes, tcfg).repeat()
    log: list[dict[str, float]] = []

    class _Cb(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if on_step:
                on_step(1)

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            log.append({"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()}})

    t0 = time.perf_counter()
    model.fit(ds, epochs=cfg.epochs, steps_per_epoch=steps, callbacks=[_Cb()], verbose=0)
    if log:
        log[-1]["seconds"] = round(time.perf_counter() - t0, 2)
    return log


def finetune_soup(
    model: Any,
    parent_weights: list[np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    cfg: AdaptConfig,
    on_step: Callable[[int], None] | None = None,
) -> list[dict[str, float]]:
    """:func:`finetune` ``cfg.soup`` times from ``parent_weights`` (seeds ``cfg.seed``,
    ``cfg.seed + 1000``, ...: member 0 is the plain run; runs with nearby ``--seed`` share
    no member) and leave ``model`` at the mean of the members' weights (a
    uniform model soup). ``cfg.soup`` 1 is plain fine-tuning. Each log entry names its
    member."""
    if cfg.soup < 1:
        raise EdgecellsError(f"--soup must be >= 1, got {cfg.soup}")
    if cfg.soup == 1:
        return finetune(model, x, y, num_classes, cfg, on_step)
    total: list[np.ndarray] | None = None
    last: list[np.ndarray] = []
    log: list[dict[str, float]] = []
    for j in range(cfg.soup):
        model.set_weights(parent_weights)
        member = replace(cfg, seed=cfg.seed + 1000 * j)
        log += [{"member": j, **e} for e in finetune(model, x, y, num_classes, member, on_step)]
        last = model.get_weights()
        w64 = [w.astype(np.float64) for w in last]
        total = w64 if total is None else [t + w for t, w in zip(total, w64)]
    assert total is not None
    model.set_weights(
        [
            (t / cfg.soup).astype(w.dtype) if np.issubdtype(w.dtype, np.floating) else w
            for t, w in zip(total, last)
        ]
    )
    return log


def accuracy(probs: np.ndarray, y: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Top-1 accuracy and per-class recall (classes present in ``y`` only)."""
    y = np.asarray(y)
    if len(y) == 0:
        return {"n": 0, "accuracy": None, "recall": {}}
    pred = np.argmax(probs, axis=1)
    recall = {
        c: round(float(np.mean(pred[y == i] == i)), 5)
        for i, c in enumerate(classes)
        if np.any(y == i)
    }
    return {"n": int(len(y)), "accuracy": round(float(np.mean(pred == y)), 5), "recall": recall}


ALPHAS = (1.0, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)


def interpolate_weights(model: Any, parent_weights: list[np.ndarray], alpha: float) -> None:
    """Set ``model``'s weights to parent + alpha x (current - parent), in place."""
    current = model.get_weights()
    model.set_weights([p + alpha * (c - p) for p, c in zip(parent_weights, current)])


def choose_alpha(
    model: Any,
    parent_weights: list[np.ndarray],
    sel_x: np.ndarray,
    sel_y: np.ndarray,
    max_drop_pp: float,
) -> tuple[float, list[dict[str, float]]]:
    """The largest alpha of :data:`ALPHAS` whose float accuracy on (sel_x, sel_y) is at
    most ``max_drop_pp`` points below the parent's; leaves ``model`` at that alpha and
    returns it with the accuracy of every alpha tried."""
    from edgecells.training.train import predict_probs

    tuned = model.get_weights()

    def acc() -> float:
        return float(np.mean(np.argmax(predict_probs(model, sel_x)[0], axis=1) == sel_y))

    model.set_weights(parent_weights)
    base = acc()
    tried = [{"alpha": 0.0, "accuracy": round(base, 5)}]
    chosen = 0.0
    for a in ALPHAS:
        model.set_weights(tuned)
        interpolate_weights(model, parent_weights, a)
        v = acc()
        tried.append({"alpha": a, "accuracy": round(v, 5)})
        if round(100 * (base - v), 6) <= max_drop_pp:
            chosen = a
            break
    model.set_weights(tuned)
    interpolate_weights(model, parent_weights, chosen)
    return chosen, tried
