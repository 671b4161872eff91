"""Training: a smoke run on the 48 fixture images, and the augmentation pipeline."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import FIXTURES

from edgecells.edge.errors import EdgecellsError
from edgecells.edge.stain import StainTarget
from edgecells.training.model import ArchConfig, build_classifier, count_flops
from edgecells.training.train import TrainConfig, make_train_dataset, train

TINY = ArchConfig(stem_channels=8, blocks=((1, 8, 1, 1), (2, 16, 1, 2)), head_channels=32)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    cfg = TrainConfig(size=32, epochs=2, batch=8, max_steps=2, arch=TINY)
    result = train(FIXTURES / "pbc", out / "model.keras", cfg, cache_dir=out / "cache")
    return out, result


def test_smoke_training_writes_model_log_metrics_target(smoke):
    import keras

    out, result = smoke
    assert result.model_path == out / "model.keras"
    for name in ("model.keras", "train_log.csv", "metrics.json", "target.json", "mapping.json"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader((out / "train_log.csv").open()))
    assert [int(float(r["epoch"])) for r in rows] == [1, 2]
    assert {"loss", "accuracy", "val_accuracy", "val_acc_pbc", "val_score"} <= set(rows[0])
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["size"] == 32 and m["config"]["stain"] is True
    assert m["data"]["sources"]["pbc"]["counts"] == {"train": 24, "val": 8, "test": 16}
    assert m["data"]["sources"]["pbc"]["pixel_size_um"] == 0.103
    assert m["preprocess"]["pixel_size_um"] == cfg_px(m) and m["preprocess"]["stats"] == "crop"
    assert m["best_epoch"] in (1, 2)
    assert 0.0 < m["operating_point"] < 1.0
    for key in ("accuracy", "balanced_accuracy", "auc_abnormal", "per_class"):
        assert key in m["test"]
    assert m["test"]["n"] == 16
    StainTarget.load(out / "target.json")  # a valid target file
    model = keras.models.load_model(out / "model.keras", compile=False)
    assert model.input_shape == (None, 32, 32, 3)
    probs = np.asarray(model(np.zeros((2, 32, 32, 3), np.float32)))
    assert probs.shape == (2, 8) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def cfg_px(m: dict) -> float:
    return m["config"]["pixel_size_um"]


def test_train_refuses_bccd_labels(tmp_path):
    from edgecells.calibration.cellsets import cell_records

    bccd = tmp_path / "bccd"
    (bccd / "BCCD").mkdir(parents=True)
    (bccd / "wbc_labels.csv").write_text("frame,label\n")
    with pytest.raises(EdgecellsError, match="evaluation only"):
        cell_records(bccd)


def test_colour_augmentation_varies_and_keeps_dtype():
    from edgecells.training.augment import ColourAugment, recolour

    x = np.full((32, 32, 3), 200, np.uint8)
    x[8:24, 8:24] = (120, 60, 160)
    cfg = ColourAugment()
    a = recolour(x, cfg, np.random.default_rng(0))
    b = recolour(x, cfg, np.random.default_rng(0))
    c = recolour(x, cfg, np.random.default_rng(1))
    assert a.dtype == np.uint8 and a.shape == x.shape
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, x)


def test_train_refuses_non_keras_output(tmp_path):
    with pytest.raises(EdgecellsError, match=r"must be a \.keras file"):
        train(FIXTURES / "pbc", tmp_path / "model.h5", TrainConfig(epochs=1, arch=TINY))


def test_augmentation_is_seeded_and_keeps_range():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    y = np.arange(16) % 8

    def first(seed: int) -> np.ndarray:
        cfg = TrainConfig(size=32, batch=8, seed=seed)
        xb, yb = next(iter(make_train_dataset(x, y, 8, cfg)))
        assert tuple(xb.shape) == (8, 32, 32, 3) and tuple(yb.shape) == (8, 8)
        return xb.numpy()

    a, b, c = first(1), first(1), first(2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.min() >= 0.0 and a.max() <= 255.0
    assert not np.array_equal(a.round(), x[:8].astype(np.float32))  # really augmented


def test_reference_architecture_meets_edge_budget():
    import keras

    model = build_classifier(8, 64)
    assert model.count_params() <= 1_000_000  # <= 1 MB of int8 weights
    assert count_flops(model) <= 100_000_000
    assert isinstance(model.layers[1], keras.layers.Rescaling)
    allowed = {
        "InputLayer", "Rescaling", "Conv2D", "DepthwiseConv2D", "BatchNormalization", "ReLU",
        "Add", "GlobalAveragePooling2D", "Dropout", "Dense",
    }  # fmt: skip
    assert {type(layer).__name__ for layer in model.layers} <= allowed


def test_cli_train_user_errors_are_one_line(tmp_path):
    from typer.testing import CliRunner

    from edgecells.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["train", "--data", str(FIXTURES / "pbc"), "--out", "m.h5"])
    assert r.exit_code == 2 and "must be a .keras file" in r.output
    r = runner.invoke(
        app, ["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "m.keras")]
    )
    assert r.exit_code == 2 and "no such data folder" in r.output
    assert "Traceback" not in r.output
    r = runner.invoke(
        app,
        ["train", "--data", str(FIXTURES / "pbc"), "--out", "m.keras", "--mapping", "nope"],
    )
    assert r.exit_code == 2 and "no such mapping file or preset" in r.output


def test_selection_score_mean_weighs_sources_pooled_weighs_cells():
    from edgecells.training.train import selection_score

    # a large source at 97% and a 67-cell one at 94% vs 96% and 97%
    a = selection_score([1658, 63], [1707, 67], "mean")
    b = selection_score([1639, 65], [1707, 67], "mean")
    assert b > a  # each source counts alike: the small set decides
    a = selection_score([1658, 63], [1707, 67], "pooled")
    b = selection_score([1639, 65], [1707, 67], "pooled")
    assert a > b and a == pytest.approx(1721 / 1774)
    with pytest.raises(EdgecellsError, match="select must be one of mean, pooled"):
        selection_score([1], [1], "median")
    with pytest.raises(EdgecellsError, match="needs val cells"):
        selection_score([0], [0], "pooled")


def test_train_refuses_an_unknown_selection_rule(tmp_path):
    cfg = TrainConfig(size=32, epochs=1, batch=8, max_steps=1, arch=TINY, select="median")
    with pytest.raises(EdgecellsError, match="select must be one of"):
        train(FIXTURES / "pbc", tmp_path / "m.keras", cfg, cache_dir=tmp_path / "cache")


def test_pooled_selection_is_recorded(tmp_path):
    cfg = TrainConfig(size=32, epochs=1, batch=8, max_steps=1, arch=TINY, select="pooled")
    train(FIXTURES / "pbc", tmp_path / "m.keras", cfg, cache_dir=tmp_path / "cache")
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["config"]["select"] == "pooled" and "pooled" in m["best_rule"]
    (row,) = list(csv.DictReader((tmp_path / "train_log.csv").open()))
    assert float(row["val_score"]) == pytest.approx(float(row["val_acc_pbc"]))


def test_augment_overrides_set_fields_and_refuse_bad_values():
    from edgecells.training.augment import ColourAugment, parse_overrides

    c = parse_overrides(["blur_p=0.6", "blur-sigma=1.5", "jpeg_min_quality=50"])
    assert (c.blur_p, c.blur_sigma, c.jpeg_min_quality) == (0.6, 1.5, 50)
    assert isinstance(c.jpeg_min_quality, int) and c.enabled
    assert c.scale == ColourAugment().scale  # untouched fields keep their defaults
    for bad, msg in [
        ("foo=1", "KEY one of"),
        ("blur_p", "KEY one of"),
        ("blur_p=x", "not a number"),
        ("blur_p=1.5", "probability"),
        ("scale=-0.1", ">= 0"),
        ("scale=nan", "finite"),
        ("jpeg_min_quality=40.5", "integer"),
    ]:
        with pytest.raises(EdgecellsError, match=msg):
            parse_overrides([bad])


def test_cli_train_refuses_bad_augment_with_one_line(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "edgecells", "train", "--data", str(tmp_path), "--out",
         str(tmp_path / "m.keras"), "--augment", "blur_p=2"],
        capture_output=True, text=True,
    )  # fmt: skip
    err = proc.stderr.strip()
    assert proc.returncode != 0 and "probability" in err and "Traceback" not in err
    assert len(err.splitlines()) == 1
