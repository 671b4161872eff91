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

import functools
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgecells.edge.errors import EdgecellsError
from edgecells.edge.fileio import atomic_save

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
    # shrinkage towards the mean variance: pooled ReLU6 features have near-constant
    # dimensions whose tiny variances would otherwise dominate the distance
    d = cov.shape[0]
    cov = 0.9 * cov + 0.1 * (np.trace(cov) / d) * np.eye(d)
    prec = np.linalg.inv(cov)

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
        model.save(outd / f"loco-{c}.keras")
        ftr, _ = _features_and_logits(model, xtr)
        maha = _mahalanobis(ftr, ytr, nc)
        fva, lva = _features_and_logits(model, xva)
        fte, lte = _features_and_logits(model, te.x)
        sub = np.random.default_rng(seed).permutation(len(ftr))[:4000]
        arrays = dict(
            left_out=c,
            classes=np.array(mapping.classes),
            known=np.array(known),
            val_logits=lva,
            val_y=yva,
            val_maha=maha(fva),
            test_logits=lte,
            test_y=te.y,  # original 8-class labels
            test_maha=maha(fte),
            train_feat=ftr[sub].astype(np.float32),
            train_feat_y=ytr[sub],
            val_feat=fva.astype(np.float32),
            test_feat=fte.astype(np.float32),
            epochs=epochs,
            seconds=time.time() - t0,
        )
        atomic_save(f, functools.partial(np.savez, **arrays), fsync=False)
        log(f"{c}: done in {time.time() - t0:.0f} s -> {f}")
    (outd / "loco-config.json").write_text(
        json.dumps({"epochs": epochs, "size": size, "seed": seed, "left_out": list(left_out)})
        + "\n",
        encoding="utf-8",
    )
    return files


