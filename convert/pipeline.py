"""``edgecells convert`` end to end: source model + calibration set -> verified bundle.

Steps: convert each asked format to int8 and keep its float32 reference, write the
bundle and load it back (hash-verified), run float32 and int8 of every format through
the device backends on the validation images, apply the accuracy-drop gate, name the
layers to blame where a format fails it, and write the manifest (with the metrics) and
``validation.json`` (always, pass or fail).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgecells.calibration.calibset import CalibSet
from edgecells.convert import validate, writer
from edgecells.convert.source import SourceModel
from edgecells.edge.bundle import MANIFEST_NAME, load_bundle
from edgecells.edge.errors import EdgecellsError
from edgecells.edge.fileio import write_json_atomic

ALL_FORMATS = ("tflite", "openvino", "onnx")
REPORT_NAME = "validation.json"

Step = Callable[[str], None]


@dataclass
class FormatResult:
    format: str
    seconds: float
    int8_bytes: int
    float32_bytes: int
    validation: validate.FormatValidation | None = None
    error: str | None = None  # conversion failed (only with continue_on_error)

    @property
    def size_ratio(self) -> float:
        return self.int8_bytes / self.float32_bytes if self.float32_bytes else float("nan")


@dataclass
class ConvertResult:
    bundle_dir: Path
    formats: list[FormatResult]
    validation_data: str
    failures: list[str] = field(default_factory=list)
    report_path: Path | None = None
    archive: Path | None = None
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {
            "bundle": str(self.bundle_dir),
            "archive": str(self.archive) if self.archive else None,
            "passed": self.passed,
            "failures": self.failures,
            "validation_data": self.validation_data,
            "report": str(self.report_path) if self.report_path else None,
            "seconds": round(self.seconds, 2),
            "formats": [
                {
                    "format": r.format,
                    "seconds": round(r.seconds, 2),
                    "int8_bytes": r.int8_bytes,
                    "float32_bytes": r.float32_bytes,
                    "size_ratio": round(r.size_ratio, 4),
                    "validation": r.validation.to_dict() if r.validation else None,
                    "error": r.error,
                }
                for r in self.formats
            ],
        }


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Route everything the converters print (Python and C level) to stderr, so that
    stdout carries only our result (``--json`` stays parseable)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def parse_formats(text: str | Sequence[str]) -> list[str]:
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for f in (s.strip().lower() for s in items):
        if not f:
            continue
        if f not in ALL_FORMATS:
            raise EdgecellsError(f"unknown format {f!r} (choose from {', '.join(ALL_FORMATS)})")
        if f not in out:
            out.append(f)
    if not out:
        raise EdgecellsError("no output format given")
    return out


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise EdgecellsError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise EdgecellsError(f"{out}: folder is not empty and not a bundle; choose another --out")
    out.mkdir(parents=True, exist_ok=True)


def _convert_format(
    fmt: str, source: SourceModel, calib_x: np.ndarray, out: Path, io_type: str, keep: dict
) -> tuple[list[dict[str, Any]], FormatResult]:
    t0 = time.perf_counter()
    if fmt == "tflite":
        from edgecells.convert import tflite

        fbytes = tflite.convert_float(source)
        qbytes = tflite.convert_int8(source, calib_x, io_type)
        (out / "model_float32.tflite").write_bytes(fbytes)
        (out / "model_int8.tflite").write_bytes(qbytes)
        fi, fo = tflite.io_specs(fbytes)
        qi, qo = tflite.io_specs(qbytes)
        files = {"float32": ["model_float32.tflite"], "int8": ["model_int8.tflite"]}
        specs = {"float32": (fi, fo), "int8": (qi, qo)}
    elif fmt == "onnx":
        from edgecells.convert import onnx as conx

        fbytes = conx.export_float(source)
        qbytes = conx.quantize_int8(fbytes, calib_x)
        (out / "model_float32.onnx").write_bytes(fbytes)
        (out / "model_int8.onnx").write_bytes(qbytes)
        files = {"float32": ["model_float32.onnx"], "int8": ["model_int8.onnx"]}
        specs = {"float32": conx.io_specs(fbytes), "int8": conx.io_specs(qbytes)}
        keep["onnx"] = (fbytes, qbytes)
    else:
        from edgecells.convert import openvino as cov

        fmodel = cov.convert_float(source.onnx_float())
        qmodel = cov.quantize_int8(fmodel, calib_x)
        cov.save(fmodel, out / "openvino", "model_float32")
        cov.save(qmodel, out / "openvino", "model_int8")
        files = {
            p: [f"openvino/model_{p}.xml", f"openvino/model_{p}.bin"] for p in ("float32", "int8")
        }
        specs = {"float32": cov.io_specs(fmodel), "int8": cov.io_specs(qmodel)}
        keep["openvino"] = (fmodel, qmodel)
    entries = [
        writer.model_entry(out, fmt, p, files[p], specs[p][0], specs[p][1])
        for p in ("int8", "float32")
    ]
    sizes = {p: sum((out / f).stat().st_size for f in files[p]) for p in files}
    return entries, FormatResult(fmt, time.perf_counter() - t0, sizes["int8"], sizes["float32"])


def blame_layers(
    fmt: str, source: SourceModel, calib_x: np.ndarray, keep: dict, top: int, n_images: int
) -> list[dict[str, Any]]:
    """The layers/tensors whose int8 output strays most from float, for one format."""
    x = calib_x[:n_images]
    try:
        if fmt == "tflite":
            from edgecells.convert import tflite

            return tflite.debug_layers(source, x, top=top, max_images=n_images)
        if fmt == "onnx":
            from edgecells.convert import onnx as conx

            return conx.debug_layers(*keep["onnx"], x, top=top)
        from edgecells.convert import openvino as cov

        return cov.debug_layers(*keep["openvino"], x, top=top)
    except Exception as exc:  # the debugger is best effort; the gate result stands
        return [{"error": f"layer analysis failed: {exc}"}]


def _model_operating_point(model_path: Path) -> float | None:
    """The operating point `edgecells train` stored in metrics.json beside the model."""
    metrics = Path(model_path).parent / "metrics.json"
    if not Path(model_path).is_file() or not metrics.is_file():
        return None
    try:
        op = json.loads(metrics.read_text(encoding="utf-8")).get("operating_point")
    except (OSError, ValueError, AttributeError):
        return None
    return round(float(op), 6) if isinstance(op, int | float) and 0 < op < 1 else None


def _add_selftest(out: Path, x: np.ndarray, y: np.ndarray, classes: Sequence[str]) -> None:
    """Self-test crops for `edgecells doctor` and bundle updates: up to 4 held-out images
    per class, the deploy model keeps one per class predicted right with a clear margin."""
    from edgecells.convert.selftest import make_selftest

    rng = np.random.default_rng(0)
    idx = [int(i) for c in range(len(classes)) for i in rng.permutation(np.flatnonzero(y == c))[:4]]
    if not idx:
        return
    try:
        make_selftest(out, [x[i] for i in idx], [classes[int(y[i])] for i in idx])
    except EdgecellsError:
        pass  # no crop predicted with a clear margin: doctor then warns, nothing breaks


def convert_model(
    source: SourceModel,
    calib: CalibSet,
    out_dir: str | os.PathLike[str],
    formats: Sequence[str] = ALL_FORMATS,
    *,
    classes: Sequence[str],
    mapping: dict[str, Any],
    task: str = "multiclass",
    io_type: str = "int8",
    keep_float: bool = True,
    val_x: np.ndarray | None = None,
    val_y: np.ndarray | None = None,
    val_desc: str = "",
    max_drop: float | None = None,
    name: str = "",
    extra_provenance: dict[str, Any] | None = None,
    step: Step | None = None,
    threads: int | None = None,
    continue_on_error: bool = False,
    analyse_layers: bool = True,
    training_files: bool = True,
    replay: tuple[np.ndarray, np.ndarray, str] | None = None,
    check: tuple[np.ndarray, np.ndarray, str] | None = None,
    test_time_views: list[str] | None = None,
) -> ConvertResult:
    """Convert, write, verify and validate a bundle. Never raises on a failed gate: the
    caller decides (``ConvertResult.failures``); the report is always written.

    ``training_files``: for a Keras source with a labelled calibration set, also put the
    float model and a replay/check set into the bundle (:mod:`.trainfiles`) so that
    ``edgecells adapt`` can fine-tune it. The replay set is ``replay`` (x, y, description)
    or the calibration set; the check set ``check`` or a subset of the validation data."""
    from edgecells.edge.backends import open_classifier

    t_start = time.perf_counter()
    cfg = writer.defaults()["validation"]
    max_drop = cfg["max_drop_pp"] if max_drop is None else float(max_drop)
    out = Path(out_dir)
    _prepare_out(out)
    if calib.size != source.input_size:
        raise EdgecellsError(
            f"{calib.path or 'calibration set'}: images are {calib.size}x{calib.size} but "
            f"{source.path} takes {source.input_size}x{source.input_size}; rebuild it with "
            f"--size {source.input_size}"
        )
    n_out = 1 if task == "binary" else len(classes)
    if source.num_outputs not in (n_out, len(classes)):
        raise EdgecellsError(
            f"{source.path}: model has {source.num_outputs} outputs but the mapping has "
            f"{len(classes)} classes"
        )
    step = step or (lambda _s: None)
    keep: dict[str, Any] = {}
    entries: list[dict[str, Any]] = []
    results: list[FormatResult] = []
    for fmt in formats:
        step(f"converting {fmt}")
        try:
            e, r = _convert_format(fmt, source, calib.x, out, io_type, keep)
        except EdgecellsError as exc:
            if not continue_on_error:
                raise
            results.append(FormatResult(fmt, 0.0, 0, 0, error=str(exc)))
            continue
        entries += e
        results.append(r)
    failed = [r for r in results if r.error]
    if len(failed) == len(results):
        raise EdgecellsError(f"{source.path}: no format converted ({failed[0].error})")
    target = calib.manifest.get("stain_target")
    provenance = {
        "source_model": source.name,
        "source_model_sha256": source.sha256 or None,
        "source_kind": source.kind,
        "calibration_sha256": calib.sha256,
        "calibration": {
            k: calib.manifest.get(k)
            for k in ("data", "split", "seed", "counts", "synthetic", "preprocessing")
            if k in calib.manifest
        },
        "data": val_desc,
        **(extra_provenance or {}),
    }
    manifest = writer.build_manifest(
        name=name or source.path.stem,
        task=task,
        classes=list(classes),
        mapping=mapping,
        stain_target=target,
        input_size=source.input_size,
        models=entries,
        validation={},
        provenance=provenance,
        pixel_size_um=calib.manifest.get("preprocessing", {}).get("pixel_size_um"),
        test_time_views=test_time_views,
    )
    labelled_calib = not calib.manifest.get("synthetic") and list(calib.classes) == list(classes)
    if (
        training_files
        and source.kind == "keras"
        and task != "binary"
        and (replay is not None or labelled_calib)
    ):
        from edgecells.convert.trainfiles import add_training_files

        step("adding training files")
        rx, ry, rdesc = replay or (
            calib.x,
            calib.y,
            f"calibration set ({calib.manifest.get('data', '?')} "
            f"{calib.manifest.get('split', 'train')} split)",
        )
        if check is None and val_x is not None and val_y is not None:
            check = (val_x, np.asarray(val_y), val_desc or "validation data")
        cx, cy, cdesc = check or (None, None, "")
        add_training_files(out, manifest, source, rx, ry, rdesc, cx, cy, cdesc)
    writer.write(out, manifest)
    bundle = load_bundle(out)

    # Validation through the device backends.
    held_out = val_x is not None and val_y is not None
    real_labels = held_out or not calib.manifest.get("synthetic")
    if val_x is None:
        val_x, val_y = calib.x, calib.y
        val_desc = val_desc or "calibration set (training split; not held out)"
    abnormal = [i for i, c in enumerate(classes) if bundle.abnormal_mask[i]]
    int8_probs: dict[str, np.ndarray] = {}
    for r in (r for r in results if not r.error):
        step(f"validating {r.format}")
        probs = {}
        ms = {}
        for prec in ("float32", "int8"):
            clf = open_classifier(bundle, model_id=f"{r.format}-{prec}", threads=threads)
            probs[prec], ms[prec] = validate.predict_all(clf, val_x)
            clf.close()
        int8_probs[r.format] = probs["int8"]
        r.validation = validate.compare(
            r.format, probs["float32"], probs["int8"], val_y, classes, abnormal
        )
        r.validation.ms_per_image_float32 = ms["float32"]
        r.validation.ms_per_image_int8 = ms["int8"]
    failures = validate.gate([r.validation for r in results if r.validation], max_drop)
    failures += [f"{r.format}: conversion failed: {r.error}" for r in results if r.error]
    for r in results:
        v = r.validation
        if (
            analyse_layers
            and v is not None
            and (not v.passed or v.agreement < cfg["min_agreement"])
        ):
            step(f"analysing {r.format} layers")
            v.blame = blame_layers(
                r.format, source, calib.x, keep, cfg["debug_top_layers"], cfg["debug_images"]
            )
    report = {
        "bundle": out.name,
        "validation_data": val_desc,
        "n": int(val_x.shape[0]),
        "max_drop_pp": max_drop,
        "passed": not failures,
        "failures": failures,
        "formats": {r.format: r.validation.to_dict() for r in results if r.validation},
        "sizes": {
            r.format: {
                "int8_bytes": r.int8_bytes,
                "float32_bytes": r.float32_bytes,
                "ratio": round(r.size_ratio, 4),
            }
            for r in results
            if not r.error
        },
        "conversion_errors": {r.format: r.error for r in results if r.error},
        "conversion_seconds": {r.format: round(r.seconds, 2) for r in results},
    }
    manifest["validation"] = {
        f"{r.format}-int8": {
            "data": val_desc,
            "n": r.validation.n,
            "accuracy_float32": r.validation.float32.accuracy,
            "accuracy_int8": r.validation.int8.accuracy,
            "accuracy_drop_pp": r.validation.accuracy_drop_pp,
            "auc_abnormal_float32": r.validation.float32.auc_abnormal,
            "auc_abnormal_int8": r.validation.int8.auc_abnormal,
            "recall_int8": r.validation.int8.recall,
            "agreement": r.validation.agreement,
            "prob_diff_mean": r.validation.prob_diff_mean,
            "prob_diff_max": r.validation.prob_diff_max,
            "passed": r.validation.passed,
        }
        for r in results
        if r.validation
    }
    if not keep_float:
        for m in [m for m in manifest["models"] if m["precision"] == "float32"]:
            for f in m["files"]:
                (out / f["path"]).unlink(missing_ok=True)
        manifest["models"] = [m for m in manifest["models"] if m["precision"] != "float32"]
        if (out / "openvino").is_dir() and not any((out / "openvino").iterdir()):
            shutil.rmtree(out / "openvino")
    op = _model_operating_point(source.path)
    if op is not None:  # the abnormal-score threshold chosen at training (metrics.json)
        manifest["thresholds"]["operating_point"] = op
    writer.write(out, manifest)
    if real_labels and val_y is not None and int8_probs and task != "binary":
        step("adding self-test samples")
        _add_selftest(out, val_x, np.asarray(val_y), classes)
    report_path = out / REPORT_NAME
    write_json_atomic(report_path, report)
    load_bundle(out)  # the final manifest verifies
    return ConvertResult(
        bundle_dir=out,
        formats=results,
        validation_data=val_desc,
        failures=failures,
        report_path=report_path,
        seconds=time.perf_counter() - t_start,
    )
