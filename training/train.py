"""Training recipe of the reference cell classifier (host only; TensorFlow inside functions).

1. Read the data folder (:mod:`.datasets`), fit a stain target on the training split.
2. Stain-normalize and resize every image of every split with
   :func:`edgecells.edge.preprocess.prepare_crop` (cached as ``.npz``).
3. Train :func:`.model.build_classifier` from scratch with microscopy augmentation
   (dihedral flips/rotations, free rotation, scale and translation jitter, brightness,
   contrast, saturation, hue and per-channel stain jitter). The augmentation runs in the
   ``tf.data`` pipeline with stateless random ops seeded from ``seed``: it is not part of
   the model and never reaches the exported graph.
4. Keep the epoch with the best validation accuracy; choose the abnormal operating point
   on the validation split; evaluate on the test split.

Files written beside the model ``OUT.keras``: ``target.json`` (stain target; absent with
``stain=False``), ``mapping.json``, ``train_log.csv`` (one row per epoch) and
``metrics.json`` (config, model size, validation and test metrics).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgecells.calibration.cellsets import CellRecord, cell_records, prepare_records
from edgecells.calibration.datasets import (
    SPLITS,
    CellDataset,
    LoadedSplit,
    fit_stain_target,
    load_dataset,
)
from edgecells.edge.errors import EdgecellsError
from edgecells.edge.fileio import atomic_save
from edgecells.edge.mappings import ClassMapping, load_mapping
from edgecells.edge.metrics import choose_operating_point, evaluate_probabilities
from edgecells.edge.preprocess import PREPROCESS_VERSION, STATS_SOURCE
from edgecells.training.augment import ColourAugment, augmented_variants
from edgecells.training.model import ARCH_NAME, ArchConfig, build_classifier, model_summary

TARGET_FILE = "target.json"
MAPPING_FILE = "mapping.json"
LOG_FILE = "train_log.csv"
METRICS_FILE = "metrics.json"


@dataclass
class AugmentConfig:
    """Ranges of the random augmentation (uniform in [-x, x] or [1-x, 1+x])."""

    dihedral: bool = True  # flips and 90-degree rotations
    rotate_deg: float = 45.0  # free rotation on top of the dihedral group
    scale: float = 0.05  # on top of the field scale jitter done before normalization
    translate: float = 0.04  # fraction of the image size
    # colour jitter after normalization: off by default (colour augmentation happens before
    # the stain normalization, training/augment.py, as the device would see it)
    brightness: float = 0.0  # fraction of 255
    contrast: float = 0.0
    saturation: float = 0.0
    hue_deg: float = 0.0
    channel_gain: float = 0.0  # per-channel gain


SELECT_RULES = {
    "mean": "highest mean validation accuracy over the sources with a val split",
    "pooled": "highest validation accuracy pooled over the val cells of all sources",
}


def selection_score(correct: list[int], counts: list[int], rule: str) -> float:
    """The best-epoch score from each source's correct val predictions and val size."""
    if rule not in SELECT_RULES:
        raise EdgecellsError(f"select must be one of {', '.join(SELECT_RULES)}, not {rule!r}")
    if not counts or min(counts) <= 0:
        raise EdgecellsError("every source used for epoch selection needs val cells")
    if rule == "pooled":
        return sum(correct) / sum(counts)
    return float(np.mean([c / n for c, n in zip(correct, counts)]))


