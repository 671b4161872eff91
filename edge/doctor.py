"""``edgecells doctor``: a device self-check a field engineer runs first.

Each check gives one line: OK, WARN or FAIL, what was found and, when not OK, what to do.

* ``backends``: which inference runtimes import, their versions (ONNX Runtime: its
  execution providers; TensorRT when present).
* ``config``: the config file reads and validates.
* ``bundle``: the bundle verifies (schema, SHA-256 of every file); ``selftest``: a test
  inference on the bundle's own sample cells gives the labels recorded when it was built
  (see :func:`make_selftest`); ``pipeline``: the whole frame pipeline (quality, stain,
  detection, crops, inference) runs on a shipped sample frame.
* ``camera``: the configured source opens and delivers a frame (with a time limit).
* ``scale``: the pixel size estimated from the source's red cells (``edge/scale.py``);
  WARN when it differs from the configured ``[camera] pixel_size_um`` by more than 10%.
* ``disk``: free space where the results go.
* ``system``: on a Raspberry Pi the CPU temperature and ``vcgencmd get_throttled``.

The self-test samples: a bundle may carry ``selftest/*.png`` crops (already at the model's
input size, stain-normalized) and a manifest entry (an extra key; bundle loading ignores
it)::

    "selftest": {"model_id": "tflite-int8",
                 "samples": [{"path": "selftest/00_neutrophil.png", "sha256": "...",
                              "bytes": 1234, "label": "neutrophil", "truth": "neutrophil"}]}

``label`` is what the bundle's model predicted on the host when the bundle was made, so a
device that gives another label runs the model differently (a broken runtime, a wrong
file). :func:`make_selftest` writes them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgecells.edge.errors import EdgecellsError

OK, WARN, FAIL = "OK", "WARN", "FAIL"
GROUPS = ("backends", "config", "bundle", "camera", "scale", "disk", "system")
SCALE_TOLERANCE = 0.10  # configured vs estimated pixel size: WARN beyond this
SELFTEST_DIR = "selftest"


@dataclass
class Limits:
    """Thresholds of the checks."""

    disk_fail_mb: int = 200  # less free than this where results go: FAIL
    disk_warn_mb: int = 1024  # less than this: WARN
    temp_warn_c: float = 75.0  # Pi CPU temperature: WARN (the Pi throttles from 80-85 C)
    temp_fail_c: float = 85.0  # FAIL
    camera_timeout_s: float = 20.0  # first frame must arrive within this


@dataclass
class Check:
    """One line of the report."""

    name: str
    status: str
    detail: str
    fix: str = ""


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.status != FAIL for c in self.checks)

    @property
    def worst(self) -> str:
        s = {c.status for c in self.checks}
        return FAIL if FAIL in s else WARN if WARN in s else OK

    def add(self, name: str, status: str, detail: str, fix: str = "") -> Check:
        c = Check(name, status, detail, fix)
        self.checks.append(c)
        return c

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "status": self.worst, "checks": [asdict(c) for c in self.checks]}


# --------------------------------------------------------------------------- backends


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return None
    dists = {
        "litert": ("ai-edge-litert", "tflite-runtime"),
        "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino"),
        "openvino": ("openvino",),
        "tensorrt": ("tensorrt",),
    }.get(module, (module,))
    for d in dists:
        try:
            return version(d)
        except PackageNotFoundError:
            continue
    return None


def check_backends(report: Report, configured: str = "auto") -> list[str]:
    """One line per runtime; returns the names that import."""
    from edgecells.edge.backends import AUTO_ORDER, backend_module

    working: list[str] = []
    for name in AUTO_ORDER:
        mod = backend_module(name)
        if not mod.available():
            report.add(
                f"backend {name}",
                OK if configured != name else FAIL,
                "not installed",
                ""
                if configured != name
                else f'pip install the {name} runtime, or set [inference] backend = "auto"',
            )
            continue
        extra = ""
        try:
            if name == "onnxruntime":
                import onnxruntime as ort

                extra = f"; providers: {', '.join(ort.get_available_providers())}"
            elif name == "openvino":
                import openvino as ov

                extra = f"; devices: {', '.join(ov.Core().available_devices)}"
            elif name == "litert":
                from ai_edge_litert import interpreter  # noqa: F401
        except Exception as exc:  # a runtime that is installed but broken
            report.add(
                f"backend {name}",
                FAIL if configured in (name, "auto") else WARN,
                f"installed but does not import ({type(exc).__name__}: {exc})",
                f"reinstall it: pip install --force-reinstall {name}",
            )
            continue
        working.append(name)
        report.add(f"backend {name}", OK, f"{_version(name) or '?'}{extra}")
    if importlib_find("tensorrt"):
        report.add("backend tensorrt", OK, f"TensorRT {_version('tensorrt') or '?'} (Python)")
    else:
        report.add(
            "backend tensorrt",
            FAIL if configured == "tensorrt" else OK,
            "not installed",
            "Jetson: sudo apt-get install python3-libnvinfer, and pip install cuda-python"
            if configured == "tensorrt"
            else "",
        )
    if not working:
        report.add(
            "backends",
            FAIL,
            "no inference runtime imports",
            'pip install "edgecells" (LiteRT) or "edgecells[onnx]" into the device venv',
        )
    return working


def importlib_find(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# --------------------------------------------------------------------------- self-test


def argmax_labels(probs: np.ndarray, classes: Sequence[str]) -> list[str]:
    return [classes[int(i)] for i in np.argmax(probs, axis=1)]


def run_selftest(bundle: Any, classifier: Any) -> tuple[str, str, str]:
    """(status, detail, fix) of a test inference on the bundle's self-test samples."""
    from edgecells.edge.bundle import sha256_file
    from edgecells.edge.imageio import read_image

    entry = bundle.manifest.get("selftest")
    if not isinstance(entry, dict) or not entry.get("samples"):
        return (
            WARN,
            "the bundle has no self-test samples; only checked that inference runs",
            "rebuild the bundle with a current edgecells convert (it adds them)",
        )
    root = Path(bundle.root)
    crops, expected = [], []
    # paths come from the parsed manifest (plain relative paths inside the bundle; links
    # and escapes were refused when the bundle loaded)
    files = getattr(bundle, "selftest", ()) or ()
    if len(files) != len(entry["samples"]):
        return FAIL, "self-test entry of the manifest was not checked", "reinstall the bundle"
    for s, fe in zip(entry["samples"], files):
        p = root / fe.path
        if p.is_symlink() or not p.resolve().is_relative_to(root.resolve()):
            return FAIL, f"{p}: self-test sample is a link or outside the bundle", "reinstall"
        if not p.is_file():
            return FAIL, f"{p}: self-test sample missing", "reinstall the bundle"
        if sha256_file(p) != s.get("sha256"):
            return FAIL, f"{p}: self-test sample modified (SHA-256)", "reinstall the bundle"
        crops.append(read_image(p))
        expected.append(str(s.get("label")))
    probs = classifier.predict(np.stack(crops))
    got = argmax_labels(probs, bundle.classes)
    wrong = [f"{e} -> {g}" for e, g in zip(expected, got) if e != g]
    backend = f"{classifier.backend}, {classifier.model.id}"
    if wrong:
        return (
            FAIL,
            f"{len(wrong)} of {len(got)} sample cells got another label ({'; '.join(wrong)}) "
            f"on {backend}",
            "the runtime or the model file misbehaves: reinstall the runtime, or roll back "
            "the bundle (edgecells-update-bundle --rollback)",
        )
    return OK, f"{len(got)} of {len(got)} sample cells got their expected label ({backend})", ""


