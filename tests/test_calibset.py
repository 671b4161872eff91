"""Calibration sets: stratification, train split only, device preprocessing, no pickle."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgecells.calibration.calibset import (
    allocate,
    build_calibset,
    coverage_check,
    load_calibset,
    save_calibset,
    synthetic_calibset,
)
from edgecells.edge.errors import EdgecellsError

PBC = Path(__file__).parent / "fixtures" / "pbc"
SIZE = 32


@pytest.fixture(scope="module")
def target():
    from edgecells.calibration.datasets import fit_stain_target, load_dataset

    t, _ = fit_stain_target(load_dataset(PBC), "train")
    return t


def _splits() -> dict[str, str]:
    with open(PBC / "splits.csv", newline="") as f:
        return {r["path"]: r["split"] for r in csv.DictReader(f)}


def test_allocate_equal_share_with_water_filling() -> None:
    assert allocate({"a": 100, "b": 100, "c": 100}, 30) == {"a": 10, "b": 10, "c": 10}
    # a rare class gives all it has; the rest is shared by the others
    assert allocate({"a": 2, "b": 100, "c": 100}, 30) == {"a": 2, "b": 14, "c": 14}
    assert sum(allocate({"a": 3, "b": 4}, 100).values()) == 7
    with pytest.raises(EdgecellsError):
        allocate({"a": 1}, 0)


def test_every_class_present_and_train_split_only(target) -> None:
    cs = build_calibset(PBC, target, SIZE, total=16)
    split_of = _splits()
    counts = cs.counts()
    assert set(counts) == set(cs.classes) and len(cs.classes) == 8
    assert all(n == 2 for n in counts.values())  # 16 shared equally by 8 classes
    for s in cs.manifest["sources"]:
        assert split_of[s["path"]] == "train", s["path"]
        assert len(s["sha256"]) == 64
    assert cs.manifest["split"] == "train" and cs.manifest["seed"] == 0
    assert cs.manifest["stain_target"]["method"] == "reinhard-fixed-v1"
    assert cs.x.shape == (16, SIZE, SIZE, 3) and cs.x.dtype == np.uint8
    # more than the training split has: every training image, still all classes
    full = build_calibset(PBC, target, SIZE, per_class=50)
    n_train = sum(1 for v in split_of.values() if v == "train")
    assert full.x.shape[0] == n_train
    assert min(full.counts().values()) >= 1


def test_preprocessing_parity_with_device_and_training(target) -> None:
    """The calibration pixels are exactly what the device and training produce."""
    from edgecells.calibration.datasets import load_dataset, load_split
    from edgecells.edge.imageio import read_image
    from edgecells.edge.preprocess import prepare_crop
    from edgecells.edge.stain import ReinhardNormalizer

    cs = build_calibset(PBC, target, SIZE, per_class=1)
    norm = ReinhardNormalizer(target)
    for i, s in enumerate(cs.manifest["sources"]):
        device = prepare_crop(read_image(PBC / s["path"]), norm, SIZE)
        np.testing.assert_array_equal(cs.x[i], device)
    ds = load_dataset(PBC)
    train = load_split(ds, "train", SIZE, target, use_cache=False)
    by_path = {Path(p).resolve(): train.x[j] for j, p in enumerate(train.paths)}
    for i, s in enumerate(cs.manifest["sources"]):
        np.testing.assert_array_equal(cs.x[i], by_path[(PBC / s["path"]).resolve()])


def test_reproducible_with_seed(target) -> None:
    a = build_calibset(PBC, target, SIZE, total=8, seed=3)
    b = build_calibset(PBC, target, SIZE, total=8, seed=3)
    assert [s["path"] for s in a.manifest["sources"]] == [s["path"] for s in b.manifest["sources"]]
    np.testing.assert_array_equal(a.x, b.x)


def test_save_load_round_trip_without_pickle(tmp_path: Path, target) -> None:
    cs = build_calibset(PBC, target, SIZE, per_class=1)
    p = save_calibset(cs, tmp_path / "calib.npz")
    assert p.with_suffix(".json").is_file()
    side = json.loads(p.with_suffix(".json").read_text())
    assert side["format"] == "edgecells.calibset/1" and len(side["sources"]) == 8
    with np.load(p, allow_pickle=False) as z:  # would raise on object arrays
        assert set(z.files) == {"x", "y", "classes", "manifest"}
    back = load_calibset(p)
    np.testing.assert_array_equal(back.x, cs.x)
    assert back.classes == cs.classes and back.sha256 == cs.sha256 and len(back.sha256) == 64
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(EdgecellsError, match="bad.npz"):
        load_calibset(bad)


def test_missing_class_in_train_split_is_refused(tmp_path: Path, target) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(PBC, data)
    rows = list(csv.DictReader(open(data / "splits.csv", newline="")))
    for r in rows:
        if r["label"] == "monocyte":
            r["split"] = "test"
    with open(data / "splits.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(EdgecellsError, match="monocyte"):
        build_calibset(data, target, SIZE, total=16)


def test_coverage_check_warns_on_shifted_inputs(target) -> None:
    cs = build_calibset(PBC, target, SIZE, per_class=3)
    same = coverage_check(cs, cs.x)
    assert same.ok and same.warnings == []
    darker = (cs.x.astype(np.int16) * 6 // 10).astype(np.uint8)
    rep = coverage_check(cs, darker)
    assert not rep.ok
    assert any("channel R" in w for w in rep.warnings)


def test_synthetic_sets() -> None:
    noise = synthetic_calibset(48, 6, seed=1)
    assert noise.x.shape == (6, 48, 48, 3) and noise.x.std() > 10
    frame = np.full((120, 160, 3), 200, np.uint8)
    frame[40:80, 60:100] = (120, 60, 140)
    crops = synthetic_calibset(32, 5, images=[frame])
    assert crops.x.shape == (5, 32, 32, 3)
    assert crops.manifest["synthetic"].startswith("crops")


def test_calibrate_cli(tmp_path: Path) -> None:
    out = tmp_path / "calib.npz"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgecells",
            "calibrate",
            "--data",
            str(PBC),
            "--out",
            str(out),
            "--per-class",
            "2",
            "--size",
            str(SIZE),
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["n"] == 16 and set(res["counts"].values()) == {2}
    assert res["coverage"]["n_val"] == 8
    assert load_calibset(out).x.shape == (16, SIZE, SIZE, 3)
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgecells",
            "calibrate",
            "--data",
            str(tmp_path / "nope"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and bad.stderr.startswith("error: ") and "nope" in bad.stderr
