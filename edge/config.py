"""Device configuration: ``config.toml`` (read with :mod:`tomllib`, ``tomli`` on Python 3.10).

Every key is optional; a missing key takes the default below. Unknown sections or keys are
refused (a typo must not silently fall back to a default). Command-line options override
the file. On a device the file usually lives at ``/etc/edgecells/config.toml``; pass it with
``edgecells screen --config FILE``.

Keys (section, key = default: meaning)::

    [session]
    source = ""              # frame source URI: "picam:0", "cv:0", "gst:PIPELINE", a video
                             # file, an image file, a folder or a glob; "" = the sample frames
                             # shipped in edge/data/samples
    bundle = ""              # model bundle folder; "" = the shipped reference bundle
    out = "edgecells-out"    # output folder (cells.csv, summary.json, report.html, frames/)
    frames = 0               # stop after this many frames; 0 = until the source ends
    annotate = false         # write an annotated PNG per frame (boxes coloured by class)
    gallery_max = 24         # most cells shown per class (and unidentified) in report.html;
                             # each is a cut of the frame, linked to the annotated frame

    [camera]
    pixel_size_um = 0.073    # size of one camera pixel on the slide, micrometres/pixel, from
                             # a stage micrometer (best); "auto" = estimated at the start of
                             # each session from the red cells of the first scale_frames
                             # frames (edge/scale.py; assumes normal 7.5 um red cells). The
                             # BCCD sample frames: 0.074 (red cells, calibration/pixel_sizes.py)
    scale_frames = 10        # frames read for the "auto" estimate and the doctor's check
    rbc_diameter_um = 7.5    # red-cell diameter assumed by the estimate (normal blood 7.5-8)
    width = 640              # requested capture size (cameras only; files keep their size)
    height = 480
    exposure_us = 0          # fixed exposure in microseconds; 0 = meter once at start, then lock
    analogue_gain = 0.0      # fixed gain; 0 = meter once at start, then lock
    awb_gains = []           # fixed white balance [red, blue]; [] = meter once, then lock
    warmup_frames = 10       # frames discarded while auto exposure/white balance settle
    reopen_attempts = 5      # a camera that disappears is reopened this many times ...
    reopen_backoff_s = 0.5   # ... waiting this long, doubling each time (capped at 8 s)

    [inference]
    backend = "auto"         # "auto", "litert", "openvino", "onnxruntime" or "tensorrt"
    threads = 1              # inference threads
    batch = 64               # most crops per inference call (all crops of a frame when fewer)

    [detect]
    nucleus_min_um2 = 20.0   # smallest stained area accepted as a nucleated cell, um^2
    platelet_min_um2 = 0.3   # platelet stained-area range, um^2
    platelet_max_um2 = 12.0
    stain_od = 0.0           # nuclear-stain threshold, optical density of (green - blue)
                             # relative to the glass; 0 = per frame: stain_level_factor x the
                             # red cells' level (stain_level_pct percentile over pixels darker
                             # than cell_od below the glass) + stain_level_offset, at least
                             # stain_od_min (fitted on BCCD trainval + DeepBioNet train/val)
    stain_od_min = 0.3
    stain_level_pct = 50.0
    stain_level_factor = 2.0
    stain_level_offset = 0.15
    cell_od = 0.15
    stain_level_min_cover = 0.1   # cells covering less of the frame: no red-cell level (0)
    platelet_od_min = 0.2    # platelets: their own (lower) threshold, same rule with these
    platelet_level_factor = 1.5
    platelet_level_offset = 0.1
    platelet_open_um = 0.9   # opening (disc) removing thin red-cell rims from platelet candidates
    platelet_min_fill = 0.4  # stained share of the candidate's box
    platelet_min_glass = 0.2 # share of glass in a platelet_context_um square around it
    platelet_context_um = 5.0
    platelet_clear_um = 1.0  # no platelet this close to a nucleated cell's box (granules)
    edge_margin_um = 0.0     # drop cells whose centre lies closer than this to the border
    work_pixel_um = 0.15     # detection runs on the frame shrunk to about this um/pixel
    join_um = 0.3            # dilation radius joining the stained parts of one nucleus
    open_um = 0.3            # opening (noise removal) square side; none below 2 work pixels
    lobe_merge_um = 10.0     # nuclear parts with centroids closer than this = one cell
    split_um = 0.0           # touching white cells: split a component whose opening by this
                             # radius leaves cores >= split_min_um2 at least split_dist_um
                             # apart; 0 = off (it splits BCCD 00313 but also bilobed and
                             # segmented nuclei: benchmarks/RESULTS.md)
    split_min_um2 = 25.0
    split_dist_um = 9.0
    absorb_um = 1.0          # small stained bits this close to a nucleus belong to it
    rbc_min_radius_um = 2.0  # red-cell count: distance-transform peaks this deep and apart
    rbc_min_contrast = 12    # red cells must be this much darker (green, 0..255) than glass

    [quality]
    focus_min = 3.5          # variance of the 3x3 Laplacian (grey 0..255, full frame) below
                             # this = blurred (BCCD frames: 5.4-8; blurred by 1.5 px: 2.7)
    clipped_max = 0.05       # fraction of pixels at 0 or 255 (any channel) above this = bad
                             # exposure
    stain_max_distance = 2.0 # frame stain statistics farther than this from the bundle's
                             # target (in target standard deviations, mean over the Lab
                             # channels) = off-target stain (BCCD frames vs a PBC target:
                             # 0.47-0.83)
    empty_min_cells = 1      # fewer cells (nucleated + platelets + red) than this = empty
    domain_check = true      # slide level: the flag is REVIEW when the slide's stain,
                             # scale or cell focus lies outside the bundle's
                             # thresholds.domain ranges; false only for a bundle adapted
                             # to this microscope whose ranges are stale

    [screening]              # the flag rule (edge/screening.py); a key left out takes the
                             # value in the bundle's thresholds.screening /
                             # thresholds.min_confidence (no key is set by default)
    min_cells = 100          # INSUFFICIENT below this many classified nucleated cells
                             # (bundle default 100, as a manual differential)
    threshold = 0.05         # abnormal-fraction threshold for POSITIVE
    confidence = 0.95        # one-sided confidence that the fraction exceeds the threshold
    min_confidence = 0.5     # calibrated top-probability cut-off below which a cell is
                             # "unidentified"
    false_positive_rate = 0.02  # classifier's per-cell normal->abnormal rate
    ood_threshold = 0.34     # out-of-distribution score (1 - calibrated top probability)
                             # above which a cell is "unidentified" (bundle:
                             # thresholds.ood.threshold, fitted on validation data)

    [bundle]
    trusted_keys = "/etc/edgecells/trusted-keys"   # folder (or file) of Ed25519 public
                             # keys (PEM *.pub / *.pem). With at least one key installed,
                             # unsigned or wrongly signed bundles are refused; without,
                             # they load with a warning. $EDGECELLS_TRUSTED_KEYS adds more
                             # (os.pathsep-separated); "" = only the environment variable

Every number must be finite (nan and inf are refused) and within the range its key allows
(see ``_validate``).
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from edgecells.edge.errors import EdgecellsError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

BACKENDS = ("auto", "litert", "openvino", "onnxruntime", "tensorrt")
AUTO = "auto"  # [camera] pixel_size_um: estimated from red cells (edge/scale.py)


@dataclass
class SessionConfig:
    source: str = ""
    bundle: str = ""
    out: str = "edgecells-out"
    frames: int = 0
    annotate: bool = False
    gallery_max: int = 24


@dataclass
class CameraConfig:
    pixel_size_um: float | str = 0.073
    scale_frames: int = 10
    rbc_diameter_um: float = 7.5
    width: int = 640
    height: int = 480
    exposure_us: int = 0
    analogue_gain: float = 0.0
    awb_gains: list[float] = field(default_factory=list)
    warmup_frames: int = 10
    reopen_attempts: int = 5
    reopen_backoff_s: float = 0.5


@dataclass
class InferenceConfig:
    backend: str = "auto"
    threads: int = 1
    batch: int = 64


@dataclass
class DetectConfig:
    nucleus_min_um2: float = 20.0
    platelet_min_um2: float = 0.3
    platelet_max_um2: float = 12.0
    stain_od: float = 0.0
    stain_od_min: float = 0.3
    stain_level_pct: float = 50.0
    stain_level_factor: float = 2.0
    stain_level_offset: float = 0.15
    cell_od: float = 0.15
    stain_level_min_cover: float = 0.1
    platelet_od_min: float = 0.2
    platelet_level_factor: float = 1.5
    platelet_level_offset: float = 0.1
    platelet_min_fill: float = 0.4
    platelet_min_glass: float = 0.2
    platelet_context_um: float = 5.0
    platelet_clear_um: float = 1.0
    platelet_open_um: float = 0.9
    edge_margin_um: float = 0.0
    work_pixel_um: float = 0.15
    join_um: float = 0.3
    open_um: float = 0.3
    lobe_merge_um: float = 10.0
    split_um: float = 0.0
    split_min_um2: float = 25.0
    split_dist_um: float = 9.0
    absorb_um: float = 1.0
    rbc_min_radius_um: float = 2.0
    rbc_min_contrast: int = 12


@dataclass
class QualityConfig:
    focus_min: float = 3.5
    clipped_max: float = 0.05
    stain_max_distance: float = 2.0
    empty_min_cells: int = 1
    domain_check: bool = True


@dataclass
class ScreeningConfig:
    """Overrides of the bundle's flag rule; None = the bundle's value."""

    min_cells: int | None = None
    threshold: float | None = None
    confidence: float | None = None
    min_confidence: float | None = None
    false_positive_rate: float | None = None
    ood_threshold: float | None = None


# type of the keys whose default is None ("the bundle's value")
OPTIONAL_TYPES: dict[str, Any] = {
    "min_cells": 0,
    "threshold": 0.0,
    "confidence": 0.0,
    "min_confidence": 0.0,
    "false_positive_rate": 0.0,
    "ood_threshold": 0.0,
}


@dataclass
class BundleConfig:
    trusted_keys: str = "/etc/edgecells/trusted-keys"


@dataclass
class Config:
    session: SessionConfig = field(default_factory=SessionConfig)
    camera: CameraConfig = field(default_factory=CameraConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    screening: ScreeningConfig = field(default_factory=ScreeningConfig)
    bundle: BundleConfig = field(default_factory=BundleConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _coerce(where: str, value: Any, default: Any) -> Any:
    """Check ``value`` against the type of ``default`` (ints are accepted for floats)."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise EdgecellsError(f"{where}: expected true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise EdgecellsError(f"{where}: expected an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EdgecellsError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise EdgecellsError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise EdgecellsError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(default, list):
        if not isinstance(value, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in value
        ):
            raise EdgecellsError(f"{where}: expected a list of finite numbers, got {value!r}")
        return [float(v) for v in value]
    raise EdgecellsError(f"{where}: unsupported value {value!r}")  # pragma: no cover


def _opt(value: Any, ok: Any) -> bool:
    """An optional key is valid when absent (None) or when ``ok(value)``."""
    return value is None or bool(ok(value))


def _validate(cfg: Config, name: str) -> None:
    c = cfg
    d = c.detect
    # Values outside these ranges are typing mistakes (a pixel of 1e9 um, a negative
    # distance), not settings: refused, so that no gate silently switches off.
    checks = [
        (
            c.camera.pixel_size_um == AUTO
            or (
                not isinstance(c.camera.pixel_size_um, str)
                and 0.005 <= c.camera.pixel_size_um <= 20
            ),
            'camera.pixel_size_um must be in [0.005, 20] micrometres per pixel, or "auto"',
        ),
        (1 <= c.camera.scale_frames <= 1000, "camera.scale_frames must be in 1..1000"),
        (1 <= c.camera.rbc_diameter_um <= 20, "camera.rbc_diameter_um must be in [1, 20]"),
        (
            0 < c.camera.width <= 16384 and 0 < c.camera.height <= 16384,
            "camera.width/height must be in 1..16384",
        ),
        (len(c.camera.awb_gains) in (0, 2), "camera.awb_gains must be [] or [red, blue]"),
        (all(0 < g <= 32 for g in c.camera.awb_gains), "camera.awb_gains must be in (0, 32]"),
        (c.camera.exposure_us >= 0, "camera.exposure_us must be >= 0"),
        (0 <= c.camera.analogue_gain <= 64, "camera.analogue_gain must be in [0, 64]"),
        (c.camera.warmup_frames >= 0, "camera.warmup_frames must be >= 0"),
        (c.camera.reopen_attempts >= 0, "camera.reopen_attempts must be >= 0"),
        (0 <= c.camera.reopen_backoff_s <= 60, "camera.reopen_backoff_s must be in [0, 60]"),
        (c.inference.backend in BACKENDS, f"inference.backend must be one of {BACKENDS}"),
        (1 <= c.inference.threads <= 256, "inference.threads must be in 1..256"),
        (1 <= c.inference.batch <= 4096, "inference.batch must be in 1..4096"),
        (c.session.frames >= 0, "session.frames must be >= 0"),
        (c.session.gallery_max >= 0, "session.gallery_max must be >= 0"),
        (0 <= d.stain_od <= 2.5, "detect.stain_od must be in [0, 2.5]"),
        (0 < d.stain_od_min <= 2.5, "detect.stain_od_min must be in (0, 2.5]"),
        (0 <= d.stain_level_pct <= 100, "detect.stain_level_pct must be in [0, 100]"),
        (0 <= d.stain_level_factor <= 100, "detect.stain_level_factor must be in [0, 100]"),
        (-2.5 <= d.stain_level_offset <= 2.5, "detect.stain_level_offset must be in [-2.5, 2.5]"),
        (0 < d.cell_od <= 2.5, "detect.cell_od must be in (0, 2.5]"),
        (0 <= d.stain_level_min_cover <= 1, "detect.stain_level_min_cover must be in [0, 1]"),
        (0 < d.platelet_od_min <= 2.5, "detect.platelet_od_min must be in (0, 2.5]"),
        (0 <= d.platelet_level_factor <= 100, "detect.platelet_level_factor must be in [0, 100]"),
        (
            -2.5 <= d.platelet_level_offset <= 2.5,
            "detect.platelet_level_offset must be in [-2.5, 2.5]",
        ),
        (0 <= d.platelet_open_um <= 100, "detect.platelet_open_um must be in [0, 100]"),
        (0 <= d.platelet_min_fill <= 1, "detect.platelet_min_fill must be in [0, 1]"),
        (0 <= d.platelet_min_glass <= 1, "detect.platelet_min_glass must be in [0, 1]"),
        (0 < d.platelet_context_um <= 1000, "detect.platelet_context_um must be in (0, 1000]"),
        (0 <= d.platelet_clear_um <= 1000, "detect.platelet_clear_um must be in [0, 1000]"),
        (0 <= d.open_um <= 100, "detect.open_um must be in [0, 100]"),
        (0 <= d.split_um <= 100, "detect.split_um must be in [0, 100]"),
        (0 < d.split_min_um2 <= 10000, "detect.split_min_um2 must be in (0, 10000]"),
        (0 <= d.split_dist_um <= 1000, "detect.split_dist_um must be in [0, 1000]"),
        (
            0 < d.platelet_min_um2 < d.platelet_max_um2,
            "detect.platelet_min_um2 must be > 0 and < platelet_max_um2",
        ),
        (0 < d.nucleus_min_um2 <= 10000, "detect.nucleus_min_um2 must be in (0, 10000]"),
        (d.platelet_max_um2 <= 10000, "detect.platelet_max_um2 must be <= 10000"),
        (0.01 <= d.work_pixel_um <= 20, "detect.work_pixel_um must be in [0.01, 20]"),
        (0 <= d.edge_margin_um <= 1000, "detect.edge_margin_um must be in [0, 1000]"),
        (0 <= d.join_um <= 100, "detect.join_um must be in [0, 100]"),
        (0 <= d.lobe_merge_um <= 1000, "detect.lobe_merge_um must be in [0, 1000]"),
        (0 <= d.absorb_um <= 100, "detect.absorb_um must be in [0, 100]"),
        (0 < d.rbc_min_radius_um <= 100, "detect.rbc_min_radius_um must be in (0, 100]"),
        (0 <= d.rbc_min_contrast <= 255, "detect.rbc_min_contrast must be 0..255"),
        (c.quality.focus_min >= 0, "quality.focus_min must be >= 0"),
        (0 <= c.quality.clipped_max <= 1, "quality.clipped_max must be in [0, 1]"),
        (c.quality.stain_max_distance > 0, "quality.stain_max_distance must be > 0"),
        (c.quality.empty_min_cells >= 0, "quality.empty_min_cells must be >= 0"),
        (_opt(c.screening.min_cells, lambda v: v >= 1), "screening.min_cells must be >= 1"),
        (
            _opt(c.screening.threshold, lambda v: 0 <= v < 1),
            "screening.threshold must be in [0, 1)",
        ),
        (
            _opt(c.screening.confidence, lambda v: 0.5 <= v < 1),
            "screening.confidence must be in [0.5, 1)",
        ),
        (
            _opt(c.screening.min_confidence, lambda v: 0 <= v < 1),
            "screening.min_confidence must be in [0, 1)",
        ),
        (
            _opt(c.screening.false_positive_rate, lambda v: 0 <= v < 1),
            "screening.false_positive_rate must be in [0, 1)",
        ),
        (
            _opt(c.screening.ood_threshold, lambda v: 0 <= v <= 1),
            "screening.ood_threshold must be in [0, 1]",
        ),
    ]
    for ok, msg in checks:
        if not ok:
            raise EdgecellsError(f"{name}: {msg}")


def validate(cfg: Config, name: str = "config") -> Config:
    """Check a (possibly edited in code) :class:`Config`; EdgecellsError naming the key.

    Command-line overrides are applied to a loaded Config, so commands call this again
    after setting them."""
    for section in fields(cfg):
        sub = getattr(cfg, section.name)
        for f in fields(sub):
            v = getattr(sub, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise EdgecellsError(f"{name}: {section.name}.{f.name} must be a finite number")
    _validate(cfg, name)
    return cfg


def config_from_dict(data: dict[str, Any], name: str = "config") -> Config:
    """Build a :class:`Config` from a parsed TOML mapping; unknown keys are errors."""
    cfg = Config()
    for section, values in data.items():
        if not hasattr(cfg, section):
            raise EdgecellsError(f"{name}: unknown section [{section}]")
        if not isinstance(values, dict):
            raise EdgecellsError(f"{name}: [{section}] must be a table")
        sub = getattr(cfg, section)
        known = {f.name for f in fields(sub)}
        for key, value in values.items():
            if key not in known:
                raise EdgecellsError(f"{name}: unknown key {section}.{key}")
            where = f"{name}: {section}.{key}"
            if (section, key) == ("camera", "pixel_size_um") and isinstance(value, str):
                if value != AUTO:
                    raise EdgecellsError(f'{where}: expected a number or "auto", got {value!r}')
                sub.pixel_size_um = AUTO
                continue
            default = getattr(sub, key)
            if default is None:
                default = OPTIONAL_TYPES[key]
            setattr(sub, key, _coerce(where, value, default))
    _validate(cfg, name)
    return cfg


def load_config(path: str | Path | None = None) -> Config:
    """Read ``config.toml`` (``None``: all defaults)."""
    if path is None:
        return Config()
    p = Path(path)
    if not p.is_file():
        raise EdgecellsError(f"{p}: no such config file")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgecellsError(f"{p}: cannot read ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise EdgecellsError(f"{p}: not valid TOML ({exc})") from None
    return config_from_dict(data, str(p))


def dump_config(cfg: Config) -> str:
    """The configuration as TOML text (every key, for templates and ``--show-config``)."""
    lines: list[str] = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if value is None:  # TOML has no null: left out = the bundle's value
                lines.append(f"# {key} = (the bundle's value)")
            else:
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)