def check_signature(report: Report, bundle: Any, cfg: Any) -> bool:
    """The signature policy (config ``[bundle] trusted_keys``, ``$EDGECELLS_TRUSTED_KEYS``);
    False when the bundle is refused."""
    from edgecells.edge.bundle.signing import check_bundle as check_sig

    try:
        res = check_sig(bundle, cfg.bundle.trusted_keys)
    except EdgecellsError as exc:
        report.add(
            "signature",
            FAIL,
            str(exc),
            "install a bundle signed by a key this device trusts (edgecells bundle sign), "
            "or go back: edgecells-update-bundle --rollback",
        )
        return False
    if res.status == "verified":
        report.add("signature", OK, f"{res.message} ({res.key_file})")
    else:
        report.add(
            "signature",
            WARN,
            res.message,
            "install trusted public keys in /etc/edgecells/trusted-keys to refuse unsigned bundles",
        )
    return True


def check_bundle(
    report: Report,
    bundle_path: str | None,
    cfg: Any,
    sample: str | os.PathLike[str] | None = None,
) -> None:
    """Verify the bundle, run the self-test and the frame pipeline on a sample frame."""
    from edgecells.edge.backends import open_classifier
    from edgecells.edge.bundle import load_bundle

    where = bundle_path or "the reference bundle"
    try:
        b = load_bundle(bundle_path or None)
    except EdgecellsError as exc:
        report.add(
            "bundle",
            FAIL,
            str(exc),
            "install a good bundle: edgecells-update-bundle BUNDLE, or go back to the "
            "previous one: edgecells-update-bundle --rollback",
        )
        return
    report.add(
        "bundle",
        OK,
        f"{b.name}: {len(b.models)} models, {len(b.classes)} classes, hashes verified ({b.root})",
    )
    if not check_signature(report, b, cfg):
        return
    precision = "int8" if b.formats("int8") else "float32"
    try:
        clf = open_classifier(b, cfg.inference.backend, cfg.inference.threads, precision=precision)
    except EdgecellsError as exc:
        report.add(
            "selftest",
            FAIL,
            f"cannot open a model of {where}: {exc}",
            "install a runtime for one of the bundle's formats",
        )
        return
    try:
        try:
            report.add("selftest", *run_selftest(b, clf))
        except Exception as exc:
            report.add(
                "selftest",
                FAIL,
                f"inference failed ({type(exc).__name__}: {exc})",
                "reinstall the runtime, or roll back the bundle",
            )
        _check_pipeline(report, cfg, b, clf, sample)
    finally:
        clf.close()


