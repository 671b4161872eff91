"""Pixel size from red cells: synthetic discs, resized fixture frames, config "auto",
the scale command and the doctor's comparison."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgecells.edge.config import AUTO, config_from_dict
from edgecells.edge.errors import EdgecellsError
from edgecells.edge.imageio import list_images, read_image
from edgecells.edge.scale import estimate_pixel_size, red_cell_diameters, resolve_pixel_size

FIX = Path(__file__).parent / "fixtures" / "bccd" / "JPEGImages"


def _discs(d_px: float, seed: int = 0) -> np.ndarray:
    """A synthetic field of separate pink discs with pale centres on glass."""
    rng = np.random.default_rng(seed)
    img = np.full((480, 640, 3), (215, 215, 210), np.uint8)
    r = d_px / 2
    step = int(d_px * 1.4)
    for cy in range(step // 2 + 4, 480 - step // 2, step):
        for cx in range(step // 2 + 4, 640 - step // 2, step):
            jx, jy = rng.integers(-3, 4, 2)
            cv2.circle(img, (int(cx + jx), int(cy + jy)), int(round(r)), (190, 120, 130), -1)
            cv2.circle(img, (int(cx + jx), int(cy + jy)), int(round(r * 0.35)), (205, 170, 175), -1)
    return img


def test_synthetic_discs_give_their_diameter() -> None:
    from edgecells.edge.scale import INSCRIBED_TO_DIAMETER

    d = red_cell_diameters(_discs(60))
    assert len(d) >= 20
    assert np.median(d) == pytest.approx(60, rel=0.05)
    est = estimate_pixel_size([_discs(60, s) for s in range(3)])
    assert est.pixel_size_um == pytest.approx(7.5 / (60 * INSCRIBED_TO_DIAMETER), rel=0.05)
    assert est.low_um <= est.pixel_size_um <= est.high_um


def test_resized_frames_follow_the_pixel_size() -> None:
    frames = [read_image(f) for f in list_images(FIX)]
    base = estimate_pixel_size(frames).pixel_size_um
    assert 0.066 < base < 0.082  # BCCD: 0.072 from its VOC red-cell boxes
    for f in (0.5, 2.0):
        interp = cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR
        small = [cv2.resize(i, None, fx=f, fy=f, interpolation=interp) for i in frames]
        est = estimate_pixel_size(small).pixel_size_um * f
        assert est == pytest.approx(base, rel=0.05), f


def test_empty_frames_are_refused_with_a_reason() -> None:
    with pytest.raises(EdgecellsError, match="red cells"):
        estimate_pixel_size([np.full((480, 640, 3), 200, np.uint8)] * 2)
    with pytest.raises(EdgecellsError, match="no frames"):
        estimate_pixel_size([])


def test_config_auto_and_resolution(tmp_path: Path) -> None:
    cfg = config_from_dict({"camera": {"pixel_size_um": "auto", "scale_frames": 6}})
    assert cfg.camera.pixel_size_um == AUTO
    with pytest.raises(EdgecellsError, match="auto"):
        config_from_dict({"camera": {"pixel_size_um": "big"}})
    with pytest.raises(EdgecellsError, match="pixel_size_um"):
        config_from_dict({"camera": {"pixel_size_um": -1.0}})
    cfg.session.source = str(FIX)
    info = resolve_pixel_size(cfg)
    assert info["pixel_size_source"] == "estimated"
    assert cfg.camera.pixel_size_um == pytest.approx(info["pixel_size_um"], rel=1e-3)
    assert 0.066 < cfg.camera.pixel_size_um < 0.082
    fixed = config_from_dict({"camera": {"pixel_size_um": 0.1}})
    assert resolve_pixel_size(fixed) == {"pixel_size_um": 0.1, "pixel_size_source": "configured"}


def test_scale_command_and_doctor_warning(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edgecells.cli import app
    from edgecells.edge.doctor import run_doctor

    r = CliRunner().invoke(app, ["scale", "--source", str(FIX), "--frames", "6", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["frames"] == 6 and d["low_um"] <= d["pixel_size_um"] <= d["high_um"]
    assert abs(d["difference"]) < 0.1  # default config 0.073
    bad = tmp_path / "c.toml"
    bad.write_text("[camera]\npixel_size_um = 0.1\n")
    rep = run_doctor(bad, source=str(FIX), only=["scale"])
    (check,) = [c for c in rep.checks if c.name == "scale"]
    assert check.status == "WARN" and "stage micrometer" in check.fix
    good = tmp_path / "g.toml"
    good.write_text("[camera]\npixel_size_um = 0.074\n")
    (check,) = [c for c in run_doctor(good, source=str(FIX), only=["scale"]).checks]
    assert check.status == "OK"
    r = CliRunner().invoke(app, ["scale", "--source", str(tmp_path / "nope")])
    assert r.exit_code != 0


def test_cells_csv_rows_carry_the_cells_box_and_the_crop_square(tmp_path: Path) -> None:
    """The pipeline's rows: x, y, w, h = the detected cell's own box; crop_* = the square
    the classifier saw, centred on the cell; the report shows the cell's own box."""
    from edgecells.edge.backends import open_classifier
    from edgecells.edge.bundle import default_bundle_path, load_bundle
    from edgecells.edge.config import Config
    from edgecells.edge.pipeline import Pipeline
    from edgecells.edge.report import CELL_FIELDS, cell_box
    from edgecells.edge.sources.base import Frame

    if not (default_bundle_path() / "manifest.json").is_file():
        pytest.skip("the reference bundle is not shipped in this checkout")
    assert {"crop_x", "crop_y", "crop_side"} <= set(CELL_FIELDS)
    b = load_bundle(None)
    pipe = Pipeline(Config(), b, open_classifier(b, "onnxruntime", 1))
    img = read_image(FIX / "BloodImage_00007.jpg")
    res, _ = pipe.process(Frame(0, 0.0, img, "f"))
    (cell,) = [c for c in res.cells if c["kind"] == "nucleated"]
    assert cell["crop_side"] > max(cell["w"], cell["h"])  # the crop square is larger
    cx, cy = cell["x"] + cell["w"] / 2, cell["y"] + cell["h"] / 2
    assert abs(cell["crop_x"] + cell["crop_side"] / 2 - cx) < cell["w"] / 2
    assert abs(cell["crop_y"] + cell["crop_side"] / 2 - cy) < cell["h"] / 2
    x0, y0, x1, y1 = cell_box(cell, img.shape)
    assert x0 <= cell["x"] and x1 >= cell["x"] + cell["w"]
    assert x1 - x0 < cell["crop_side"]  # the report shows the cell, not the crop square
