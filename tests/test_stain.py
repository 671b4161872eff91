"""The integer-only Reinhard normalizer: exactness, agreement with float64, masking,
blank frames, pooling, crops, target files and the CLI."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from edgecells.edge import stain_kernels as K
from edgecells.edge.errors import EdgecellsError
from edgecells.edge.imageio import list_images, read_image
from edgecells.edge.reinhard_tables import (
    TABLES_PATH,
    build_tables,
    load_tables,
    tables_digest,
)
from edgecells.edge.stain import MaskParams, ReinhardNormalizer, StainTarget
from edgecells.edge.stain_reference import stats_float, transform_float

sys.path.insert(0, str(Path(__file__).parent / "golden"))
import generate as golden  # noqa: E402
from conftest import FIXTURES, shared_data_path  # noqa: E402

KERNELS = ["numpy"] + (["numba"] if K.HAVE_NUMBA else [])


@pytest.fixture(scope="module")
def pbc_images() -> list[np.ndarray]:
    return [read_image(p) for p in list_images(FIXTURES / "pbc")]


@pytest.fixture(scope="module")
def bccd_images() -> list[np.ndarray]:
    return [read_image(p) for p in list_images(FIXTURES / "bccd" / "JPEGImages")]


@pytest.fixture(scope="module")
def target(pbc_images: list[np.ndarray]) -> StainTarget:
    return StainTarget.fit(pbc_images[::2])


def _errors_vs_reference(images: list[np.ndarray], target: StainTarget) -> np.ndarray:
    """|fixed - float64| over every value of every image, given the fixed path's mask."""
    tables = load_tables()
    norm = ReinhardNormalizer(target)
    diffs = []
    for img in images:
        res = norm.normalize(img)
        assert res.applied, res.reason
        params = norm.params(res.stats)
        weights = K.weights_np(img, params, tables)
        lightness = K.lab_q10_np(img, tables)[..., 0]
        stained = (lightness >= params[11]) & (lightness < params[9])
        mean, std = stats_float(img, stained)
        ref = transform_float(
            img, weights / 256.0, mean, std, np.array(target.mean), np.array(target.std)
        )
        diffs.append(np.abs(ref.astype(np.int64) - res.image.astype(np.int64)).ravel())
    return np.concatenate(diffs)


def _check_error_budget(d: np.ndarray) -> None:
    assert d.mean() <= 0.5, f"mean error {d.mean():.3f} levels"
    assert (d <= 1).mean() >= 0.999, f"only {(d <= 1).mean():.5f} of values within 1 level"
    assert d.max() <= 3, f"max error {d.max()} levels"


def test_fixed_point_matches_float_reference_on_fixtures(pbc_images, bccd_images, target) -> None:
    d = _errors_vs_reference(pbc_images + bccd_images, target)
    _check_error_budget(d)
    assert d.size > 5_000_000


@pytest.mark.shared_data
@pytest.mark.slow
def test_fixed_point_matches_float_reference_on_full_data() -> None:
    pbc = shared_data_path("pbc")
    bccd = shared_data_path("bccd", "BCCD", "JPEGImages")
    rng = random.Random(1)
    pbc_files = rng.sample(list_images(pbc), 160)
    target = StainTarget.fit([read_image(p) for p in pbc_files[:60]])
    images = [read_image(p) for p in pbc_files[60:]]
    images += [read_image(p) for p in rng.sample(list_images(bccd), 40)]
    _check_error_budget(_errors_vs_reference(images, target))


@pytest.mark.parametrize("kernel", KERNELS)
def test_golden_vectors(kernel: str) -> None:
    expected = json.loads((Path(golden.__file__).parent / "stain_golden.json").read_text())
    assert golden.compute(kernel=kernel) == expected


def test_kernels_bit_identical(pbc_images, bccd_images, target) -> None:
    if not K.HAVE_NUMBA:
        pytest.skip("numba is not installed")
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(97, 131, 3), dtype=np.uint8)
    for img in [*pbc_images[:6], *bccd_images[:2], noise, golden.sweep()]:
        a = ReinhardNormalizer(target, kernel="numba")
        b = ReinhardNormalizer(target, kernel="numpy")
        sa, sb = a.frame_stats(img, stride=1), b.frame_stats(img, stride=1)
        assert sa == sb
        assert np.array_equal(a.normalize(img).image, b.normalize(img).image)


def test_lookup_tables_rebuild_to_committed_file() -> None:
    assert tables_digest(build_tables()) == tables_digest(load_tables())


