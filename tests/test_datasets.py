"""Data loader: splits.csv and class-folder layouts, corrupt images, cache, parity."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, shared_data_path

from edgecells.calibration.datasets import (
    fit_stain_target,
    load_dataset,
    load_split,
    stratified_split,
)
from edgecells.edge.errors import EdgecellsError
from edgecells.edge.imageio import read_image
from edgecells.edge.mappings import load_mapping
from edgecells.edge.preprocess import prepare_crop, square_resize
from edgecells.edge.stain import ReinhardNormalizer

PBC = FIXTURES / "pbc"


def _class_folder_copy(tmp_path: Path) -> Path:
    root = tmp_path / "cells"
    for d in sorted(p for p in PBC.iterdir() if p.is_dir()):
        shutil.copytree(d, root / d.name)
    return root


def test_splits_csv_layout():
    ds = load_dataset(PBC, mapping=load_mapping("pbc8"))
    assert ds.layout == "splits.csv"
    assert len(ds.samples) == 48 and not ds.missing
    counts = ds.counts()
    assert all(v == 3 for v in counts["train"].values())
    assert all(v == 1 for v in counts["val"].values())
    assert all(v == 2 for v in counts["test"].values())
    assert ds.classes == list(load_mapping("pbc8").classes)


def test_class_folder_layout_seeded_stratified_split(tmp_path):
    root = _class_folder_copy(tmp_path)
    a = load_dataset(root, seed=3, val_fraction=0.2, test_fraction=0.3)
    b = load_dataset(root, seed=3, val_fraction=0.2, test_fraction=0.3)
    c = load_dataset(root, seed=4, val_fraction=0.2, test_fraction=0.3)
    assert a.layout == "class-folders"
    assert [s.split for s in a.samples] == [s.split for s in b.samples]
    assert [s.split for s in a.samples] != [s.split for s in c.samples]
    # 6 images per class: round(1.8)=2 test, round(1.2)=1 val, 3 train, in every class
    for split, n in (("train", 3), ("val", 1), ("test", 2)):
        assert set(a.counts()[split].values()) == {n}


def test_stratified_split_small_classes_keep_val_and_test():
    labels = ["a"] * 3 + ["b"] * 100
    s = stratified_split(labels, seed=0, val_fraction=0.1, test_fraction=0.2)
    assert s[:3].count("val") == 1 and s[:3].count("test") == 1
    assert s[3:].count("test") == 20 and s[3:].count("val") == 10
    with pytest.raises(EdgecellsError):
        stratified_split(labels, seed=0, val_fraction=0.6, test_fraction=0.5)


def test_split_folder_layout(tmp_path):
    root = tmp_path / "d"
    for split in ("train", "val"):
        for cls in ("ig", "platelet"):
            src = sorted((PBC / cls).iterdir())[:2]
            (root / split / cls).mkdir(parents=True)
            for f in src:
                shutil.copy(f, root / split / cls / f.name)
    ds = load_dataset(root)
    assert ds.layout == "split-folders" and ds.classes == ["ig", "platelet"]
    assert len(ds.split("train")) == 4 and len(ds.split("val")) == 4 and not ds.split("test")


def test_corrupt_image_reported_and_skipped(tmp_path):
    root = _class_folder_copy(tmp_path)
    bad = root / "ig" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    ds = load_dataset(root, seed=0, val_fraction=0.0, test_fraction=0.0)
    loaded = load_split(ds, "train", 32, None, cache_dir=tmp_path / "cache")
    assert len(loaded.x) == 48 and len(loaded.paths) == 48
    assert [Path(p).name for p, _ in loaded.skipped] == ["broken.jpg"]
    assert "not a readable image" in loaded.skipped[0][1]
    target, skipped = fit_stain_target(ds, "train", cache_dir=tmp_path / "cache")
    assert [Path(p).name for p, _ in skipped] == ["broken.jpg"]
    assert target.n_images == 48


def test_missing_file_in_splits_csv_reported(tmp_path):
    root = tmp_path / "pbc"
    shutil.copytree(PBC, root)
    (root / "ig" / sorted(p.name for p in (root / "ig").iterdir())[0]).unlink()
    ds = load_dataset(root)
    assert len(ds.samples) == 47
    assert len(ds.missing) == 1 and "no such file" in ds.missing[0][1]


@pytest.mark.parametrize(
    "csv, message",
    [
        ("file,label\n", "missing column(s) path, split"),
        ("path,label,split\nig/x.jpg,ig,training\n", "unknown split 'training'"),
    ],
)
def test_bad_splits_csv(tmp_path, csv, message):
    (tmp_path / "splits.csv").write_text(csv)
    with pytest.raises(EdgecellsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_dataset(tmp_path)


def test_label_outside_mapping_and_empty_folder(tmp_path):
    root = _class_folder_copy(tmp_path)
    (root / "neutrophil").rename(root / "neutro")
    with pytest.raises(EdgecellsError, match="neutro not in mapping pbc8"):
        load_dataset(root, mapping=load_mapping("pbc8"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EdgecellsError, match="no images found"):
        load_dataset(tmp_path / "empty")
    with pytest.raises(EdgecellsError, match="no such data folder"):
        load_dataset(tmp_path / "absent")


def test_preprocessing_parity_and_cache(tmp_path):
    """Training arrays are exactly what the device's prepare_crop makes of each file."""
    ds = load_dataset(PBC, mapping=load_mapping("pbc8"))
    target, _ = fit_stain_target(ds, "train", cache_dir=tmp_path)
    loaded = load_split(ds, "test", 64, target, cache_dir=tmp_path)
    assert loaded.x.shape == (16, 64, 64, 3) and loaded.x.dtype == np.uint8
    assert not loaded.from_cache
    device_norm = ReinhardNormalizer(target)  # what the device builds from the bundle
    for x, y, p in zip(loaded.x, loaded.y, loaded.paths):
        np.testing.assert_array_equal(x, prepare_crop(read_image(p), device_norm, 64))
        assert ds.classes[y] == Path(p).parent.name
    # normalization does change the pixels (the parity above is not trivially raw)
    raw = prepare_crop(read_image(loaded.paths[0]), None, 64)
    assert not np.array_equal(raw, loaded.x[0])
    again = load_split(ds, "test", 64, target, cache_dir=tmp_path)
    assert again.from_cache
    np.testing.assert_array_equal(again.x, loaded.x)
    # another size or no target is another cache entry
    other = load_split(ds, "test", 64, None, cache_dir=tmp_path)
    assert not other.from_cache and not np.array_equal(other.x, loaded.x)


def test_square_resize_center_crops():
    img = np.zeros((10, 20, 3), np.uint8)
    img[:, 5:15] = 200  # the central square
    out = square_resize(img, 10)
    assert out.shape == (10, 10, 3) and out.min() == 200
    assert square_resize(np.zeros((8, 8, 3), np.uint8), 16).shape == (16, 16, 3)


@pytest.mark.shared_data
def test_shared_pbc_layout():
    root = shared_data_path("pbc")
    ds = load_dataset(root, mapping=load_mapping("pbc8"))
    c = ds.counts()
    assert sum(c["train"].values()) == 11952
    assert c["test"]["neutrophil"] == 665 and c["val"]["basophil"] == 121