def _check_pipeline(report: Report, cfg: Any, bundle: Any, clf: Any, sample: Any) -> None:
    from edgecells.edge.imageio import read_image
    from edgecells.edge.pipeline import Pipeline
    from edgecells.edge.resources import sample_frames
    from edgecells.edge.sources.base import Frame

    path = Path(sample) if sample else sample_frames()[0]
    try:
        img = read_image(path)
        pipe = Pipeline(cfg, bundle, clf)
        t0 = time.perf_counter()
        res, _ = pipe.process(Frame(0, time.time(), img, str(path)))
        ms = (time.perf_counter() - t0) * 1000
    except Exception as exc:
        report.add(
            "pipeline",
            FAIL,
            f"{path.name}: {type(exc).__name__}: {exc}",
            "run edgecells screen on the sample frames to see the whole error",
        )
        return
    if res.status != "ok":
        report.add(
            "pipeline",
            WARN,
            f"{path.name}: frame skipped ({res.reason})",
            "check [quality] and [camera] pixel_size_um in config.toml",
        )
    elif not res.cells:
        report.add(
            "pipeline",
            WARN,
            f"{path.name}: no cells found ({ms:.0f} ms)",
            "check [camera] pixel_size_um and [detect] in config.toml",
        )
    else:
        report.add(
            "pipeline",
            OK,
            f"{path.name}: {len(res.cells)} cells found and classified in {ms:.0f} ms",
        )


# --------------------------------------------------------------------------- camera


_CAMERA_FIX = {
    "picam": "power off, reseat the ribbon cable (contacts the right way), check "
    "camera_auto_detect=1 in /boot/firmware/config.txt, reboot; rpicam-hello --list-cameras",
    "cv": "check the USB camera is plugged in (ls /dev/video*) and the user is in the video group",
    "gst": "try the pipeline alone: gst-launch-1.0 <pipeline with fakesink>; on a Jetson: "
    "sudo systemctl restart nvargus-daemon",
    "video": "check the video file path and that OpenCV can read its codec",
    "files": "check the image file or folder path in [session] source",
}