def test_tampered_lookup_tables_refused(tmp_path, monkeypatch) -> None:
    from edgecells.edge import reinhard_tables as rt

    tables = dict(load_tables())
    tables["enc"] = tables["enc"].copy()
    tables["enc"][1000] ^= 1
    bad = tmp_path / "luts.npz"
    np.savez(bad, **tables)
    monkeypatch.setattr(rt, "TABLES_PATH", bad)
    rt.load_tables.cache_clear()
    try:
        with pytest.raises(EdgecellsError, match="SHA-256"):
            rt.load_tables()
    finally:
        rt.load_tables.cache_clear()
    assert TABLES_PATH.is_file()


def test_glass_and_black_stay_unchanged(bccd_images, target) -> None:
    img = bccd_images[0].copy()
    img[:40, :40] = 0  # a field stop's black corner
    norm = ReinhardNormalizer(target)
    res = norm.normalize(img)
    assert res.applied
    lightness = K.lab_q10_np(img, load_tables())[..., 0]
    glass = lightness >= res.stats.threshold_q10
    assert glass.mean() > 0.05  # BCCD frames have real glass
    assert np.array_equal(res.image[glass], img[glass])
    assert np.array_equal(res.image[:40, :40], img[:40, :40])
    stained = lightness < res.stats.threshold_q10 - 3 * 1024
    assert np.abs(res.image[stained].astype(int) - img[stained]).mean() > 3  # and cells change