@dataclass
class TrainConfig:
    """Every number of a training run (saved in metrics.json)."""

    size: int = 64
    epochs: int = 24
    batch: int = 128
    seed: int = 0
    stain: bool = True
    learning_rate: float = 3e-3
    warmup_epochs: float = 1.0
    weight_decay: float = 2e-5
    label_smoothing: float = 0.05
    min_sensitivity: float = 0.98  # operating point: this sensitivity on val, best specificity
    # best epoch: "mean" of the per-source val accuracies (each microscope counts alike) or
    # "pooled" over all val cells (each cell counts alike; small val sets weigh less)
    select: str = "mean"
    mapping: str = "pbc8"
    max_steps: int | None = None  # cap steps per epoch (smoke tests)
    init: str | None = None  # start from this .keras model's weights (same architecture)
    pixel_size_um: float = 0.3125  # the model's input pixel size: 64 px x 0.3125 = 20 µm field
    variants: int = 4  # pre-normalization augmented variants per primary training cell
    extra_variants: int = 12  # ... per cell of the other microscopes (fewer cells)
    extra_per_epoch: int = 1500  # draws per epoch from each other microscope's train split
    arch: ArchConfig = field(default_factory=ArchConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    colour: ColourAugment = field(default_factory=ColourAugment)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["arch"] = self.arch.to_dict()
        d["colour"] = self.colour.to_dict()
        return d


@dataclass
class TrainResult:
    model_path: Path
    metrics: dict[str, Any]
    skipped: list[tuple[str, str]]
    seconds: float


class TrainProgress:
    """Callbacks the CLI implements to show progress (all optional)."""

    def stage(self, name: str, total: int | None) -> Callable[[int], None] | None:
        return None

    def epoch_end(self, epoch: int, logs: dict[str, float], best: bool) -> None:
        return None


# --------------------------------------------------------------------------- augmentation


def _augment_fn(cfg: AugmentConfig, size: int) -> Callable[..., Any]:
    import tensorflow as tf

    def uni(seed: Any, shape: Any, lo: float, hi: float) -> Any:
        return tf.random.stateless_uniform(shape, seed=seed, minval=lo, maxval=hi)

    def augment(x: Any, y: Any, seed: Any) -> tuple[Any, Any]:
        seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=12)
        x = tf.cast(x, tf.float32)
        n = tf.shape(x)[0]
        if cfg.dihedral:
            flip_lr = uni(seeds[0], [n, 1, 1, 1], 0, 1) < 0.5
            x = tf.where(flip_lr, tf.reverse(x, axis=[2]), x)
            flip_ud = uni(seeds[1], [n, 1, 1, 1], 0, 1) < 0.5
            x = tf.where(flip_ud, tf.reverse(x, axis=[1]), x)
            transpose = uni(seeds[2], [n, 1, 1, 1], 0, 1) < 0.5
            x = tf.where(transpose, tf.transpose(x, [0, 2, 1, 3]), x)
        # free rotation + isotropic scale + translation about the centre (output->input map)
        ang = uni(seeds[3], [n], -1.0, 1.0) * (cfg.rotate_deg * math.pi / 180.0)
        sc = uni(seeds[4], [n], 1.0 - cfg.scale, 1.0 + cfg.scale)
        tx = uni(seeds[5], [n], -cfg.translate, cfg.translate) * size
        ty = uni(seeds[6], [n], -cfg.translate, cfg.translate) * size
        c = (size - 1) / 2.0
        cos, sin = tf.cos(ang) / sc, tf.sin(ang) / sc
        a0, a1 = cos, -sin
        b0, b1 = sin, cos
        a2 = c - a0 * c - a1 * c + tx
        b2 = c - b0 * c - b1 * c + ty
        zeros = tf.zeros_like(a0)
        transforms = tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
        x = tf.raw_ops.ImageProjectiveTransformV3(
            images=x,
            transforms=transforms,
            output_shape=tf.constant([size, size], tf.int32),
            fill_value=0.0,
            interpolation="BILINEAR",
            fill_mode="REFLECT",
        )
        # colour: per-channel gain (stain), saturation, hue (YIQ rotation), contrast, brightness
        gain = uni(seeds[7], [n, 1, 1, 3], 1.0 - cfg.channel_gain, 1.0 + cfg.channel_gain)
        x = x * gain
        gray = tf.reduce_mean(x, axis=3, keepdims=True)
        sat = uni(seeds[8], [n, 1, 1, 1], 1.0 - cfg.saturation, 1.0 + cfg.saturation)
        x = gray + (x - gray) * sat
        h = uni(seeds[9], [n], -1.0, 1.0) * (cfg.hue_deg * math.pi / 180.0)
        to_yiq = tf.constant(
            [[0.299, 0.596, 0.211], [0.587, -0.274, -0.523], [0.114, -0.322, 0.312]], tf.float32
        )
        from_yiq = tf.linalg.inv(to_yiq)
        ch, sh = tf.cos(h), tf.sin(h)
        one, zero = tf.ones_like(ch), tf.zeros_like(ch)
        rot = tf.reshape(
            tf.stack([one, zero, zero, zero, ch, sh, zero, -sh, ch], axis=1), [-1, 3, 3]
        )
        m = tf.einsum("ij,njk,kl->nil", to_yiq, rot, from_yiq)
        x = tf.einsum("nhwc,ncd->nhwd", x, m)
        mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
        con = uni(seeds[10], [n, 1, 1, 1], 1.0 - cfg.contrast, 1.0 + cfg.contrast)
        x = mean + (x - mean) * con
        x = x + uni(seeds[11], [n, 1, 1, 1], -cfg.brightness, cfg.brightness) * 255.0
        return tf.clip_by_value(x, 0.0, 255.0), y

    return augment


