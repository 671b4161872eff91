"""``edgecells adapt``: a parent bundle + locally labelled cells -> a new, gated bundle.

1. Load the parent (verified) and its float model: the bundle's ``training.source_model``
   or a Keras file given with ``source_model`` whose SHA-256 is the parent's
   ``provenance.source_model_sha256``. A parent with neither cannot be adapted.
2. Read the local cells as the device made them (:mod:`edgecells.training.adapt`) with the
   parent's stain target, and hold out a part of each class for the gate.
3. Replay: ``replay_data`` (the original data folder: its training split, with its test
   split for the forgetting gate) or the replay and check sets the parent carries.
4. Score the parent's int8 model on the held-out cells and the check data ("before").
5. Fine-tune (training/adapt.py), pull the weights back toward the parent's as far as
   needed to keep the original data's accuracy (WiSE-FT weight interpolation; the weight
   is chosen on the original data's validation split, or on the bundle's check set on a
   device), calibrate on replay + local cells, convert to int8 in every format the parent
   had (:func:`~edgecells.convert.pipeline.convert_model`, which
   also validates float vs int8 on the check data).
6. Score again ("after") and gate: held-out local accuracy must not fall, check-data
   accuracy must not fall by more than ``max_pbc_drop`` points, every format must pass
   the int8 gate. The manifest's ``adaptation`` section records the parent's hash, the
   local files with their hashes and counts, the replay source, the config, the
   before/after metrics and the gate.

The stain target is the parent's, unchanged: the replay images and everything the parent
learnt are normalized to it, and Reinhard maps the site's colours onto it anyway; what
differs at a site (stain chemistry, optics, frame statistics) is learnt by fine-tuning.
"""

from __future__ import annotations

import hashlib
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgecells.calibration.calibset import CalibSet
from edgecells.calibration.replay import read_replay, stratified_subset
from edgecells.edge.bundle import (
    MANIFEST_NAME,
    load_bundle,
    read_manifest,
    sha256_file,
    write_manifest,
)
from edgecells.edge.errors import EdgecellsError
from edgecells.training.adapt import (
    AdaptConfig,
    LocalCells,
    accuracy,
    choose_alpha,
    finetune_soup,
    load_trainable,
    mix,
    read_local_cells,
    split_holdout,
)

MAX_CALIBRATION = 400  # calibration images (replay + local), enough for int8 ranges
Step = Callable[[str], None]


@dataclass
class AdaptResult:
    bundle_dir: Path
    passed: bool
    failures: list[str]
    adaptation: dict[str, Any]
    seconds: float
    peak_rss_mb: float
    convert: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "bundle": str(self.bundle_dir),
            "passed": self.passed,
            "failures": self.failures,
            "seconds": round(self.seconds, 1),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            **self.adaptation,
        }


def peak_rss_mb() -> float:
    """Peak resident memory of this process, MiB (Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1 << 20) if sys.platform == "darwin" else r / 1024


def trainable_model(parent: Any, source_model: str | os.PathLike[str] | None) -> Path:
    """The parent's float model file (verified by hash), or a one-line refusal."""
    entry = parent.training_files.get("source_model")
    if entry is not None:
        return parent.root / entry.path  # verified with the bundle
    want = parent.provenance.get("source_model_sha256")
    if source_model is None:
        raise EdgecellsError(
            f"{parent.source or parent.root}: bundle has no trainable model (no "
            "training.source_model); convert it again with this edgecells, or pass "
            "--source-model FILE (the Keras model it was converted from)"
        )
    p = Path(source_model)
    if not p.is_file():
        raise EdgecellsError(f"{p}: no such model file")
    got = sha256_file(p)
    if not want or got != want:
        raise EdgecellsError(
            f"{p}: SHA-256 {got[:12]}... is not this bundle's source model "
            f"({str(want)[:12] if want else 'not recorded'}...)"
        )
    return p