def test_threshold_follows_glass_level(target) -> None:
    """The stained threshold sits below the frame's own glass brightness."""
    norm = ReinhardNormalizer(target)
    base = np.full((120, 120, 3), 235, np.uint8)  # bright glass
    base[30:90, 30:90] = (120, 80, 160)
    base[30:90, 30:60] = (150, 90, 170)
    dim = (base.astype(np.int32) * 85 // 100).astype(np.uint8)  # same slide, dimmer lamp
    s1, s2 = norm.frame_stats(base, 1), norm.frame_stats(dim, 1)
    assert s1.ok and s2.ok
    assert s2.threshold_L < s1.threshold_L
    assert s1.n_stained == s2.n_stained == 60 * 60


@pytest.mark.parametrize(
    ("image", "reason"),
    [
        (np.full((64, 64, 3), 240, np.uint8), "all glass"),
        (np.zeros((64, 64, 3), np.uint8), "too dark"),
        (np.full((64, 64, 3), (150, 90, 170), np.uint8), "zero variance"),
        (np.full((64, 64, 3), 128, np.uint8), "zero variance"),
    ],
)
def test_blank_frames_returned_unchanged_with_reason(image, reason, target) -> None:
    for kernel in KERNELS:
        res = ReinhardNormalizer(target, kernel=kernel).normalize(image)
        assert not res.applied
        assert reason in res.reason
        assert np.array_equal(res.image, image)


def test_saturated_frame_unchanged(target) -> None:
    rng = np.random.default_rng(3)
    img = np.full((64, 64, 3), 245, np.uint8)
    img[8:56, 8:56] = (0, 0, 255)  # clipped blue
    img[8:56, 8:56, 0] = rng.integers(0, 60, size=(48, 48))
    res = ReinhardNormalizer(target).normalize(img)
    assert not res.applied and "saturated" in res.reason
    assert np.array_equal(res.image, img)


def test_target_pooled_over_pixels_not_averaged(pbc_images) -> None:
    small = pbc_images[0][:60, :60]
    big = pbc_images[40]
    a, b = StainTarget.fit(small), StainTarget.fit(big)
    pooled = StainTarget.fit([small, big])
    assert pooled.n_pixels == a.n_pixels + b.n_pixels
    assert pooled.n_images == 2
    for c in range(3):
        want = (a.mean_q10[c] * a.n_pixels + b.mean_q10[c] * b.n_pixels) / pooled.n_pixels
        assert abs(pooled.mean_q10[c] - want) <= 1
        # the pooled std includes the spread between the two images' means
        var = (
            a.n_pixels * (a.std_q10[c] ** 2 + (a.mean_q10[c] - want) ** 2)
            + b.n_pixels * (b.std_q10[c] ** 2 + (b.mean_q10[c] - want) ** 2)
        ) / pooled.n_pixels
        assert abs(pooled.std_q10[c] - var**0.5) <= 2
    assert a.mean_q10 != b.mean_q10
    unweighted = [(a.mean_q10[c] + b.mean_q10[c]) / 2 for c in range(3)]
    assert any(abs(pooled.mean_q10[c] - unweighted[c]) > 50 for c in range(3))


def test_fit_fails_without_stained_pixels() -> None:
    with pytest.raises(EdgecellsError, match="no image with stained pixels"):
        StainTarget.fit([np.full((32, 32, 3), 250, np.uint8)])


def test_crop_path_equals_frame_path_with_same_stats(bccd_images, target) -> None:
    frame = bccd_images[1]
    norm = ReinhardNormalizer(target)
    stats = norm.frame_stats(frame)  # subsampled
    assert stats.ok and stats.stride == 4
    full = norm.normalize(frame, stats=stats).image
    for y, x, h, w in [(0, 0, 128, 128), (200, 300, 128, 128), (400, 560, 80, 80)]:
        crop = norm.transform_crop(frame[y : y + h, x : x + w], stats)
        assert np.array_equal(crop, full[y : y + h, x : x + w])
    exact = norm.frame_stats(frame, stride=1)
    assert max(abs(a - b) for a, b in zip(stats.mean, exact.mean)) < 1.0
    assert max(abs(a - b) / b for a, b in zip(stats.std, exact.std)) < 0.05


def test_transform_is_idempotent_in_distribution(pbc_images, target) -> None:
    """A normalized image's stained statistics land near the target's."""
    norm = ReinhardNormalizer(target)
    out = norm.transform(pbc_images[5])
    st = norm.frame_stats(out, stride=1)
    assert all(abs(m - t) < 4.0 for m, t in zip(st.mean, target.mean))


def test_target_round_trip_and_file_errors(tmp_path, target) -> None:
    p = tmp_path / "t.json"
    target.save(p)
    assert StainTarget.load(p) == target
    d = json.loads(p.read_text())
    assert d["version"] == 1 and d["format"] == "edgecells.stain-target"
    cases = {
        "garbage.json": "{not json",
        "version.json": json.dumps({**d, "version": 99}),
        "format.json": json.dumps({**d, "format": "something else"}),
        "std.json": json.dumps({**d, "std_q10": [0, 1, 2]}),
        "types.json": json.dumps({**d, "mean_q10": "abc"}),
        "list.json": "[1, 2, 3]",
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(EdgecellsError) as exc:
            StainTarget.load(tmp_path / name)
        assert name in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(EdgecellsError, match="no such"):
        StainTarget.load(tmp_path / "missing.json")


def test_mask_params_travel_with_target(tmp_path, pbc_images) -> None:
    mask = MaskParams(max_threshold_L=80.0, glass_margin_L=8.0)
    t = StainTarget.fit(pbc_images[:4], mask=mask)
    t.save(tmp_path / "t.json")
    assert StainTarget.load(tmp_path / "t.json").mask == mask


def test_odd_inputs_accepted_or_refused(target) -> None:
    norm = ReinhardNormalizer(target)
    gray16 = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16)
    assert norm.normalize(gray16).image.shape == (64, 64, 3)
    rgba = np.zeros((10, 10, 4), np.uint8)
    assert norm.normalize(rgba).image.shape == (10, 10, 3)
    for bad in (np.zeros((0, 5, 3), np.uint8), np.zeros((5, 5, 2), np.uint8), np.zeros(5)):
        with pytest.raises(EdgecellsError):
            norm.normalize(bad)


# ----------------------------------------------------------------------------- CLI


def _cli(*args: str):
    from typer.testing import CliRunner

    from edgecells.cli import app

    return CliRunner().invoke(app, list(args))


def test_cli_fit_and_apply_folder(tmp_path) -> None:
    src = tmp_path / "imgs"
    src.mkdir()
    for p in list_images(FIXTURES / "pbc" / "lymphocyte"):
        (src / p.name).write_bytes(p.read_bytes())
    r = _cli("stain", "fit", str(src), "--out", str(tmp_path / "t.json"), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["n_images"] == 6
    out = tmp_path / "out"
    r = _cli("stain", "apply", str(src), "--target", str(tmp_path / "t.json"), "--out", str(out))
    assert r.exit_code == 0, r.output
    assert len(list_images(out)) == 6


def test_cli_reports_unreadable_and_fails(tmp_path, target) -> None:
    target.save(tmp_path / "t.json")
    src = tmp_path / "imgs"
    src.mkdir()
    (src / "good.png").write_bytes((Path(golden.__file__).parent / "pbc_ig.png").read_bytes())
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    r = _cli(
        "stain", "apply", str(src), "--target", str(tmp_path / "t.json"),
        "--out", str(tmp_path / "o"), "--json",
    )  # fmt: skip
    assert r.exit_code == 1
    summary = json.loads(r.stdout)
    assert summary["written"] == 1
    assert [Path(f["file"]).name for f in summary["failed"]] == ["broken.jpg"]
    assert (tmp_path / "o" / "good.png").is_file()


def test_cli_bad_target_is_one_line_error(tmp_path) -> None:
    (tmp_path / "t.json").write_text('{"format": "edgecells.stain-target", "version": 3}')
    r = _cli(
        "stain", "apply", str(Path(golden.__file__).parent / "pbc_ig.png"),
        "--target", str(tmp_path / "t.json"), "--out", str(tmp_path / "o.png"),
    )  # fmt: skip
    assert r.exit_code == 2
    assert "version 3 is not supported" in r.output
    assert "Traceback" not in r.output
