"""Regression suite from a hostile-input run (issue 12): what a careless or hostile field
user did that once lost data, merged slides, crashed with a traceback or was accepted when
it should not be. Each test names the item it keeps fixed."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from runtime_bundle import make_bundle
from typer.testing import CliRunner

from edgecells.cli import app
from edgecells.edge.bundle import load_bundle
from edgecells.edge.errors import EdgecellsError

ROOT = Path(__file__).resolve().parents[1]
FW = ROOT / "firmware-scripts"
FRAMES = ROOT / "tests" / "fixtures" / "bccd" / "JPEGImages"
PBC = ROOT / "tests" / "fixtures" / "pbc"


@pytest.fixture(autouse=True)
def _no_trusted_keys(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("EDGECELLS_TRUSTED_KEYS", raising=False)
    monkeypatch.setenv("EDGECELLS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("EDGECELLS_CACHE_MAX_MB", raising=False)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgecells.edge.imageio import list_images, read_image
    from edgecells.edge.stain import StainTarget

    target = StainTarget.fit([read_image(p) for p in list_images(PBC)[:12]])
    return make_bundle(tmp_path_factory.mktemp("bundle") / "tiny", stain_target=target.to_dict())


@pytest.fixture(scope="module")
def target_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgecells.edge.imageio import list_images, read_image
    from edgecells.edge.stain import StainTarget

    p = tmp_path_factory.mktemp("target") / "target.json"
    StainTarget.fit([read_image(f) for f in list_images(PBC)[:4]]).save(p)
    return p


def cli(*args: str | Path) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(r: object, *needles: str) -> str:
    """The command failed with exactly one `error:` line on stderr and no traceback."""
    assert r.exit_code not in (0, None), r.output  # type: ignore[attr-defined]
    assert "Traceback" not in r.output, r.output  # type: ignore[attr-defined]
    assert isinstance(r.exception, SystemExit), repr(r.exception)  # type: ignore[attr-defined]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]  # type: ignore[attr-defined]
    assert len(errors) == 1, r.stderr  # type: ignore[attr-defined]
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_manifest(root: Path, edit: object) -> None:
    m = json.loads((root / "manifest.json").read_text())
    edit(m)  # type: ignore[operator]
    (root / "manifest.json").write_text(json.dumps(m, indent=2))


def images_dir(tmp: Path, n: int = 2) -> Path:
    d = tmp / "raw"
    d.mkdir()
    for f in sorted(FRAMES.glob("*.jpg"))[:n]:
        shutil.copy(f, d / f.name)
    return d


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- 1. data loss


def test_stain_apply_refuses_to_replace_its_input_file(tmp_path: Path, target_json: Path) -> None:
    raw = images_dir(tmp_path, 1)
    f = next(raw.iterdir())
    before = f.read_bytes()
    one_line_error(cli("stain", "apply", f, "--target", target_json, "--out", f), "input")
    # the same file by another spelling
    other = raw / ".." / raw.name / f.name
    one_line_error(cli("stain", "apply", f, "--target", target_json, "--out", other), "input")
    assert f.read_bytes() == before


@pytest.mark.parametrize("where", [".", "normalized", "a/b"])
def test_stain_apply_refuses_out_in_the_input_folder(
    tmp_path: Path, target_json: Path, where: str
) -> None:
    raw = images_dir(tmp_path)
    before = snapshot(raw)
    out = raw / where
    one_line_error(cli("stain", "apply", raw, "--target", target_json, "--out", out), "inside")
    assert snapshot(raw) == before


def test_stain_apply_to_a_sibling_folder_still_works(tmp_path: Path, target_json: Path) -> None:
    raw = images_dir(tmp_path)
    before = snapshot(raw)
    r = cli("stain", "apply", raw, "--target", target_json, "--out", tmp_path / "norm")
    assert r.exit_code == 0, r.output
    assert snapshot(raw) == before
    assert sorted(p.name for p in (tmp_path / "norm").iterdir()) == sorted(before)


# --------------------------------------------------------------------------- 8. one line


@pytest.mark.parametrize("err", [errno.EROFS, errno.ENOSPC, errno.EACCES])
def test_stain_apply_unwritable_destination_is_one_line(
    tmp_path: Path, target_json: Path, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    import edgecells.commands.stain as stain_cmd

    def fail(path: object, image: object) -> None:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(stain_cmd, "write_image", fail)
    raw = images_dir(tmp_path)
    r = cli("stain", "apply", raw, "--target", target_json, "--out", tmp_path / "o")
    line = one_line_error(r, "0 of 2 images written")
    assert r.exit_code == 3 and os.strerror(err) in line


def test_stain_apply_bad_out_names_are_one_line(tmp_path: Path, target_json: Path) -> None:
    raw = images_dir(tmp_path, 1)
    f = next(raw.iterdir())
    folder = tmp_path / "existing"
    folder.mkdir()
    one_line_error(cli("stain", "apply", f, "-t", target_json, "--out", folder), "is a folder")
    one_line_error(
        cli("stain", "apply", f, "-t", target_json, "--out", tmp_path / "out.txt"),
        "not an image file name",
    )
    a_file = tmp_path / "file.png"
    a_file.write_bytes(b"x")
    one_line_error(cli("stain", "apply", raw, "-t", target_json, "--out", a_file), "is a file")
    assert list(folder.iterdir()) == []


def test_stain_fit_out_folder_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    d = tmp_path / "dir"
    d.mkdir()
    src = sorted(PBC.rglob("*.jpg"))[0]
    one_line_error(cli("stain", "fit", src, "--out", d), "is a folder")
    assert list(d.iterdir()) == [] and not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    "patch",
    [
        '"mean_q10": [NaN, 0, 0]',
        '"mean_q10": ["70000", 0, 0]',
        '"mean_q10": [1e30, 0, 0]',
        '"std_q10": [0, 1, 1]',
        '"std_q10": [1e30, 1024, 1024]',
        '"mask": {"dark_L": NaN}',
        '"mask": {"stats_stride": "4"}',
        '"mask": {"min_scale": 1e30}',
    ],
)
def test_bad_target_json_is_one_line(tmp_path: Path, target_json: Path, patch: str) -> None:
    d = json.loads(target_json.read_text())
    key = patch.split(":")[0].strip('"')
    d.pop(key, None)
    text = json.dumps(d)[:-1] + ", " + patch + "}"
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    raw = images_dir(tmp_path, 1)
    one_line_error(cli("stain", "apply", raw, "-t", bad, "--out", tmp_path / "o"), str(bad))


# --------------------------------------------------------------------------- 9. config


@pytest.mark.parametrize(
    "toml",
    [
        "[camera]\npixel_size_um = inf",
        "[camera]\npixel_size_um = 1e9",
        "[camera]\npixel_size_um = 1e-9",
        "[camera]\npixel_size_um = nan",
        "[quality]\nfocus_min = nan",
        "[quality]\nstain_max_distance = nan",
        "[quality]\nfocus_min = -1.0",
        "[detect]\nwork_pixel_um = nan",
        "[detect]\nwork_pixel_um = inf",
        "[detect]\nstain_threshold_min = 90\nstain_threshold_max = 40",
        "[detect]\nedge_margin_um = -5.0",
        "[detect]\nlobe_merge_um = -1.0",
        "[camera]\nawb_gains = [nan, 1.0]",
    ],
)
def test_absurd_config_values_are_refused(tmp_path: Path, toml: str) -> None:
    from edgecells.edge.config import load_config

    p = tmp_path / "config.toml"
    p.write_text(toml + "\n")
    with pytest.raises(EdgecellsError, match=str(p)):
        load_config(p)
    r = cli("screen", "--config", p, "--out", tmp_path / "o", "--frames", "1")
    one_line_error(r, str(p))
    assert not (tmp_path / "o").exists()


def test_json_output_never_holds_nan(tmp_path: Path) -> None:
    from edgecells.edge.jsonsafe import dumps
    from edgecells.edge.report import write_json_atomic

    data = {"a": float("nan"), "b": [float("inf"), np.float32("nan"), 1.5], "c": np.int64(3)}
    text = dumps(data)
    strict = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert strict == {"a": None, "b": [None, None, 1.5], "c": 3}
    write_json_atomic(tmp_path / "s.json", data)
    assert "NaN" not in (tmp_path / "s.json").read_text()


# --------------------------------------------------------------------------- 4. manifest


def _literal(m: dict, key: str, text: str) -> str:
    """Manifest text with ``key``'s value replaced by raw JSON text (NaN is not JSON)."""
    marker = "__REPLACE_ME__"
    cur = m
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur[p]
    cur[parts[-1]] = marker
    return json.dumps(m, indent=2).replace(f'"{marker}"', text)