def _predict(bundle: Any, x: np.ndarray, fmt: str, threads: int | None) -> np.ndarray:
    from edgecells.edge.backends import open_classifier

    if len(x) == 0:
        return np.zeros((0, len(bundle.classes)), np.float32)
    clf = open_classifier(bundle, model_id=f"{fmt}-int8", threads=threads)
    try:
        return np.concatenate([clf.predict(x[i : i + 256]) for i in range(0, len(x), 256)])
    finally:
        clf.close()


def _replay_from_data(
    data: Path, parent: Any, target: Any, cfg: AdaptConfig, step: Step
) -> tuple[Any, ...]:
    from edgecells.calibration.datasets import load_dataset, load_split

    ds = load_dataset(data, mapping=parent.class_mapping())
    step(f"reading replay data {data.name}")
    # at the parent's physical field (None for bundles from before pixel sizes)
    px = parent.preprocessing.get("pixel_size_um")
    tr = load_split(ds, "train", parent.input_size, target, model_pixel_um=px)
    keep = stratified_subset(tr.y, cfg.replay_per_class, cfg.seed)
    rx, ry = tr.x[keep], tr.y[keep]
    te = load_split(ds, "test", parent.input_size, target, model_pixel_um=px)
    if len(te.x) == 0:
        raise EdgecellsError(f"{data}: the test split has no readable images")
    va = load_split(ds, "val", parent.input_size, target, model_pixel_um=px)
    return (
        rx,
        ry,
        f"{data.name} train split ({len(ry)} images, {cfg.replay_per_class} per class)",
        te.x,
        te.y,
        f"{data.name} test split ({len(te.y)} images)",
        va.x,
        va.y,
        f"{data.name} val split ({len(va.y)} images)",
    )