def check_camera(report: Report, uri: str, cfg: Any, timeout_s: float) -> None:
    """Open the source and wait (at most ``timeout_s``) for one frame."""
    from edgecells.edge.sources import open_source
    from edgecells.edge.sources.uri import parse_uri

    name = uri or "samples"
    try:
        kind = parse_uri(uri)[0]
    except EdgecellsError as exc:
        report.add("camera", FAIL, str(exc), "fix [session] source in config.toml")
        return
    fix = _CAMERA_FIX.get(kind, "")
    result: dict[str, Any] = {}

    def grab() -> None:
        src = None
        try:
            src = open_source(uri, cfg.camera)
            t0 = time.perf_counter()
            src.open()
            frame = src.read()
            result["ms"] = (time.perf_counter() - t0) * 1000
            result["frame"] = frame
        except Exception as exc:
            result["error"] = (
                f"{type(exc).__name__}: {exc}" if not isinstance(exc, EdgecellsError) else str(exc)
            )
        finally:
            if src is not None:
                try:
                    src.close()
                except Exception:
                    pass

    t = threading.Thread(target=grab, daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        report.add("camera", FAIL, f"{name}: no frame within {timeout_s:.0f} s", fix)
    elif "error" in result:
        report.add("camera", FAIL, f"{name}: {result['error']}", fix)
    else:
        frame = result.get("frame")
        if frame is None or frame.image is None:
            why = (frame.error if frame is not None else None) or "the source gave no frame"
            report.add("camera", FAIL, f"{name}: {why}", fix)
        else:
            h, w = frame.image.shape[:2]
            report.add("camera", OK, f"{name}: {w}x{h} frame in {result['ms']:.0f} ms")


# --------------------------------------------------------------------------- disk, system


def check_scale(report: Report, uri: str, cfg: Any) -> None:
    """Estimate the pixel size from the source's red cells and compare it with the
    configured one (WARN beyond :data:`SCALE_TOLERANCE`)."""
    from edgecells.edge.config import AUTO
    from edgecells.edge.scale import estimate_from_source

    try:
        est = estimate_from_source(uri, cfg.camera, int(cfg.camera.scale_frames))
    except EdgecellsError as exc:
        report.add("scale", WARN, str(exc), "measure the pixel size with a stage micrometer")
        return
    found = (
        f"red cells: {est.pixel_size_um:.4f} um/px ({est.low_um:.4f}-{est.high_um:.4f}, "
        f"{est.cells} cells in {est.frames} frames)"
    )
    configured = cfg.camera.pixel_size_um
    if configured == AUTO:
        report.add("scale", OK, f'{found}; configured "auto"')
        return
    diff = est.pixel_size_um / float(configured) - 1
    found += f"; configured {float(configured):.4f} ({diff:+.0%})"
    if abs(diff) > SCALE_TOLERANCE:
        report.add(
            "scale",
            WARN,
            found,
            "check [camera] pixel_size_um with a stage micrometer (the estimate assumes "
            "normal 7.5 um red cells; anaemias change their size)",
        )
    else:
        report.add("scale", OK, found)


def check_disk(report: Report, out: str, limits: Limits) -> None:
    p = Path(out or ".").absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    usage = shutil.disk_usage(p)
    free_mb = usage.free / 2**20
    detail = f"{free_mb:.0f} MiB free of {usage.total / 2**20:.0f} MiB at {p}"
    fix = "delete old results or lower RETENTION_MAX_MB in /etc/edgecells/deploy.env"
    if free_mb < limits.disk_fail_mb:
        report.add("disk", FAIL, detail, fix)
    elif free_mb < limits.disk_warn_mb:
        report.add("disk", WARN, detail, fix)
    else:
        report.add("disk", OK, detail)


# vcgencmd get_throttled bits (Raspberry Pi documentation).
THROTTLE_BITS = {
    0: "under-voltage now",
    1: "ARM frequency capped now",
    2: "throttled now",
    3: "soft temperature limit now",
    16: "under-voltage has occurred",
    17: "frequency capping has occurred",
    18: "throttling has occurred",
    19: "soft temperature limit has occurred",
}


def parse_throttled(text: str) -> int | None:
    m = re.search(r"throttled=(0x[0-9a-fA-F]+|\d+)", text)
    return int(m.group(1), 0) if m else None


def is_raspberry_pi(model_file: str | os.PathLike[str] = "/proc/device-tree/model") -> bool:
    try:
        return "Raspberry Pi" in Path(model_file).read_bytes().decode("ascii", "replace")
    except OSError:
        return False


def check_system(
    report: Report,
    limits: Limits,
    model_file: str | os.PathLike[str] = "/proc/device-tree/model",
    thermal_file: str | os.PathLike[str] = "/sys/class/thermal/thermal_zone0/temp",
    vcgencmd: Callable[[], str] | None = None,
) -> None:
    """Raspberry Pi: CPU temperature and throttling (nothing to check elsewhere)."""
    if not is_raspberry_pi(model_file):
        report.add("system", OK, f"Python {sys.version.split()[0]}; not a Raspberry Pi")
        return
    try:
        temp = int(Path(thermal_file).read_text().strip()) / 1000
        fix = "give the Pi a heatsink and fan (Pi 5: the Active Cooler); keep it out of the sun"
        if temp >= limits.temp_fail_c:
            report.add("temperature", FAIL, f"CPU {temp:.1f} C", fix)
        elif temp >= limits.temp_warn_c:
            report.add("temperature", WARN, f"CPU {temp:.1f} C", fix)
        else:
            report.add("temperature", OK, f"CPU {temp:.1f} C")
    except (OSError, ValueError):
        report.add("temperature", WARN, f"cannot read {thermal_file}")
    if vcgencmd is None:

        def vcgencmd() -> str:
            return subprocess.run(
                ["vcgencmd", "get_throttled"], capture_output=True, text=True, timeout=5
            ).stdout

    try:
        value = parse_throttled(vcgencmd())
    except (OSError, subprocess.SubprocessError):
        value = None
    if value is None:
        report.add(
            "throttling",
            WARN,
            "vcgencmd get_throttled gave no answer",
            "sudo apt-get install libraspberrypi-bin",
        )
        return
    flags = [text for bit, text in THROTTLE_BITS.items() if value & (1 << bit)]
    power = "use the official power supply (Pi 5: 5 V 5 A; Pi 4: 5 V 3 A) and a short cable"
    if value & 0b0101:  # under-voltage or throttled now
        report.add("throttling", FAIL, f"{value:#x}: {', '.join(flags)}", power)
    elif value:
        report.add(
            "throttling", WARN, f"{value:#x}: {', '.join(flags)}", power + "; improve cooling"
        )
    else:
        report.add("throttling", OK, "0x0: no under-voltage or throttling since boot")


# --------------------------------------------------------------------------- all


def run_doctor(
    config: str | os.PathLike[str] | None = None,
    bundle: str | None = None,
    source: str | None = None,
    backend: str | None = None,
    only: Sequence[str] | None = None,
    limits: Limits | None = None,
) -> Report:
    """Run the checks (``only``: a subset of :data:`GROUPS`) and return the report."""
    from edgecells.edge.config import load_config

    lim = limits or Limits()
    groups = list(only) if only else list(GROUPS)
    bad = [g for g in groups if g not in GROUPS]
    if bad:
        raise EdgecellsError(f"--only {','.join(bad)}: unknown check (choose from {GROUPS})")
    report = Report()
    try:
        cfg = load_config(config)
        if config is not None and "config" in groups:
            report.add("config", OK, f"{config}: valid")
    except EdgecellsError as exc:
        report.add("config", FAIL, str(exc), "fix the file (edge/config.py lists every key)")
        from edgecells.edge.config import Config

        cfg = Config()
    if backend is not None:
        cfg.inference.backend = backend
    if "backends" in groups:
        check_backends(report, cfg.inference.backend)
    if "bundle" in groups:
        check_bundle(report, bundle if bundle is not None else cfg.session.bundle or None, cfg)
    if "camera" in groups:
        check_camera(
            report, source if source is not None else cfg.session.source, cfg, lim.camera_timeout_s
        )
    if "scale" in groups:
        check_scale(report, source if source is not None else cfg.session.source, cfg)
    if "disk" in groups:
        check_disk(report, cfg.session.out, lim)
    if "system" in groups:
        check_system(report, lim)
    return report


def report_json(report: Report) -> str:
    from edgecells.edge.jsonsafe import dumps

    return dumps(report.to_dict(), indent=2)
