"""Model bundles: manifest schema, hash verification, safe archive extraction."""

from __future__ import annotations

import io
import json
import shutil
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from edgecells.convert.writer import archive
from edgecells.edge.bundle import (
    SCHEMA_VERSION,
    default_bundle_path,
    extract_archive,
    load_bundle,
    parse_manifest,
)
from edgecells.edge.errors import EdgecellsError

TINY = Path(__file__).parent / "fixtures" / "bundle_tiny"


@pytest.fixture
def bundle_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(TINY, dst)
    return dst


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _write(root: Path, m: dict) -> None:
    (root / "manifest.json").write_text(json.dumps(m))


def test_fixture_bundle_loads_with_schema_fields() -> None:
    b = load_bundle(TINY)
    assert b.manifest["schema"] == "edgecells.bundle"
    assert b.manifest["schema_version"] == SCHEMA_VERSION
    assert b.classes[:2] == ["basophil", "eosinophil"] and b.num_classes == 8
    assert b.abnormal_classes == ["erythroblast", "ig"]
    assert list(b.abnormal_mask).count(True) == 2
    assert b.input_size == 32 and b.normalizes_stain
    assert b.load_stain_target() is not None
    assert "side_um" in b.crop
    assert b.thresholds["screening"]["min_cells"] == 100
    ids = {m.id for m in b.models}
    assert {"tflite-int8", "onnx-int8", "openvino-int8"} <= ids
    tfl = b.model("tflite", "int8")
    assert tfl.input.dtype == "int8" and tfl.input.scale == 1.0 and tfl.input.zero_point == -128
    assert tfl.output.quantized and tfl.backend == "litert"
    ov = b.model("openvino")
    assert [Path(f.path).suffix for f in ov.files] == [".xml", ".bin"]
    for m in b.models:
        assert len(m.sha256) == 64 and m.bytes > 0
    assert set(b.validation) == {"tflite-int8", "onnx-int8", "openvino-int8"}
    prov = b.provenance
    assert prov["source_model_sha256"] and prov["calibration_sha256"]
    assert prov["edgecells_version"] and prov["created"]


def test_tampered_byte_is_refused(bundle_copy: Path) -> None:
    p = bundle_copy / "model_int8.tflite"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(EdgecellsError, match=r"model_int8\.tflite: SHA-256 mismatch"):
        load_bundle(bundle_copy)


def test_truncated_file_is_refused(bundle_copy: Path) -> None:
    p = bundle_copy / "openvino" / "model_int8.bin"
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(EdgecellsError, match=r"model_int8\.bin: truncated"):
        load_bundle(bundle_copy)


def test_missing_file_is_refused(bundle_copy: Path) -> None:
    (bundle_copy / "model_int8.onnx").unlink()
    with pytest.raises(EdgecellsError, match=r"model_int8\.onnx: missing"):
        load_bundle(bundle_copy)


def test_wrong_schema_version_and_schema(bundle_copy: Path) -> None:
    m = _manifest(bundle_copy)
    m["schema_version"] = 2
    _write(bundle_copy, m)
    with pytest.raises(EdgecellsError, match="unsupported schema_version 2"):
        load_bundle(bundle_copy)
    m["schema_version"] = 1
    m["schema"] = "something.else"
    _write(bundle_copy, m)
    with pytest.raises(EdgecellsError, match="not an edgecells bundle manifest"):
        load_bundle(bundle_copy)


