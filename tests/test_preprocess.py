"""Physical scale and training-device parity of the one cell preprocessing."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import FIXTURES, ROOT
from runtime_bundle import make_bundle

from edgecells.edge.errors import EdgecellsError
from edgecells.edge.imageio import read_image
from edgecells.edge.preprocess import (
    cut_square,
    field_side_px,
    prepare_cell,
    prepare_crop,
    square_resize,
)
from edgecells.edge.stain import ReinhardNormalizer, StainTarget

PBC_PX = 0.103
SIZE, MODEL_PX = 32, 0.625  # 20 µm field
PBC_FILE = FIXTURES / "pbc" / "neutrophil" / "SNE_165041.jpg"


@pytest.fixture(scope="module")
def target() -> StainTarget:
    return StainTarget.load(ROOT / "models" / "reference" / "target.json")


def test_field_side_follows_pixel_sizes() -> None:
    assert field_side_px(20.0, 0.103) == 194
    assert field_side_px(20.0, 0.0721) == 277
    with pytest.raises(EdgecellsError, match="must be > 0"):
        field_side_px(20.0, 0.0)


def test_cut_square_inside_and_reflected() -> None:
    img = np.arange(10 * 12 * 3, dtype=np.uint8).reshape(10, 12, 3)
    np.testing.assert_array_equal(cut_square(img, 6, 5, 4), img[3:7, 4:8])
    big = cut_square(img, 6, 5, 30)  # larger than the image: reflected (more than once)
    assert big.shape == (30, 30, 3)
    with pytest.raises(EdgecellsError, match="outside the image"):
        cut_square(img, 100, 100, 4)


def test_physical_field_is_scale_invariant(target: StainTarget) -> None:
    """The same cell at 1x and resampled 1.4x (pixel size / 1.4) gives nearly the same
    model input; the legacy centre square does not."""
    norm = ReinhardNormalizer(target)
    img = read_image(PBC_FILE)
    big = cv2.resize(img, (280, 280), interpolation=cv2.INTER_LINEAR)
    a = prepare_crop(img, norm, SIZE, PBC_PX, MODEL_PX).astype(int)
    b = prepare_crop(big, norm, SIZE, PBC_PX / 1.4, MODEL_PX).astype(int)
    assert np.abs(a - b).mean() < 4.0
    legacy = prepare_crop(big, norm, SIZE).astype(int)
    same_legacy = prepare_crop(img, norm, SIZE).astype(int)
    assert np.abs(legacy - same_legacy).mean() < 4.0  # whole image both times...
    c = prepare_crop(img, norm, SIZE, PBC_PX, MODEL_PX * 0.7).astype(int)  # 14 µm field
    assert np.abs(a - c).mean() > 2 * np.abs(a - b).mean()  # ...but a field error shows


def test_normalization_runs_after_resampling(target: StainTarget) -> None:
    norm = ReinhardNormalizer(target)
    img = read_image(PBC_FILE)
    small = square_resize(cut_square(img, 100, 100, field_side_px(20.0, PBC_PX)), SIZE)
    np.testing.assert_array_equal(
        prepare_cell(img, 100, 100, PBC_PX, SIZE, MODEL_PX, norm), norm.transform(small)
    )


def test_device_pipeline_input_equals_training_input(tmp_path: Path, target: StainTarget) -> None:
    """A PBC image fed to the device pipeline as a frame (the detector finds the cell at its
    centre) gives the classifier exactly the array training and evaluation use."""
    from edgecells.calibration.cellsets import CellRecord, prepare_records
    from edgecells.calibration.datasets import load_dataset, load_split
    from edgecells.edge.backends import open_classifier
    from edgecells.edge.bundle import load_bundle
    from edgecells.edge.config import Config
    from edgecells.edge.detect import Cell, Detections
    from edgecells.edge.mappings import load_mapping
    from edgecells.edge.pipeline import Pipeline
    from edgecells.edge.quality import FrameQuality
    from edgecells.edge.sources.base import Frame
    from edgecells.training.augment import ColourAugment, augment_cell

    b = load_bundle(make_bundle(tmp_path / "b", SIZE, target.to_dict(), MODEL_PX))
    assert b.pixel_size_um == MODEL_PX and b.field_um == pytest.approx(20.0)
    cfg = Config()
    cfg.camera.pixel_size_um = PBC_PX
    pipe = Pipeline(cfg, b, open_classifier(b, "onnxruntime", 1, precision="float32"))
    img = read_image(PBC_FILE)
    h, w = img.shape[:2]
    cell = Cell(kind="nucleated", cx=w / 2, cy=h / 2, x=60, y=60, w=80, h=80, area_um2=80.0)
    pipe.detector.detect = lambda frame: Detections(cells=[cell], red_cells=20)
    pipe.gate.check_pixels = lambda frame: FrameQuality()
    res, batch = pipe.process(Frame(0, 0.0, img, PBC_FILE.name))
    assert res.status == "ok" and batch is not None and batch.shape == (1, SIZE, SIZE, 3)

    # evaluation / calibration arrays (load_split at the model's field)
    ds = load_dataset(FIXTURES / "pbc", mapping=load_mapping("pbc8"))
    loaded = load_split(ds, "all", SIZE, target, tmp_path / "c", model_pixel_um=MODEL_PX)
    i = loaded.paths.index(str(PBC_FILE))
    np.testing.assert_array_equal(batch[0], loaded.x[i])
    # other microscopes' cells (cellsets) and training's un-jittered augmentation path
    rec = CellRecord(PBC_FILE, "neutrophil", "all", "pbc", PBC_PX)
    x, _ = prepare_records([rec], ds.classes, SIZE, MODEL_PX, target, tmp_path / "c")
    np.testing.assert_array_equal(batch[0], x[0])
    still = ColourAugment(enabled=False, scale=0.0, shift=0.0)
    pre = augment_cell(img, rec, SIZE, MODEL_PX, still, np.random.default_rng(0))
    np.testing.assert_array_equal(batch[0], ReinhardNormalizer(target).transform(pre))


def test_manifest_records_pixel_size_and_checks_it(tmp_path: Path) -> None:
    from edgecells.edge.bundle import load_bundle

    b = load_bundle(make_bundle(tmp_path / "ok", 32, None, 0.625))
    assert b.preprocessing["pixel_size_um"] == 0.625 and b.crop["side_um"] == 20.0
    legacy = load_bundle(make_bundle(tmp_path / "legacy", 32))
    assert legacy.pixel_size_um == pytest.approx(24.0 / 32)
    root = make_bundle(tmp_path / "bad", 32, None, 0.625)
    m = json.loads((root / "manifest.json").read_text())
    m["crop"]["side_um"] = 24.0
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EdgecellsError, match="side_um"):
        load_bundle(root)


def test_voc_red_cells_give_bccd_pixel_size() -> None:
    from edgecells.calibration.pixel_sizes import PIXEL_SIZE_UM, RED_CELL_UM, voc_red_cell_side

    side, n = voc_red_cell_side(FIXTURES / "bccd" / "Annotations")
    assert n > 20
    assert RED_CELL_UM / side == pytest.approx(PIXEL_SIZE_UM["bccd"], rel=0.1)


def test_red_cell_circle_fit_on_pbc_fixtures() -> None:
    from edgecells.calibration.pixel_sizes import PIXEL_SIZE_UM, RED_CELL_UM, red_cell_diameters

    d = [
        x
        for f in sorted((FIXTURES / "pbc").glob("*/*.jpg"))
        for x in red_cell_diameters(read_image(f))
    ]
    assert len(d) >= 10
    assert RED_CELL_UM / np.median(d) == pytest.approx(PIXEL_SIZE_UM["pbc"], rel=0.1)