def adapt_bundle(
    bundle: str | os.PathLike[str] | None,
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    cfg: AdaptConfig | None = None,
    *,
    replay_data: str | os.PathLike[str] | None = None,
    source_model: str | os.PathLike[str] | None = None,
    max_pbc_drop: float = 1.0,
    refit_thresholds: bool = True,
    pixel_size_um: float | None = None,
    formats: list[str] | None = None,
    name: str | None = None,
    threads: int | None = None,
    step: Step | None = None,
    on_train_step: Callable[[int], None] | None = None,
) -> AdaptResult:
    """Adapt ``bundle`` to the labelled cells in ``data``; write the new bundle to ``out``.
    Never raises on a failed gate (``AdaptResult.passed``); the bundle is written either
    way and its manifest says why it failed. ``refit_thresholds``: with ``replay_data``,
    refit the temperature, OOD threshold and flag on its validation split for the adapted
    model (as ``bundle refit`` does); otherwise the parent's are kept."""
    from edgecells.convert import pipeline, writer
    from edgecells.convert.source import from_keras

    t0 = time.perf_counter()
    cfg = cfg or AdaptConfig()
    step = step or (lambda _s: None)
    if cfg.epochs < 1:
        raise EdgecellsError(f"--epochs must be >= 1, got {cfg.epochs}")
    if cfg.soup < 1:
        raise EdgecellsError(f"--soup must be >= 1, got {cfg.soup}")
    if not 0 <= cfg.holdout < 1:
        raise EdgecellsError(f"--holdout must be in [0, 1), got {cfg.holdout}")
    out = Path(out)
    step("loading parent bundle")
    parent = load_bundle(bundle)
    if parent.task != "multiclass":
        raise EdgecellsError(f"{parent.root}: only multiclass bundles can be adapted")
    parent_sha = sha256_file(parent.root / MANIFEST_NAME)
    model_path = trainable_model(parent, source_model)
    try:
        model = load_trainable(model_path, cfg.seed)  # seeded: reproducible fine-tuning
    except Exception as exc:  # keras raises many types for a bad file
        raise EdgecellsError(f"{model_path}: cannot load Keras model ({exc})") from None
    size = parent.input_size
    if tuple(model.input_shape[1:]) != (size, size, 3) or model.output_shape[-1] != len(
        parent.classes
    ):
        raise EdgecellsError(
            f"{model_path}: model takes {model.input_shape} -> {model.output_shape}, the bundle "
            f"{size}x{size}x3 -> {len(parent.classes)} classes"
        )
    target = parent.load_stain_target()
    normalizer = None
    if target is not None:
        from edgecells.edge.stain import ReinhardNormalizer

        normalizer = ReinhardNormalizer(target)
    classes = list(parent.classes)

    step(f"reading local cells {Path(data).name}")
    if pixel_size_um is not None and not pixel_size_um > 0:
        raise EdgecellsError(f"--pixel-size must be > 0 µm/px, got {pixel_size_um}")
    local: LocalCells = read_local_cells(
        data,
        classes,
        normalizer,
        size,
        cfg.min_per_class,
        pixel_size_um=pixel_size_um,
        model_pixel_um=parent.pixel_size_um if pixel_size_um is not None else None,
    )
    tr_idx, ho_idx = split_holdout(local.y, cfg.holdout, cfg.seed)

    if replay_data is not None:
        rx, ry, rdesc, cx, cy, cdesc, sx, sy, sdesc = _replay_from_data(
            Path(replay_data), parent, target, cfg, step
        )
        child_check = None  # convert keeps a subset of the check data (its validation)
    else:
        entry = parent.training_files.get("replay")
        if entry is None:
            raise EdgecellsError(
                f"{parent.root}: bundle carries no replay set; pass --replay-data DIR (the "
                "data the parent was trained on) so that adapting does not forget it"
            )
        rep = read_replay(parent.root / entry.path)
        if rep["classes"] != classes:
            raise EdgecellsError(f"{entry.path}: replay classes differ from the bundle's")
        rx, ry = rep["x"], rep["y"]
        rdesc = f"bundle replay set: {rep['meta'].get('replay_data', '')}"
        cx, cy = rep["check_x"], rep["check_y"]
        cdesc = f"bundle check set: {rep['meta'].get('check_data', '')} ({len(cy)} images)"
        child_check = (cx, cy, rep["meta"].get("check_data", ""))
        # no validation split at hand: alpha is chosen on the check set it is gated on
        sx, sy, sdesc = cx, cy, cdesc
        if len(cy) == 0:
            raise EdgecellsError(
                f"{parent.root}: bundle carries no check set to gate forgetting on; pass "
                "--replay-data DIR"
            )
    if rx.shape[1:] != (size, size, 3):
        raise EdgecellsError(f"replay images are {rx.shape[1:]}, the model takes {size}")

    fmts = formats or [f for f in ("tflite", "openvino", "onnx") if f in parent.formats("int8")]
    if not fmts:
        raise EdgecellsError(f"{parent.root}: the parent has no int8 model to compare with")
    primary = fmts[0]
    step("scoring the parent")
    hx, hy = local.x[ho_idx], local.y[ho_idx]
    before_local = accuracy(_predict(parent, hx, primary, threads), hy, classes)
    before_check = accuracy(_predict(parent, cx, primary, threads), cy, classes)

    def tune(idx: np.ndarray, what: str) -> tuple[Any, ...]:
        mx, my, reps = mix(local.x[idx], local.y[idx], rx, ry, cfg.local_share)
        step(f"fine-tuning on {what}")
        log = finetune_soup(model, parent_weights, mx, my, len(classes), cfg, on_train_step)
        alpha, alphas = 1.0, []
        if cfg.interpolate:
            step("choosing the interpolation weight")
            alpha, alphas = choose_alpha(model, parent_weights, sx, sy, cfg.select_drop_pp)
        return my, reps, log, alpha, alphas

    t_train = time.perf_counter()
    parent_weights = model.get_weights()
    two_pass = cfg.train_on_all and len(ho_idx) > 0
    my, reps, log, alpha, alphas = tune(tr_idx, "the local training cells")
    local_gate = None
    if two_pass:
        # The gate's figure comes from this run, fine-tuned without the held-out cells
        # (float, like the parent it is compared with); the bundle is then fine-tuned
        # again, the same way, on every local cell: 25 labelled cells of a class all teach
        # the shipped model, and the held-out check still measures the recipe.
        from edgecells.training.train import predict_probs

        gate_after = accuracy(predict_probs(model, hx)[0], hy, classes)
        model = load_trainable(model_path, cfg.seed)  # afresh: as a one-pass run would be
        gate_before = accuracy(predict_probs(model, hx)[0], hy, classes)
        local_gate = {
            "models": "float; after = the same recipe fine-tuned without these cells",
            "before": gate_before,
            "after": gate_after,
            "alpha": alpha,
        }
        tr_idx = np.arange(len(local.y))
        my, reps, log, alpha, alphas = tune(tr_idx, "every local cell")
    train_s = time.perf_counter() - t_train

    # calibration: replay + local training cells (the int8 ranges must cover the site)
    rng = np.random.default_rng(cfg.seed)
    lx, ly = local.x[tr_idx], local.y[tr_idx]
    n_rep = max(0, min(len(rx), MAX_CALIBRATION - len(lx)))
    ridx = np.sort(rng.choice(len(rx), size=n_rep, replace=False)) if n_rep else np.zeros(0, int)
    calib_x = np.concatenate([rx[ridx], lx])
    calib_y = np.concatenate([ry[ridx], ly])
    calib = CalibSet(
        x=calib_x,
        y=calib_y,
        classes=classes,
        manifest={
            "data": f"replay ({len(ridx)}) + local training cells ({len(lx)})",
            "split": "train",
            "seed": cfg.seed,
            "counts": {c: int(np.sum(calib_y == i)) for i, c in enumerate(classes)},
            "stain_target": parent.stain_target,
            "preprocessing": parent.preprocessing,
        },
    )
    calib.sha256 = hashlib.sha256(calib_x.tobytes()).hexdigest()

    with tempfile.TemporaryDirectory() as tmp:
        step("converting")
        tmp_model = Path(tmp) / "model.keras"
        model.save(tmp_model)
        source = from_keras(model, tmp_model, sha256_file(tmp_model))
        result = pipeline.convert_model(
            source,
            calib,
            out,
            fmts,
            classes=classes,
            mapping=parent.mapping,
            val_x=cx,
            val_y=cy,
            val_desc=cdesc,
            name=name or f"{parent.name}-adapted",
            extra_provenance={
                "parent_bundle": parent.name,
                "parent_bundle_sha256": parent_sha,
            },
            step=step,
            threads=threads,
            replay=(rx, ry, rdesc),
            check=child_check,
            test_time_views=parent.test_time_views,  # the child averages what the parent did
        )
    new = load_bundle(out)
    step("scoring the adapted bundle")
    after_local = accuracy(_predict(new, hx, primary, threads), hy, classes)
    after_check = accuracy(_predict(new, cx, primary, threads), cy, classes)

    failures = list(result.failures)
    drop = None
    if before_check["accuracy"] is not None and after_check["accuracy"] is not None:
        drop = round(100 * (before_check["accuracy"] - after_check["accuracy"]), 3)
        if drop > max_pbc_drop:
            failures.append(
                f"check data accuracy fell {drop:.2f} points ({cdesc}), more than {max_pbc_drop}"
            )
    if cfg.interpolate and alpha == 0.0:
        failures.append(
            "nothing adapted: every interpolation weight lost more than "
            f"{cfg.select_drop_pp} points on {sdesc}; the new bundle equals the parent"
        )
    gb, ga = (
        (local_gate["before"], local_gate["after"]) if local_gate else (before_local, after_local)
    )
    if gb["n"] and ga["accuracy"] < gb["accuracy"]:
        failures.append(
            f"held-out local accuracy fell from {gb['accuracy']:.3f} to {ga['accuracy']:.3f}"
            + (" (fine-tuned without them)" if local_gate else "")
        )
    seconds = time.perf_counter() - t0
    held = set(ho_idx.tolist())
    adaptation = {
        "parent": {
            "name": parent.name,
            "manifest_sha256": parent_sha,
            "source_model_sha256": sha256_file(model_path),
        },
        "local_data": {
            "folder": local.root.name,
            "n": int(len(local.y)),
            "counts": local.counts(),
            "train_counts": local.counts(tr_idx),
            "holdout_counts": local.counts(ho_idx),
            "shipped_model_trained_on": "every local cell (held-out cells after the gate run)"
            if two_pass
            else "the local training cells",
            "from_index_csv": local.from_index,
            "pixel_size_um": pixel_size_um,
            "files": [
                {
                    "path": f,
                    "sha256": s,
                    "label": classes[int(k)],
                    "split": "holdout" if i in held else "train",
                }
                for i, (f, s, k) in enumerate(zip(local.files, local.sha256, local.y))
            ],
        },
        "replay": {"data": rdesc, "n": int(len(ry)), "local_repeats": reps, "mix_n": len(my)},
        "check_data": cdesc,
        "stain_target": "parent's (unchanged)",
        "config": cfg.to_dict(),
        "train_log": log,
        "interpolation": {
            "alpha": alpha,
            "selected_on": sdesc if cfg.interpolate else None,
            "tried": alphas,
        },
        "metrics": {
            "format": f"{primary}-int8",
            "before": {"local_holdout": before_local, "check": before_check},
            "after": {"local_holdout": after_local, "check": after_check},
            # two passes: the held-out gate's figures (after_local above is the shipped
            # model on cells it was trained on)
            "local_gate": local_gate,
            "check_drop_pp": drop,
        },
        "gate": {"passed": not failures, "failures": failures, "max_check_drop_pp": max_pbc_drop},
        "train_seconds": round(train_s, 1),
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    manifest = read_manifest(out)
    manifest["crop"] = dict(parent.crop)
    thresholds = {**parent.thresholds}
    screening = {**(parent.thresholds.get("screening") or {})}
    screening.update(
        {
            k: v
            for k, v in (manifest["thresholds"].get("screening") or {}).items()
            if k in ("false_positive_rate", "per_cell_sensitivity", "rates_measured_on")
        }
    )
    thresholds["screening"] = screening
    manifest["thresholds"] = thresholds  # the parent's, with the rates measured now
    adaptation["thresholds"] = "parent's (no validation split at hand)"
    manifest["adaptation"] = adaptation
    writer.write(out, manifest)
    load_bundle(out)
    if replay_data is not None and refit_thresholds:
        # The parent's temperature and OOD threshold were fitted to the parent's
        # confidences; the adapted model's differ. Refit them (and the flag thresholds and
        # per-cell rates) exactly as `bundle refit` does, on the original data's
        # validation split (never its test split, never the local cells).
        from edgecells.training.abstention import TARGET_UNIDENTIFIED, refit_bundle

        step("refitting thresholds on the validation split")
        ood = parent.thresholds.get("ood") or {}
        try:
            refit_bundle(
                out, replay_data, None, float(ood.get("target_unidentified", TARGET_UNIDENTIFIED))
            )
            how = f"refitted on {sdesc}, device path"
        except EdgecellsError as exc:  # e.g. a validation split too small to fit a flag
            how = f"parent's (not refitted on {sdesc}: {exc})"
        seconds = time.perf_counter() - t0  # the whole run, refit included
        manifest = read_manifest(out)
        manifest["adaptation"].update(
            thresholds=how, seconds=round(seconds, 1), peak_rss_mb=round(peak_rss_mb(), 1)
        )
        adaptation = manifest["adaptation"]
        write_manifest(out, manifest)
        load_bundle(out)
    return AdaptResult(
        bundle_dir=out,
        passed=not failures,
        failures=failures,
        adaptation=adaptation,
        seconds=seconds,
        peak_rss_mb=peak_rss_mb(),
        convert=result,
    )