def test_corrupt_manifest_json(bundle_copy: Path) -> None:
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(EdgecellsError, match=r"manifest\.json: not valid JSON"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize("bad", ["../outside.tflite", "/etc/passwd", "a/../../x"])
def test_manifest_paths_must_stay_inside(bundle_copy: Path, bad: str) -> None:
    m = _manifest(bundle_copy)
    m["models"][0]["path"] = bad
    m["models"][0]["files"][0]["path"] = bad
    _write(bundle_copy, m)
    with pytest.raises(EdgecellsError, match="outside the bundle"):
        load_bundle(bundle_copy)


def test_schema_checks_shapes_and_mapping() -> None:
    m = _manifest(TINY)
    m["models"][0]["input"]["shape"] = [-1, 64, 64, 3]
    with pytest.raises(EdgecellsError, match="does not match input_size 32"):
        parse_manifest(m)
    m = _manifest(TINY)
    m["mapping"]["classes"] = m["mapping"]["classes"][::-1]
    with pytest.raises(EdgecellsError, match="mapping.classes"):
        parse_manifest(m)
    m = _manifest(TINY)
    m["models"][0]["input"]["scale"] = None  # int8 without quantization parameters
    m["models"][0]["input"]["zero_point"] = None
    with pytest.raises(EdgecellsError, match="needs scale and zero_point"):
        parse_manifest(m)
    m = _manifest(TINY)
    del m["thresholds"]
    with pytest.raises(EdgecellsError, match="missing key 'thresholds'"):
        parse_manifest(m)


@pytest.mark.parametrize("suffix", [".tar.gz", ".zip"])
def test_archive_round_trip(tmp_path: Path, suffix: str) -> None:
    arc = archive(TINY, tmp_path / f"tiny{suffix}")
    b = load_bundle(arc, extract_to=tmp_path / "x")
    assert b.name == "tiny-test" and len(b.models) == 6
    # cached extraction (keyed by the archive's hash) is re-verified on every load
    b2 = load_bundle(arc)
    assert b2.root != b.root and b2.classes == b.classes


def test_archive_cache_is_reverified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGECELLS_CACHE", str(tmp_path / "cache"))
    arc = archive(TINY, tmp_path / "tiny.tar.gz")
    root = load_bundle(arc).root
    f = root / "model_int8.tflite"
    f.write_bytes(f.read_bytes()[:-1] + b"\x00")
    with pytest.raises(EdgecellsError, match="SHA-256 mismatch"):
        load_bundle(arc)


def _tar(path: Path, members: list[tarfile.TarInfo], data: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for m in members:
            payload = data.get(m.name)
            tf.addfile(m, io.BytesIO(payload) if payload is not None else None)
    return path


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


@pytest.mark.parametrize(
    "name, match",
    [("../evil.txt", r"escapes the bundle"), ("/evil.txt", "absolute path")],
)
def test_tar_traversal_and_absolute_paths(tmp_path: Path, name: str, match: str) -> None:
    info, data = _file(name, b"x")
    arc = _tar(tmp_path / "bad.tar.gz", [info], {name: data})
    with pytest.raises(EdgecellsError, match=match):
        extract_archive(arc, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_tar_links_are_refused(tmp_path: Path, kind: bytes) -> None:
    link = tarfile.TarInfo("b/manifest.json")
    link.type = kind
    link.linkname = "/etc/passwd" if kind == tarfile.SYMTYPE else "../../etc/passwd"
    arc = _tar(tmp_path / "link.tar.gz", [link], {})
    with pytest.raises(EdgecellsError, match="is a link"):
        load_bundle(arc, extract_to=tmp_path / "out")


def test_tar_oversized_is_refused(tmp_path: Path) -> None:
    info, data = _file("b/big.bin", b"\0" * 5000)
    arc = _tar(tmp_path / "big.tar.gz", [info], {"b/big.bin": data})
    with pytest.raises(EdgecellsError, match="too large"):
        extract_archive(arc, tmp_path / "out", max_bytes=4096)
    extract_archive(arc, tmp_path / "ok", max_bytes=10_000)  # within the limit: fine


def test_zip_traversal_symlink_and_size(tmp_path: Path) -> None:
    z1 = tmp_path / "trav.zip"
    with zipfile.ZipFile(z1, "w") as zf:
        zf.writestr("../../evil.txt", "x")
    with pytest.raises(EdgecellsError, match="escapes the bundle"):
        extract_archive(z1, tmp_path / "o1")
    z2 = tmp_path / "link.zip"
    with zipfile.ZipFile(z2, "w") as zf:
        info = zipfile.ZipInfo("b/model.tflite")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(EdgecellsError, match="is a link"):
        extract_archive(z2, tmp_path / "o2")
    z3 = tmp_path / "big.zip"
    with zipfile.ZipFile(z3, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("b/bomb.bin", b"\0" * 100_000)
    with pytest.raises(EdgecellsError, match="too large"):
        extract_archive(z3, tmp_path / "o3", max_bytes=50_000)
    z4 = tmp_path / "abs.zip"
    with zipfile.ZipFile(z4, "w") as zf:
        zf.writestr("/abs.txt", "x")
    with pytest.raises(EdgecellsError, match="absolute path"):
        extract_archive(z4, tmp_path / "o4")


def test_corrupt_archive(tmp_path: Path) -> None:
    p = tmp_path / "junk.tar.gz"
    p.write_bytes(b"this is not gzip")
    with pytest.raises(EdgecellsError, match="corrupt or unreadable archive"):
        load_bundle(p, extract_to=tmp_path / "o")


def test_symlinked_model_file_is_refused(bundle_copy: Path, tmp_path: Path) -> None:
    target = bundle_copy / "model_int8.tflite"
    outside = tmp_path / "outside.tflite"
    shutil.move(target, outside)
    target.symlink_to(outside)
    with pytest.raises(EdgecellsError, match="link or lies outside"):
        load_bundle(bundle_copy)


def test_shipped_bundle_loads_and_bundle_info() -> None:
    path = default_bundle_path()
    assert path.is_dir(), "the reference bundle must ship in edge/data/bundles/reference"
    b = load_bundle()
    assert b.model(precision="int8").precision == "int8"
    proc = subprocess.run(
        [sys.executable, "-m", "edgecells", "bundle", "info", "--json"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["verified"] is True and info["classes"] == b.classes
    assert info["input_size"] == b.input_size


def test_bundle_info_refuses_tampered(bundle_copy: Path) -> None:
    p = bundle_copy / "model_int8.onnx"
    p.write_bytes(p.read_bytes() + b"\0")
    proc = subprocess.run(
        [sys.executable, "-m", "edgecells", "bundle", "info", str(bundle_copy)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert proc.stderr.startswith("error: ") and "model_int8.onnx" in proc.stderr
    assert "Traceback" not in proc.stderr
