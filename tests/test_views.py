"""Test-time views (``preprocessing.test_time_views``): the device averages the class
probabilities of each prepared crop over the bundle's views, everywhere a classifier is
opened, and the thresholds are fitted on the same averaged output."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_data_path

from edgecells.edge.backends import ViewAveraged, open_classifier
from edgecells.edge.bundle import load_bundle
from edgecells.edge.errors import EdgecellsError

TINY = Path(__file__).parent / "fixtures" / "bundle_tiny"
REFERENCE = Path(__file__).resolve().parents[1] / "edge" / "data" / "bundles" / "reference"


def _with_views(tmp_path: Path, views: object, src: Path = TINY) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["preprocessing"]["test_time_views"] = views
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def _crops(n: int, size: int, seed: int = 0) -> np.ndarray:
    # asymmetric content so that every view differs from the crop itself
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    x[:, : size // 3, : size // 4] = 20
    return x


def test_view_averaging_is_the_mean_over_the_views(tmp_path: Path) -> None:
    b = load_bundle(_with_views(tmp_path, ["identity", "hflip", "vflip", "transpose", "rot180"]))
    assert b.test_time_views == ["identity", "hflip", "vflip", "transpose", "rot180"]
    clf = open_classifier(b)
    raw = open_classifier(b, views=["identity"])
    assert isinstance(clf, ViewAveraged) and not isinstance(raw, ViewAveraged)
    x = _crops(5, b.input_size)
    views = [x, x[:, :, ::-1], x[:, ::-1], x.transpose(0, 2, 1, 3), x[:, ::-1, ::-1]]
    want = np.mean([raw.predict(np.ascontiguousarray(v)) for v in views], axis=0)
    got = clf.predict(x)
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=0.02)  # int8 outputs
    # a single crop (S, S, 3) gives the same row as in the batch
    np.testing.assert_allclose(clf.predict(x[2]), got[2:3], atol=1e-6)
    # the raw model differs on asymmetric crops: the views are really applied
    assert np.abs(raw.predict(x) - got).max() > 1e-4
    assert clf.backend == raw.backend and clf.model.id == raw.model.id
    clf.close()
    raw.close()


def test_bundle_without_views_opens_the_raw_model() -> None:
    b = load_bundle(TINY)
    assert b.test_time_views == ["identity"]
    assert not isinstance(open_classifier(b), ViewAveraged)


@pytest.mark.parametrize(
    "views", [["mirror"], [], "hflip", ["hflip", "hflip"], [1], ["identity"] * 6]
)
def test_bad_views_are_refused_on_load_with_one_line(tmp_path: Path, views: object) -> None:
    with pytest.raises(EdgecellsError) as e:
        load_bundle(_with_views(tmp_path, views))
    msg = str(e.value)
    assert "manifest.json" in msg and "test_time_views" in msg and "\n" not in msg


def test_cli_refuses_bad_views_with_one_line(tmp_path: Path) -> None:
    root = _with_views(tmp_path, ["mirror"])
    proc = subprocess.run(
        [sys.executable, "-m", "edgecells", "bundle", "info", str(root)],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    err = proc.stderr.strip() or proc.stdout.strip()
    assert proc.returncode != 0 and "test_time_views" in err and "Traceback" not in err


def test_refit_refuses_bad_views_before_touching_the_bundle(tmp_path: Path) -> None:
    from edgecells.training.abstention import refit_bundle

    dst = tmp_path / "b"
    shutil.copytree(TINY, dst)
    before = (dst / "manifest.json").read_text()
    with pytest.raises(EdgecellsError, match="--views"):
        refit_bundle(dst, tmp_path, views=["mirror"])
    with pytest.raises(EdgecellsError, match="too few to fit"):  # valid views, fit fails
        refit_bundle(dst, Path(__file__).parent / "fixtures" / "pbc", views=["identity", "hflip"])
    assert (dst / "manifest.json").read_text() == before  # nothing half-written


def test_shipped_bundle_thresholds_match_its_views() -> None:
    """The shipped bundle's thresholds were fitted with the views it declares."""
    b = load_bundle(REFERENCE)
    fit = b.thresholds["ood"]
    assert fit.get("test_time_views", ["identity"]) == b.test_time_views


@pytest.mark.shared_data
@pytest.mark.slow
def test_refit_with_views_sets_them_and_fits_on_the_averaged_output(tmp_path: Path) -> None:
    from edgecells.training.abstention import refit_bundle

    pbc = shared_data_path("pbc")
    dst = tmp_path / "ref"
    shutil.copytree(REFERENCE, dst)
    rep = refit_bundle(dst, pbc, views=["identity", "hflip"])
    b = load_bundle(dst)
    assert b.test_time_views == ["identity", "hflip"] == rep["test_time_views"]
    assert b.thresholds["ood"]["test_time_views"] == ["identity", "hflip"]
    assert 0.05 < rep["temperature"] < 20 and rep["ece_after"] <= rep["ece_before"]
    # back to the raw model: the key goes away again
    refit_bundle(dst, pbc, views=["identity"])
    assert "test_time_views" not in json.loads((dst / "manifest.json").read_text())["preprocessing"]