def make_train_dataset(x: np.ndarray, y: np.ndarray, num_classes: int, cfg: TrainConfig) -> Any:
    """Shuffled, augmented, one-hot batches (deterministic for a given seed)."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y))
    ds = ds.shuffle(len(x), seed=cfg.seed, reshuffle_each_iteration=True)
    ds = ds.batch(cfg.batch, drop_remainder=len(x) >= cfg.batch)
    ds = ds.map(lambda a, b: (a, tf.one_hot(b, num_classes)))
    seeds = tf.data.Dataset.random(seed=cfg.seed).batch(2)
    ds = tf.data.Dataset.zip((ds, seeds)).map(
        lambda ab, s: _augment_fn(cfg.augment, cfg.size)(ab[0], ab[1], s),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    return ds.prefetch(tf.data.AUTOTUNE)


def make_eval_dataset(x: np.ndarray, y: np.ndarray, num_classes: int, batch: int) -> Any:
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)
    ds = ds.map(lambda a, b: (tf.cast(a, tf.float32), tf.one_hot(b, num_classes)))
    return ds.prefetch(tf.data.AUTOTUNE)


# --------------------------------------------------------------------------- training


def set_determinism(seed: int) -> None:
    """Seed Python, NumPy, TensorFlow and Keras; deterministic TF ops where available."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    try:
        tf.config.experimental.enable_op_determinism()
    except Exception:  # noqa: BLE001 - older TF: best effort
        pass


def _schedule(cfg: TrainConfig, steps_per_epoch: int) -> Any:
    import keras

    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(min(total - 1, max(0, cfg.warmup_epochs * steps_per_epoch)))
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=cfg.learning_rate * 0.1,
        decay_steps=total - warm,
        alpha=0.01,
        warmup_target=cfg.learning_rate,
        warmup_steps=warm,
    )


def predict_probs(model: Any, x: np.ndarray, batch: int = 256) -> tuple[np.ndarray, float]:
    """Softmax probabilities (N x C) and inference milliseconds per image."""
    if len(x) == 0:
        return np.zeros((0, int(model.output_shape[-1]))), 0.0
    t0 = time.perf_counter()
    probs = np.concatenate(
        [
            np.asarray(model(x[i : i + batch].astype(np.float32), training=False))
            for i in range(0, len(x), batch)
        ]
    )
    ms = (time.perf_counter() - t0) * 1000.0 / len(x)
    return probs.astype(np.float64), ms


def _check_splits(dataset: CellDataset, loaded: dict[str, LoadedSplit]) -> None:
    for name in ("train", "val"):
        if len(loaded[name].x) == 0:
            raise EdgecellsError(f"{dataset.root}: the {name} split has no readable images")


def _records(
    data: str | os.PathLike[str], mapping: ClassMapping, cfg: TrainConfig
) -> list[CellRecord]:
    return cell_records(data, mapping, None)