BAD_VALUES = [
    ("thresholds.min_confidence", "NaN"),
    ("thresholds.min_confidence", "2.0"),
    ("thresholds.min_confidence", "-0.1"),
    ("thresholds.min_confidence", '"0.5"'),
    ("thresholds.screening.min_cells", "1e9"),
    ("thresholds.screening.min_cells", '"100"'),
    ("thresholds.screening.abnormal_fraction", "Infinity"),
    ("thresholds.screening.confidence", "0.2"),
    ("thresholds.screening.false_positive_rate", "1.0"),
    ("crop.side_um", "1e9"),
    ("crop.side_um", '"24"'),
    ("crop.min_side_factor", "-1"),
    ("crop.training_side_px", "2.5"),
]


@pytest.mark.parametrize(("key", "value"), BAD_VALUES)
def test_manifest_values_are_range_checked(
    bundle_dir: Path, tmp_path: Path, key: str, value: str
) -> None:
    b = copy_bundle(bundle_dir, tmp_path / "b")
    m = json.loads((b / "manifest.json").read_text())
    (b / "manifest.json").write_text(_literal(m, key, value))
    with pytest.raises(EdgecellsError, match=key.replace(".", r"\.")):
        load_bundle(b)
    one_line_error(cli("bundle", "info", b), "manifest.json")


