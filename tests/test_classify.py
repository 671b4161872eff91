"""``edgecells classify``: single-cell images through the device preprocessing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, ROOT, shared_data_path
from runtime_bundle import make_bundle
from typer.testing import CliRunner

from edgecells.cli import app
from edgecells.edge.stain import StainTarget

PBC = FIXTURES / "pbc"


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    t = StainTarget.load(ROOT / "models" / "reference" / "target.json").to_dict()
    return make_bundle(tmp_path_factory.mktemp("b") / "b", 32, t, 0.625)


def test_classify_rows_json(bundle_dir: Path) -> None:
    r = CliRunner().invoke(
        app,
        [
            "classify",
            str(PBC / "neutrophil"),
            str(PBC / "ig" / "MY_45860.jpg"),
            "--bundle",
            str(bundle_dir),
            "--pixel-size",
            "0.103",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 7
    for row in rows:
        assert {"path", "label", "confidence", "p_abnormal", "unidentified"} <= set(row)
        assert 0.0 <= row["confidence"] <= 1.0 and 0.0 <= row["p_abnormal"] <= 1.0
        assert row["unidentified"] == (row["label"] == "unidentified")
    assert rows[-1]["path"].endswith("MY_45860.jpg")


def test_classify_pixel_size_changes_the_field(bundle_dir: Path, tmp_path: Path) -> None:
    from edgecells.edge.backends import open_classifier
    from edgecells.edge.bundle import load_bundle
    from edgecells.edge.classify import classify_images

    b = load_bundle(bundle_dir)
    clf = open_classifier(b, "onnxruntime", 1, precision="float32")
    files = sorted(PBC.glob("*/*.jpg"))[:6]
    a = [r["p_abnormal"] for r in classify_images(files, b, clf, 0.103)]
    c = [r["p_abnormal"] for r in classify_images(files, b, clf, 0.2)]  # a wider cut
    assert not np.allclose(a, c)


def test_classify_errors_are_one_line(bundle_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(app, ["classify", str(tmp_path / "nope.jpg"), "--bundle", str(bundle_dir)])
    assert r.exit_code != 0 and "no such file" in r.output
    (tmp_path / "empty").mkdir()
    r = runner.invoke(app, ["classify", str(tmp_path / "empty"), "--bundle", str(bundle_dir)])
    assert r.exit_code != 0 and "no images" in r.output
    r = runner.invoke(
        app, ["classify", str(PBC), "--bundle", str(bundle_dir), "--pixel-size", "-1"]
    )
    assert r.exit_code != 0 and "pixel-size" in r.output
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    r = runner.invoke(app, ["classify", str(bad), "--bundle", str(bundle_dir), "--json"])
    assert r.exit_code == 0 and "error" in json.loads(r.stdout.splitlines()[0])


@pytest.mark.shared_data
def test_other_microscopes_cells_load_at_their_scale() -> None:
    from edgecells.calibration.cellsets import bccd_records, cell_records
    from edgecells.edge.mappings import load_mapping

    m = load_mapping("pbc8")
    dbn = cell_records(shared_data_path("deepbionet"), m)
    assert {r.split for r in dbn} == {"train", "val", "test"}
    assert all(r.cx is not None and r.pixel_size_um == 0.126 for r in dbn)
    lisc = cell_records(shared_data_path("lisc"), m)
    assert len(lisc) == 1287 and {r.label for r in lisc} == {
        "basophil",
        "eosinophil",
        "lymphocyte",
        "monocyte",
        "neutrophil",
    }
    bccd = bccd_records(shared_data_path("bccd"))
    assert sum(r.split == "test" for r in bccd) > 50