def _epoch_indices(
    sources: list[np.ndarray], per_extra: int, k: list[int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source, record, variant) indices of one epoch: every record of the first source
    once, each further source drawn ``per_extra`` times (oversampled when small)."""
    src, rec, var = [], [], []
    for si, idx in enumerate(sources):
        if si == 0 or len(idx) == 0:
            pick = idx
        else:
            pick = rng.choice(idx, size=max(per_extra, len(idx)), replace=len(idx) < per_extra)
        src.append(np.full(len(pick), si))
        rec.append(pick)
        var.append(rng.integers(0, k[si], len(pick)))
    return np.concatenate(src), np.concatenate(rec), np.concatenate(var)


def train(
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    cfg: TrainConfig | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: TrainProgress | None = None,
    mapping: ClassMapping | None = None,
    extra_data: list[str | os.PathLike[str]] | None = None,
) -> TrainResult:
    """Train, checkpoint the best epoch to ``out`` (.keras) and write the side files.

    ``data`` is the primary set (every class; PBC); ``extra_data`` are other microscopes'
    labelled cells (e.g. DeepBioNet, LISC), whose *training* splits are mixed in and whose
    validation splits take part in choosing the best epoch. Every cell goes through
    :func:`edgecells.edge.preprocess.prepare_cell` at ``cfg.pixel_size_um`` (the model's
    pixel size) from its data set's measured pixel size.
    """
    cfg = cfg or TrainConfig()
    if cfg.select not in SELECT_RULES:
        raise EdgecellsError(f"select must be one of {', '.join(SELECT_RULES)}, not {cfg.select!r}")
    progress = progress or TrainProgress()
    out_path = Path(out)
    if out_path.suffix != ".keras":
        raise EdgecellsError(f"{out_path}: the output model must be a .keras file")
    t_start = time.time()
    mapping = mapping or load_mapping(cfg.mapping)
    dataset = load_dataset(data, mapping=mapping, seed=cfg.seed)
    out_dir = out_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    roots = [Path(data)] + [Path(d) for d in (extra_data or [])]
    recs = [_records(r, mapping, cfg) for r in roots]
    names = [r.resolve().name for r in roots]

    skipped: list[tuple[str, str]] = list(dataset.missing)
    target = None
    if cfg.stain:
        n_train = len(dataset.split("train"))
        target, sk = fit_stain_target(
            dataset, "train", cache_dir, progress.stage("fit stain target", n_train)
        )
        skipped += sk
    size, mpx = cfg.size, cfg.pixel_size_um
    split_recs = {
        (n, s): [r for r in rs if r.split == s] for n, rs in zip(names, recs) for s in SPLITS
    }
    train_recs = [split_recs[(n, "train")] for n in names]
    pools = []
    for i, tr_recs in enumerate(train_recs):
        k = cfg.variants if i == 0 else cfg.extra_variants
        bar = progress.stage(f"augment {names[i]} train x{k}", None)
        pools.append(
            augmented_variants(tr_recs, k, size, mpx, target, cfg.colour, cfg.seed + i, cache_dir)
        )
        if bar:
            bar(1)
    y_train = [np.array([mapping.classes.index(r.label) for r in rs]) for rs in train_recs]
    evals: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
    for n in names:
        for s in ("val", "test"):
            if split_recs[(n, s)]:
                evals[(n, s)] = prepare_records(
                    split_recs[(n, s)], mapping.classes, size, mpx, target, cache_dir
                )
    if (names[0], "val") not in evals or not len(train_recs[0]):
        raise EdgecellsError(f"{dataset.root}: the train and val splits need readable images")

    import keras

    set_determinism(cfg.seed)
    nc = mapping.num_classes
    model = build_classifier(nc, size, cfg.arch)
    if cfg.init:
        try:
            init_model = keras.models.load_model(cfg.init, compile=False)
            model.set_weights(init_model.get_weights())
        except Exception as exc:  # noqa: BLE001 - any mismatch is a bad --init model
            raise EdgecellsError(
                f"{cfg.init}: cannot start from this model ({type(exc).__name__}: it must be "
                f"a .keras classifier of the same architecture, {size} px, {nc} classes)"
            ) from None
    rng = np.random.default_rng(cfg.seed)
    n_epoch = len(train_recs[0]) + sum(
        max(cfg.extra_per_epoch, len(t)) for t in train_recs[1:] if len(t)
    )
    steps = max(1, n_epoch // cfg.batch)
    if cfg.max_steps:
        steps = min(steps, cfg.max_steps)
    model.compile(
        optimizer=keras.optimizers.AdamW(
            learning_rate=_schedule(cfg, steps), weight_decay=cfg.weight_decay
        ),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing),
        metrics=["accuracy"],
    )
    log_path = out_dir / LOG_FILE
    tmp_best = out_dir / f".{out_path.stem}.best.keras"
    best = {"score": -1.0, "epoch": -1}
    bar = progress.stage("train", cfg.epochs * steps)
    ks = [p.shape[1] for p in pools]
    idx_all = [np.arange(len(t)) for t in train_recs]
    log_rows: list[dict[str, float]] = []

    class _Bar(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if bar:
                bar(1)

    for epoch in range(cfg.epochs):
        s_i, r_i, v_i = _epoch_indices(idx_all, cfg.extra_per_epoch, ks, rng)
        x_ep = np.empty((len(s_i), size, size, 3), np.uint8)
        y_ep = np.empty(len(s_i), np.int64)
        for si in range(len(pools)):
            m = s_i == si
            x_ep[m] = pools[si][r_i[m], v_i[m]]
            y_ep[m] = y_train[si][r_i[m]]
        ecfg = TrainConfig(**{**cfg.__dict__, "seed": cfg.seed * 1000 + epoch})
        ds = make_train_dataset(x_ep, y_ep, nc, ecfg).repeat()
        hist = model.fit(
            ds,
            epochs=epoch + 1,
            initial_epoch=epoch,
            steps_per_epoch=steps,
            verbose=0,
            callbacks=[_Bar()],
        )
        logs = {k: float(v[-1]) for k, v in hist.history.items()}
        correct, counts = [], []
        for n in names:
            if (n, "val") in evals:
                xv, yv = evals[(n, "val")]
                pv, _ = predict_probs(model, xv)
                hits = int((pv.argmax(1) == yv).sum())
                logs[f"val_acc_{n}"] = hits / len(yv)
                correct.append(hits)
                counts.append(len(yv))
        logs["val_score"] = selection_score(correct, counts, cfg.select)
        logs["val_accuracy"] = logs[f"val_acc_{names[0]}"]
        logs["epoch"] = epoch + 1
        log_rows.append(logs)
        with log_path.open("w", encoding="utf-8") as fh:
            cols = list(log_rows[-1].keys())
            fh.write(",".join(cols) + "\n")
            for row in log_rows:
                fh.write(",".join(f"{row.get(c, float('nan')):.6g}" for c in cols) + "\n")
        improved = logs["val_score"] > best["score"]
        if improved:
            best.update(score=logs["val_score"], epoch=epoch + 1)
            model.save(tmp_best)
        progress.epoch_end(epoch + 1, logs, improved)
    best_model = keras.models.load_model(tmp_best, compile=False)
    best_model.save(out_path)  # inference-only file: no optimizer state
    tmp_best.unlink(missing_ok=True)

    mapping.save(out_dir / MAPPING_FILE)
    if target is not None:
        target.save(out_dir / TARGET_FILE)
    else:
        (out_dir / TARGET_FILE).unlink(missing_ok=True)

    # operating point from the primary set's validation split, then test metrics at it
    ab = mapping.abnormal_indices
    xv, yv = evals[(names[0], "val")]
    pv, _ = predict_probs(best_model, xv)
    y_bin_val = np.isin(yv, ab)
    score_val = pv[:, ab].sum(axis=1)
    if y_bin_val.any() and (~y_bin_val).any():
        op = choose_operating_point(y_bin_val, score_val, cfg.min_sensitivity)
        op_rule = f"highest specificity with sensitivity >= {cfg.min_sensitivity} on val"
    else:
        op = 0.5
        op_rule = "0.5 (validation split lacks normal or abnormal cells)"
    results: dict[str, Any] = {}
    per_source: dict[str, Any] = {}
    for (n, split), (xs, ys) in evals.items():
        probs, ms = predict_probs(best_model, xs)
        r = evaluate_probabilities(ys, probs, mapping.classes, ab, op, ms).to_dict()
        if n == names[0]:
            results[split] = r
        per_source.setdefault(n, {})[split] = {
            "n": int(len(ys)),
            "accuracy": float((probs.argmax(1) == ys).mean()),
            "normal_called_abnormal": float(
                (np.isin(probs.argmax(1), ab) & ~np.isin(ys, ab)).sum()
                / max(1, (~np.isin(ys, ab)).sum())
            ),
        }
    metrics = {
        "model": out_path.name,
        "arch": ARCH_NAME,
        "summary": model_summary(best_model),
        "config": cfg.to_dict(),
        "preprocess": {
            "function": "edgecells.edge.preprocess.prepare_cell",
            "version": PREPROCESS_VERSION,
            "stain_normalization": "reinhard-fixed (target.json)" if cfg.stain else "none",
            "stats": STATS_SOURCE,
            "input": "RGB float32 in [0, 255]",
            "size": cfg.size,
            "pixel_size_um": cfg.pixel_size_um,
            "side_um": round(cfg.size * cfg.pixel_size_um, 4),
        },
        "data": {
            "root": dataset.root.name,
            "sources": {
                n: {
                    "pixel_size_um": rs[0].pixel_size_um if rs else None,
                    "counts": {sp: len(split_recs[(n, sp)]) for sp in SPLITS},
                }
                for n, rs in zip(names, recs)
            },
            "skipped": [{"path": p, "reason": r} for p, r in skipped],
        },
        "mapping": mapping.name,
        "best_epoch": best["epoch"],
        "best_rule": SELECT_RULES[cfg.select],
        "per_source": per_source,
        "operating_point": op,
        "operating_point_rule": op_rule,
        "seconds": round(time.time() - t_start, 1),
        **results,
    }
    text = json.dumps(metrics, indent=2) + "\n"
    atomic_save(out_dir / METRICS_FILE, lambda f: f.write(text.encode("utf-8")), fsync=False)
    return TrainResult(out_path, metrics, skipped, time.time() - t_start)
