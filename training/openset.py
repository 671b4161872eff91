"""Open-set test: leave one class out of training, measure whether its cells come out
``unidentified`` (host only; TensorFlow inside functions).

For each left-out class ``c``:

1. train the reference recipe (:mod:`.train`, same augmentation and architecture) on the
   training split without ``c`` for a few epochs;
2. on the validation split without ``c`` fit the temperature and the out-of-distribution
   (OOD) threshold exactly as the bundle fit does (:mod:`.abstain`);
3. on the full test split score every cell with each candidate OOD score — maximum
   softmax after temperature scaling (``msp``), energy (``energy``, needs logits) and the
   Mahalanobis distance of the pooled features to the nearest training class
   (``mahalanobis``) — and record the raw outputs in ``OUT/loco-<c>.npz``.

:func:`analyse_loco` turns the files into AUROC (left-out vs known-class test cells),
the share of left-out cells unidentified or abnormal at the validation-fitted threshold,
the share of known test cells made unidentified, and simulated slides with 10% left-out
cells through the device's flag rule. Runs already on disk are reused (``--resume``
semantics by default), so the command can be stopped and started again.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgecells.edge.errors import EdgecellsError

DEFAULT_LEFT_OUT = ("basophil", "monocyte", "ig", "erythroblast")


def _features_and_logits(model: Any, x: np.ndarray, batch: int = 256) -> tuple[Any, Any]:
    """Pooled features (N x F) and logits (N x C) of a :func:`build_classifier` model."""
    import keras

    feat_model = keras.Model(model.inputs, model.get_layer("pool").output)
    dense = model.get_layer("probs")
    w, b = (np.asarray(v, dtype=np.float64) for v in dense.get_weights())
    feats = np.concatenate(
        [
            np.asarray(feat_model(x[i : i + batch].astype(np.float32), training=False))
            for i in range(0, len(x), batch)
        ]
    ).astype(np.float64)
    return feats, feats @ w + b


def _mahalanobis(
    train_f: np.ndarray, train_y: np.ndarray, nc: int
) -> Callable[[np.ndarray], np.ndarray]:
    """Minimum class-conditional Mahalanobis distance with a shared covariance."""
    means = np.stack([train_f[train_y == k].mean(axis=0) for k in range(nc)])
    centred = train_f - means[train_y]
    cov = centred.T @ centred / len(train_f)
    prec = np.linalg.pinv(cov + 1e-6 * np.eye(cov.shape[0]))

    def score(f: np.ndarray) -> np.ndarray:
        d = f[:, None, :] - means[None]
        return np.einsum("nkf,fg,nkg->nk", d, prec, d).min(axis=1)

    return score


def run_loco(
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    left_out: Sequence[str] = DEFAULT_LEFT_OUT,
    epochs: int = 5,
    size: int = 64,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Train one model per left-out class and save its outputs; returns the files."""
    from edgecells.calibration.datasets import fit_stain_target, load_dataset, load_split
    from edgecells.edge.mappings import load_mapping
    from edgecells.training.model import build_classifier
    from edgecells.training.train import (
        TrainConfig,
        _schedule,
        make_eval_dataset,
        make_train_dataset,
        set_determinism,
    )

    mapping = load_mapping("pbc8")
    dataset = load_dataset(data, mapping=mapping, seed=seed)
    for c in left_out:
        if c not in mapping.classes:
            raise EdgecellsError(f"--exclude {c!r}: not a class ({', '.join(mapping.classes)})")
    outd = Path(out)
    outd.mkdir(parents=True, exist_ok=True)
    target, _ = fit_stain_target(dataset, "train", cache_dir)
    splits = {s: load_split(dataset, s, size, target, cache_dir) for s in ("train", "val", "test")}
    files = []
    for c in left_out:
        f = outd / f"loco-{c}.npz"
        files.append(f)
        if f.is_file():
            log(f"{c}: reusing {f}")
            continue
        t0 = time.time()
        ci = mapping.index(c)
        known = [k for k in range(mapping.num_classes) if k != ci]
        remap = np.full(mapping.num_classes, -1, dtype=np.int64)
        remap[known] = np.arange(len(known))
        tr, va, te = splits["train"], splits["val"], splits["test"]
        mtr, mva = tr.y != ci, va.y != ci
        xtr, ytr = tr.x[mtr], remap[tr.y[mtr]]
        xva, yva = va.x[mva], remap[va.y[mva]]
        cfg = TrainConfig(size=size, epochs=epochs, seed=seed)
        import keras

        set_determinism(seed)
        nc = len(known)
        model = build_classifier(nc, size, cfg.arch)
        steps = max(1, len(xtr) // cfg.batch)
        model.compile(
            optimizer=keras.optimizers.AdamW(
                learning_rate=_schedule(cfg, steps), weight_decay=cfg.weight_decay
            ),
            loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing),
            metrics=["accuracy"],
        )
        model.fit(
            make_train_dataset(xtr, ytr, nc, cfg).repeat(),
            epochs=epochs,
            steps_per_epoch=steps,
            validation_data=make_eval_dataset(xva, yva, nc, 256),
            verbose=0,
            callbacks=[
                keras.callbacks.LambdaCallback(
                    on_epoch_end=lambda e, lg, c=c: log(
                        f"{c}: epoch {e + 1}/{epochs} val_accuracy {lg['val_accuracy']:.4f}"
                    )
                )
            ],
        )
        ftr, _ = _features_and_logits(model, xtr)
        maha = _mahalanobis(ftr, ytr, nc)
        fva, lva = _features_and_logits(model, xva)
        fte, lte = _features_and_logits(model, te.x)
        tmp = outd / f".loco-{c}.tmp.npz"
        np.savez(
            tmp,
            left_out=c,
            classes=np.array(mapping.classes),
            known=np.array(known),
            val_logits=lva,
            val_y=yva,
            val_maha=maha(fva),
            test_logits=lte,
            test_y=te.y,  # original 8-class labels
            test_maha=maha(fte),
            epochs=epochs,
            seconds=time.time() - t0,
        )
        os.replace(tmp, f)
        log(f"{c}: done in {time.time() - t0:.0f} s -> {f}")
    (outd / "loco-config.json").write_text(
        json.dumps({"epochs": epochs, "size": size, "seed": seed, "left_out": list(left_out)})
        + "\n",
        encoding="utf-8",
    )
    return files