def test_bad_manifest_value_is_one_line_in_screen_and_fails_doctor(
    bundle_dir: Path, tmp_path: Path
) -> None:
    b = copy_bundle(bundle_dir, tmp_path / "b")
    edit_manifest(b, lambda m: m["crop"].update(side_um=1e9))
    r = cli("screen", "--bundle", b, "--source", FRAMES, "--out", tmp_path / "o", "--frames", "1")
    one_line_error(r, "crop.side_um")
    assert not (tmp_path / "o").exists()
    r = cli("doctor", "--bundle", b, "--only", "bundle", "--json")
    assert r.exit_code == 1
    rep = json.loads(r.stdout)
    assert any(c["status"] == "FAIL" and "crop.side_um" in c["detail"] for c in rep["checks"])


def test_bad_manifest_value_is_refused_by_update_bundle(bundle_dir: Path, tmp_path: Path) -> None:
    b = copy_bundle(bundle_dir, tmp_path / "b")
    edit_manifest(b, lambda m: m["thresholds"].update(min_confidence=2.0))
    root = tmp_path / "root"
    proc = subprocess.run(
        ["bash", FW / "update-bundle.sh", "--root", root, "--python", sys.executable, b],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr
    assert "thresholds.min_confidence" in errors[0] and "Traceback" not in proc.stderr
    assert not (root / "var/lib/edgecells/bundles/current").exists()


def test_range_table_is_easy_to_extend(bundle_dir: Path) -> None:
    from edgecells.edge.bundle import RANGES, Range, check_ranges

    m = json.loads((bundle_dir / "manifest.json").read_text())
    check_ranges(m, "m")  # the shipped rows pass
    m["thresholds"]["ood"] = 7.0
    extra = [*RANGES, Range("thresholds.ood", "number", 0.0, 1.0)]
    with pytest.raises(EdgecellsError, match=r"thresholds.ood must be a number in \[0, 1\]"):
        check_ranges(m, "m", extra)


@pytest.mark.parametrize("path", ["../../etc/passwd", "/etc/passwd", "selftest/link.png"])
def test_selftest_paths_are_sanitized(bundle_dir: Path, tmp_path: Path, path: str) -> None:
    from edgecells.edge.bundle import file_entry

    b = copy_bundle(bundle_dir, tmp_path / "b")
    (b / "selftest").mkdir()
    real = b / "selftest" / "real.png"
    cv2.imwrite(str(real), np.zeros((32, 32, 3), np.uint8))
    fe = file_entry(b, "selftest/real.png").to_dict()
    if path.endswith("link.png"):
        (b / "selftest" / "link.png").symlink_to(real)
    fe["path"] = path
    edit_manifest(b, lambda m: m.update(selftest={"samples": [{**fe, "label": "neutrophil"}]}))
    with pytest.raises(EdgecellsError, match="outside the bundle|link"):
        load_bundle(b)
    one_line_error(cli("bundle", "info", b))


def test_selftest_samples_are_hashed_like_model_files(bundle_dir: Path, tmp_path: Path) -> None:
    from edgecells.edge.bundle import file_entry

    b = copy_bundle(bundle_dir, tmp_path / "b")
    (b / "selftest").mkdir()
    cv2.imwrite(str(b / "selftest" / "a.png"), np.zeros((32, 32, 3), np.uint8))
    fe = file_entry(b, "selftest/a.png").to_dict()
    edit_manifest(b, lambda m: m.update(selftest={"samples": [{**fe, "label": "neutrophil"}]}))
    assert [f.path for f in load_bundle(b).selftest] == ["selftest/a.png"]
    cv2.imwrite(str(b / "selftest" / "a.png"), np.full((32, 32, 3), 9, np.uint8))
    with pytest.raises(EdgecellsError, match="a.png"):
        load_bundle(b)


def test_symlinked_manifest_is_refused(bundle_dir: Path, tmp_path: Path) -> None:
    b = copy_bundle(bundle_dir, tmp_path / "b")
    real = tmp_path / "elsewhere.json"
    (b / "manifest.json").rename(real)
    (b / "manifest.json").symlink_to(real)
    with pytest.raises(EdgecellsError, match="symbolic link"):
        load_bundle(b)
    one_line_error(cli("bundle", "info", b), "symbolic link")


# --------------------------------------------------------------------------- 5, 6. archives


def _tar(src: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w:gz") as tf:
        tf.add(src, arcname=src.name)
    return dest


def test_archive_cache_is_bounded(bundle_dir: Path, tmp_path: Path) -> None:
    from edgecells.edge.bundle.archive import CACHE_MAX_ENTRIES, _cache_dir

    for i in range(CACHE_MAX_ENTRIES + 2):
        b = copy_bundle(bundle_dir, tmp_path / f"v{i}")
        edit_manifest(b, lambda m, i=i: m.update(name=f"v{i}"))
        assert load_bundle(_tar(b, tmp_path / f"v{i}.tar.gz")).name == f"v{i}"
    entries = [p for p in _cache_dir().iterdir() if not p.name.startswith(".")]
    assert len(entries) == CACHE_MAX_ENTRIES
    # the most recently used are the ones kept
    names = {json.loads((p / f"v{i}" / "manifest.json").read_text())["name"]
             for p in entries for i in range(CACHE_MAX_ENTRIES + 2)
             if (p / f"v{i}").is_dir()}  # fmt: skip
    assert names == {f"v{i}" for i in range(2, CACHE_MAX_ENTRIES + 2)}


def test_archive_larger_than_the_cache_is_refused(
    bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgecells.edge.bundle.archive import _cache_dir

    b = copy_bundle(bundle_dir, tmp_path / "big")
    (b / "filler.bin").write_bytes(b"\0" * (2 << 20))  # compresses to almost nothing
    arc = _tar(b, tmp_path / "big.tar.gz")
    assert arc.stat().st_size < 200_000
    monkeypatch.setenv("EDGECELLS_CACHE_MAX_MB", "1")
    with pytest.raises(EdgecellsError, match="EDGECELLS_CACHE_MAX_MB"):
        load_bundle(arc)
    assert not [p for p in _cache_dir().iterdir()]  # nothing left behind


def test_edited_cached_manifest_does_not_pass(bundle_dir: Path, tmp_path: Path) -> None:
    arc = _tar(bundle_dir, tmp_path / "b.tar.gz")
    first = load_bundle(arc)
    cached = first.root / "manifest.json"
    m = json.loads(cached.read_text())
    m["thresholds"]["min_confidence"] = 0.99  # still valid, but not what was shipped
    cached.write_text(json.dumps(m))
    again = load_bundle(arc)
    assert again.thresholds["min_confidence"] == first.thresholds["min_confidence"]
    assert again.manifest_sha256 == first.manifest_sha256
    # a signature that the archive does not hold must not appear either
    (again.root / "signature.json").write_text("{}")
    assert not (load_bundle(arc).root / "signature.json").exists()


def test_unwritable_cache_falls_back_to_a_temporary_folder(
    bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")  # mkdir under a file fails, even as root
    monkeypatch.setenv("EDGECELLS_CACHE", str(blocker / "cache"))
    arc = _tar(bundle_dir, tmp_path / "b.tar.gz")
    b = load_bundle(arc)
    assert b.name == "tiny-test" and not b.root.is_relative_to(blocker)
    r = cli("bundle", "info", arc, "--json")
    assert r.exit_code == 0, r.output


def test_zip_without_file_type_bits_is_accepted(bundle_dir: Path, tmp_path: Path) -> None:
    arc = tmp_path / "b.zip"
    with zipfile.ZipFile(arc, "w") as zf:
        for p in sorted(bundle_dir.rglob("*")):
            if p.is_file():
                zf.writestr(f"tiny/{p.relative_to(bundle_dir)}", p.read_bytes())
    assert all(stat.S_IFMT(i.external_attr >> 16) == 0 for i in zipfile.ZipFile(arc).infolist())
    assert load_bundle(arc).name == "tiny-test"


def test_zip_links_and_devices_are_still_refused(bundle_dir: Path, tmp_path: Path) -> None:
    for kind, mode in (("link", stat.S_IFLNK | 0o777), ("fifo", stat.S_IFIFO | 0o644)):
        arc = tmp_path / f"{kind}.zip"
        with zipfile.ZipFile(arc, "w") as zf:
            zf.write(bundle_dir / "manifest.json", "manifest.json")
            info = zipfile.ZipInfo("model.onnx")
            info.external_attr = mode << 16
            zf.writestr(info, b"x")
        with pytest.raises(EdgecellsError, match="link|not a regular file"):
            load_bundle(arc, extract_to=tmp_path / kind)


# --------------------------------------------------------------------------- 7. convert --archive


def test_archive_packs_selftest_and_update_bundle_installs_it(tmp_path: Path) -> None:
    """`convert --archive` packs with writer.archive: everything the manifest references
    (the reference bundle has self-test samples) goes in, so update-bundle.sh, which gates
    on doctor's self-test, installs it."""
    from edgecells.convert.writer import archive
    from edgecells.edge.bundle import default_bundle_path, referenced_files

    ref = default_bundle_path()
    arc = archive(ref, tmp_path / "ref.tar.gz")
    names = {m.name.split("/", 1)[1] for m in tarfile.open(arc) if m.isfile()}
    refs = referenced_files(json.loads((ref / "manifest.json").read_text()))
    assert any(r.startswith("selftest/") for r in refs)
    assert names == {"manifest.json", *refs}
    root = tmp_path / "root"
    proc = subprocess.run(
        ["bash", FW / "update-bundle.sh", "--root", root, "--python", sys.executable,
         "--no-restart", arc],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    current = root / "var/lib/edgecells/bundles/current"
    assert (current / "selftest").is_dir()
    assert re_ok("selftest", proc.stdout)


def re_ok(check: str, table: str) -> bool:
    return any(check in ln and "OK" in ln for ln in table.splitlines())


# --------------------------------------------------------------------------- session


def _screen(bundle: Path, source: Path | str, out: Path, *extra: str) -> object:
    return cli("screen", "--bundle", bundle, "--source", source, "--out", out, *extra)


def _two_sources(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "slideA", tmp_path / "slideB"
    files = sorted(FRAMES.glob("*.jpg"))
    for d, fs in ((a, files[:3]), (b, files[3:])):
        d.mkdir()
        for f in fs:
            shutil.copy(f, d / f.name)
    return a, b


def test_resume_refuses_another_source_or_bundle(bundle_dir: Path, tmp_path: Path) -> None:
    a, b = _two_sources(tmp_path)
    out = tmp_path / "S"
    assert _screen(bundle_dir, a, out, "--frames", "2").exit_code == 0
    before = (out / "frames.csv").read_bytes()
    one_line_error(_screen(bundle_dir, b, out, "--resume"), "another source", str(b))
    other = copy_bundle(bundle_dir, tmp_path / "other")
    edit_manifest(other, lambda m: m.update(name="other"))
    one_line_error(_screen(other, a, out, "--resume"), "another bundle")
    assert (out / "frames.csv").read_bytes() == before
    # the same slide by another spelling resumes
    r = _screen(bundle_dir, Path(os.path.relpath(a)), out, "--resume", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["frames"] == 3


def test_disk_full_abort_is_not_reported_complete(
    bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgecells.edge import report
    from edgecells.edge.report import read_csv

    real_write = report.CsvLog.write
    calls = {"n": 0}

    def write(self: report.CsvLog, row: dict) -> None:
        if self.path.name == "frames.csv":
            calls["n"] += 1
            if calls["n"] > 3:
                raise report.disk_error(self.path, OSError(errno.ENOSPC, "No space left"))
        real_write(self, row)

    monkeypatch.setattr(report.CsvLog, "write", write)
    out = tmp_path / "S"
    r = _screen(bundle_dir, FRAMES, out)
    assert r.exit_code == 3 and "disk full" in r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["complete"] is False and "disk full" in s["error"]
    assert s["frames"] == len(read_csv(out / "frames.csv")) == 3
    assert (
        s["quality"]["passed"] + s["quality"]["unreadable"] + sum(s["quality"]["failed"].values())
        == 3
    )
    page = (out / "report.html").read_text()
    assert "not complete" in page and "disk full" in page
    # resuming the aborted session (disk freed) completes it
    monkeypatch.setattr(report.CsvLog, "write", real_write)
    r = _screen(bundle_dir, FRAMES, out, "--resume", "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["complete"] is True and s["error"] is None and s["frames"] == 6


def test_failed_start_does_not_block_the_rerun(bundle_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "S"
    one_line_error(_screen(bundle_dir, tmp_path / "no-such-folder", out), "no-such-folder")
    one_line_error(_screen(bundle_dir, "cv:7", out), "cv:7")
    assert not (out / "cells.csv").exists() and not (out / "frames.csv").exists()
    # header-only logs left by an older version count as no session
    out.mkdir(exist_ok=True)
    from edgecells.edge.report import CELL_FIELDS, FRAME_FIELDS

    (out / "cells.csv").write_text(",".join(CELL_FIELDS) + "\n")
    (out / "frames.csv").write_text(",".join(FRAME_FIELDS) + "\n")
    r = _screen(bundle_dir, FRAMES, out, "--frames", "2", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["frames"] == 2


def test_negative_frames_refused_and_profile_of_unreadable_frames_fails(
    bundle_dir: Path, tmp_path: Path
) -> None:
    one_line_error(_screen(bundle_dir, FRAMES, tmp_path / "S", "--frames", "-1"), "--frames")
    assert not (tmp_path / "S").exists()
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"{i}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    r = cli("profile", "--bundle", bundle_dir, "--source", bad, "--frames", "3", "--json")
    one_line_error(r, "unreadable")


def test_outputs_get_the_csv_permissions(
    bundle_dir: Path, tmp_path: Path, target_json: Path
) -> None:
    old = os.umask(0o022)
    try:
        out = tmp_path / "S"
        assert _screen(bundle_dir, FRAMES, out, "--frames", "2").exit_code == 0
        mode = stat.S_IMODE((out / "cells.csv").stat().st_mode)
        assert mode == 0o644
        for name in ("frames.csv", "summary.json", "report.html", "session.json"):
            assert stat.S_IMODE((out / name).stat().st_mode) == mode, name
        raw = images_dir(tmp_path, 1)
        assert cli("stain", "apply", raw, "-t", target_json, "--out", tmp_path / "n").exit_code == 0
        for p in (tmp_path / "n").iterdir():
            assert stat.S_IMODE(p.stat().st_mode) == 0o644
        os.umask(0o027)
        assert cli("stain", "apply", raw, "-t", target_json, "--out", tmp_path / "m").exit_code == 0
        for p in (tmp_path / "m").iterdir():
            assert stat.S_IMODE(p.stat().st_mode) == 0o640
    finally:
        os.umask(old)


# --------------------------------------------------------------------------- 13. image size


def _png_header_only(w: int, h: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1000)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_huge_image_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgecells.edge import imageio

    p = tmp_path / "huge.png"
    p.write_bytes(_png_header_only(30000, 30000))
    decoded = []
    real = cv2.imdecode
    monkeypatch.setattr(imageio.cv2, "imdecode", lambda *a: decoded.append(1) or real(*a))
    with pytest.raises(EdgecellsError, match="30000x30000.*before decoding"):
        imageio.read_image(p)
    assert decoded == []
    # a huge JPEG header, likewise
    ok, buf = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))
    data = bytearray(buf.tobytes())
    i = data.find(b"\xff\xc0")
    data[i + 5 : i + 9] = struct.pack(">HH", 40000, 40000)
    (tmp_path / "huge.jpg").write_bytes(bytes(data))
    with pytest.raises(EdgecellsError, match="40000x40000"):
        imageio.read_image(tmp_path / "huge.jpg")
    assert decoded == []
    # ordinary images still read
    cv2.imwrite(str(tmp_path / "ok.png"), np.zeros((5, 7, 3), np.uint8))
    assert imageio.read_image(tmp_path / "ok.png").shape == (5, 7, 3)


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".webp", ".tif"])
def test_header_sizes_match_the_decoder(ext: str) -> None:
    from edgecells.edge.imageio import image_size

    for shape in ((37, 53, 3), (64, 48)):
        ok, buf = cv2.imencode(ext, np.random.default_rng(0).integers(0, 255, shape, np.uint8))
        assert image_size(buf.tobytes()) == (shape[1], shape[0])


# --------------------------------------------------------------------------- 14. resume


def _session_run(bundle_dir: Path, out: Path, n: int, resume: bool = False) -> dict:
    from edgecells.edge.backends import open_classifier
    from edgecells.edge.config import Config
    from edgecells.edge.session import Session
    from edgecells.edge.sources import open_source

    b = load_bundle(bundle_dir)
    clf = open_classifier(b, "onnxruntime", 1, precision="float32")
    sess = Session(Config(), b, clf, out=out, resume=resume)
    src = open_source(str(FRAMES))
    src.open()
    try:
        return sess.run(src, n)
    finally:
        src.close()


def _frames_listed(out: Path) -> list[int]:
    from edgecells.edge.report import read_csv

    return [int(r["frame"]) for r in read_csv(out / "frames.csv")]


def _consistent(out: Path) -> None:
    from edgecells.edge.report import read_csv

    frames = read_csv(out / "frames.csv")
    cells = read_csv(out / "cells.csv")
    for r in frames:
        n = sum(c["frame"] == r["frame"] for c in cells)
        assert n == (int(r["cells"]) if r["status"] == "ok" else 0), r["frame"]
    assert {c["frame"] for c in cells} <= {r["frame"] for r in frames}


def test_nul_padded_frame_line_is_not_a_frame(bundle_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "S"
    _session_run(bundle_dir, out, 3)
    with open(out / "frames.csv", "ab") as f:
        f.write(b"\0" * 120 + b"\n")  # what a power cut leaves where a row was going
    s = _session_run(bundle_dir, out, 0, resume=True)
    assert s["frames"] == 6 and _frames_listed(out) == list(range(6))
    assert b"\0" not in (out / "frames.csv").read_bytes()
    _consistent(out)


@pytest.mark.parametrize("damage", ["torn", "nul"])
def test_torn_cell_row_of_a_finished_frame_is_read_again(
    bundle_dir: Path, tmp_path: Path, damage: str
) -> None:
    from edgecells.edge.report import read_csv

    out = tmp_path / "S"
    full = _session_run(bundle_dir, tmp_path / "ref", 0)
    _session_run(bundle_dir, out, 3)
    lines = (out / "cells.csv").read_bytes().split(b"\n")
    frame1 = [i for i, ln in enumerate(lines) if ln.startswith(b"1,")]
    assert frame1, "frame 1 has cells"
    i = frame1[0]
    lines[i] = lines[i][: len(lines[i]) // 2] if damage == "torn" else b"\0" * len(lines[i])
    (out / "cells.csv").write_bytes(b"\n".join(lines))
    s = _session_run(bundle_dir, out, 0, resume=True)
    assert _frames_listed(out) == list(range(6))
    assert any("read again" in e for e in s["events"])
    _consistent(out)
    assert s["frames"] == full["frames"] and s["counts"] == full["counts"]
    assert len(read_csv(out / "cells.csv")) == len(read_csv(tmp_path / "ref" / "cells.csv"))
    assert not math.isnan(s["abnormal_fraction"])