def _knn_score(train_f: np.ndarray, k: int = 10) -> Callable[[np.ndarray], np.ndarray]:
    """Distance to the k-th nearest training feature, features L2-normalized."""
    tr = train_f / np.maximum(np.linalg.norm(train_f, axis=1, keepdims=True), 1e-9)

    def score(f: np.ndarray) -> np.ndarray:
        q = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-9)
        out = np.empty(len(q))
        for i in range(0, len(q), 512):
            sim = q[i : i + 512] @ tr.T
            out[i : i + 512] = 1.0 - np.sort(sim, axis=1)[:, -k]
        return out

    return score


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def analyse_loco(
    files: Sequence[str | os.PathLike[str]],
    target_unidentified: float = 0.02,
    slides: int = 500,
    cells: Sequence[int] = (100, 200),
    fraction: float = 0.10,
    seed: int = 0,
) -> dict[str, Any]:
    """AUROC of each OOD score (left-out vs known-class test cells), the device rule's
    rates at the validation-fitted threshold, and simulated slides with ``fraction``
    left-out cells among normal cells (REVIEW or POSITIVE = sent to a person)."""
    from edgecells.edge.mappings import load_mapping
    from edgecells.edge.metrics import roc_auc
    from edgecells.edge.ood import calibrate
    from edgecells.edge.screening import (
        NON_NUCLEATED,
        UNIDENTIFIED,
        ScreeningRule,
        label_cells,
    )
    from edgecells.training.abstention import fit_rule, simulate_flags

    pbc = load_mapping("pbc8")
    rng = np.random.default_rng(seed)
    rows = []
    for f in files:
        z = np.load(f, allow_pickle=False)
        c = str(z["left_out"])
        known = [int(k) for k in z["known"]]
        classes = [pbc.classes[k] for k in known]
        ab = np.array([pbc.is_abnormal(n) for n in classes])
        pv = _softmax(z["val_logits"])
        rule, rep = fit_rule(pv, z["val_y"], classes, ab, ScreeningRule(), target_unidentified)
        t = rule.temperature
        lte = z["test_logits"]
        pte = _softmax(lte)
        out_mask = z["test_y"] == pbc.index(c)
        scores = {
            "msp": 1.0 - calibrate(pte, t).max(axis=1),
            "energy": -t * np.log(np.exp(lte / t - (lte / t).max(1, keepdims=True)).sum(1))
            - (lte / t).max(1) * t,
            "mahalanobis": z["test_maha"],
        }
        val_scores = {
            "energy": -t
            * (
                np.log(
                    np.exp(z["val_logits"] / t - (z["val_logits"] / t).max(1, keepdims=True)).sum(1)
                )
                + (z["val_logits"] / t).max(1)
            ),
            "mahalanobis": z["val_maha"],
        }
        if "train_feat" in z.files:  # features saved: nearest-neighbour score too
            knn = _knn_score(z["train_feat"])
            scores["knn"] = knn(z["test_feat"])
            val_scores["knn"] = knn(z["val_feat"])
        auroc = {k: round(roc_auc(out_mask, v), 4) for k, v in scores.items()}
        # the device rule (msp) at the validation-fitted threshold
        labels = label_cells(pte, classes, rule.min_confidence, t, rule.ood_threshold)
        truth_nuc = np.array([pbc.classes[k].lower() not in NON_NUCLEATED for k in z["test_y"]])
        labels = [
            UNIDENTIFIED if nuc and lbl.lower() in NON_NUCLEATED else lbl
            for lbl, nuc in zip(labels, truth_nuc)
        ]
        unid = np.array([lbl == UNIDENTIFIED for lbl in labels])
        called_ab = np.array([lbl != UNIDENTIFIED and pbc.is_abnormal(lbl) for lbl in labels])
        # the other scores at their own validation 98th percentile, for comparison
        other = {}
        for k in val_scores:
            thr = float(np.quantile(val_scores[k], 1 - target_unidentified))
            flagged = scores[k] > thr
            other[k] = {
                "left_out_unidentified": round(float(flagged[out_mask].mean()), 4),
                "known_unidentified": round(float(flagged[~out_mask].mean()), 4),
            }
        # slides: normal known cells + fraction left-out cells, through the flag rule
        normal_known = np.flatnonzero(
            ~out_mask
            & truth_nuc
            & ~np.array([pbc.is_abnormal(pbc.classes[k]) for k in z["test_y"]])
        )
        left = np.flatnonzero(out_mask)
        ab_list = list(ab)
        slide_rows = {}
        for n in cells:
            k = int(round(fraction * n))
            picks = [
                np.concatenate([rng.choice(left, k), rng.choice(normal_known, n - k)])
                for _ in range(slides)
            ]
            normal_picks = [rng.choice(normal_known, n) for _ in range(slides)]
            fl = simulate_flags(labels, picks, classes, ab_list, rule)
            fn = simulate_flags(labels, normal_picks, classes, ab_list, rule)
            slide_rows[str(n)] = {
                "left_out_slides": fl,
                "review_or_positive": round((fl["REVIEW"] + fl["POSITIVE"]) / slides, 4),
                "normal_slides": fn,
                "specificity": round(fn["NEGATIVE"] / slides, 4),
            }
        rows.append(
            {
                "left_out": c,
                "epochs": int(z["epochs"]),
                "val_accuracy_known": round(float((pv.argmax(1) == z["val_y"]).mean()), 4),
                "auroc": auroc,
                "left_out_n": int(out_mask.sum()),
                "left_out_unidentified": round(float(unid[out_mask].mean()), 4),
                "left_out_unidentified_or_abnormal": round(
                    float((unid | called_ab)[out_mask].mean()), 4
                ),
                "known_unidentified": round(float(unid[~out_mask].mean()), 4),
                "other_scores_at_val_p98": other,
                "fit": rep,
                "slides": slide_rows,
            }
        )
    keys = sorted({k for r in rows for k in r["auroc"]})
    mean = {
        k: round(float(np.mean([r["auroc"][k] for r in rows if k in r["auroc"]])), 4) for k in keys
    }  # knn only over the runs that saved features
    return {
        "target_unidentified": target_unidentified,
        "fraction": fraction,
        "slides_per_condition": slides,
        "mean_auroc": mean,
        "mean_left_out_unidentified_or_abnormal": round(
            float(np.mean([r["left_out_unidentified_or_abnormal"] for r in rows])), 4
        ),
        "max_known_unidentified": max(r["known_unidentified"] for r in rows),
        "classes": rows,
    }
