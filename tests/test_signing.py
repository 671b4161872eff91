"""Signed bundles (issue 12): Ed25519 over manifest.json, keygen / sign / verify, the
trust policy (refuse with trusted keys installed, warn without) in `bundle info`,
`bundle verify`, `screen`, `doctor` and firmware-scripts/update-bundle.sh."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from runtime_bundle import make_bundle
from typer.testing import CliRunner

from edgecells.cli import app
from edgecells.edge.bundle import load_bundle
from edgecells.edge.bundle.signing import (
    SIGNATURE_NAME,
    check_bundle,
    check_signature,
    keygen,
    load_trusted_keys,
    sign_bundle,
    trusted_key_paths,
)
from edgecells.edge.errors import EdgecellsError

ROOT = Path(__file__).resolve().parents[1]
FW = ROOT / "firmware-scripts"
TINY = ROOT / "tests" / "fixtures" / "bundle_tiny"
FRAMES = ROOT / "tests" / "fixtures" / "bccd" / "JPEGImages"


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("EDGECELLS_TRUSTED_KEYS", raising=False)
    monkeypatch.setenv("EDGECELLS_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("keys")
    good = keygen(d / "good")
    other = keygen(d / "other")
    return {"key": good[0], "pub": good[1], "other_key": other[0], "other_pub": other[1]}


@pytest.fixture(scope="module")
def unsigned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("b") / "tiny")


@pytest.fixture
def signed(unsigned: Path, keys: dict[str, Path], tmp_path: Path) -> Path:
    b = Path(shutil.copytree(unsigned, tmp_path / "signed"))
    sign_bundle(b, keys["key"])
    return b


def cli(*args: str | Path, env: dict[str, str] | None = None) -> object:
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def one_line_error(r: object, *needles: str) -> str:
    assert r.exit_code not in (0, None), r.output  # type: ignore[attr-defined]
    assert "Traceback" not in r.output  # type: ignore[attr-defined]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]  # type: ignore[attr-defined]
    assert len(errors) == 1, r.stderr  # type: ignore[attr-defined]
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


def flip_manifest_byte(b: Path) -> None:
    """One byte of manifest.json changed, the manifest still valid (a name letter)."""
    data = bytearray((b / "manifest.json").read_bytes())
    i = data.index(b'"tiny-test"') + 1
    data[i] = ord("T")
    (b / "manifest.json").write_bytes(bytes(data))
    load_bundle(b)  # still a valid bundle: only the signature can tell


# --------------------------------------------------------------------------- keys


def test_keygen_writes_a_private_key_only_the_owner_reads(tmp_path: Path) -> None:
    priv, pub, kid = keygen(tmp_path / "k")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o700
    assert b"PUBLIC KEY" in pub.read_bytes() and len(kid) == 16
    with pytest.raises(EdgecellsError, match="never overwrites"):
        keygen(tmp_path / "k")
    r = cli("bundle", "keygen", "--out", tmp_path / "k")
    one_line_error(r, "never overwrites")


def test_sign_and_verify_with_a_trusted_key(signed: Path, keys: dict[str, Path]) -> None:
    doc = json.loads((signed / SIGNATURE_NAME).read_text())
    assert doc["algorithm"] == "ed25519"
    b = load_bundle(signed)
    assert doc["manifest_sha256"] == b.manifest_sha256
    res = check_bundle(b, str(keys["pub"]))
    assert res.status == "verified" and res.warning is None
    assert b.signature["key_id"] == doc["key_id"]


def test_sign_refuses_a_bundle_that_does_not_verify(
    unsigned: Path, keys: dict[str, Path], tmp_path: Path
) -> None:
    b = Path(shutil.copytree(unsigned, tmp_path / "b"))
    (b / "model.onnx").write_bytes(b"tampered")
    one_line_error(cli("bundle", "sign", b, "--key", keys["key"]), "model.onnx")
    assert not (b / SIGNATURE_NAME).exists()
    one_line_error(cli("bundle", "sign", b, "--key", keys["pub"]), "private key")


# --------------------------------------------------------------------------- policy


def test_without_trusted_keys_unsigned_loads_with_one_warning(unsigned: Path) -> None:
    r = cli("bundle", "verify", unsigned, "--config", _config_without_keys(unsigned.parent))
    assert r.exit_code == 0, r.output
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "not signed" in warnings[0]


def test_shipped_reference_bundle_needs_no_warning_but_keys_still_rule(
    keys: dict[str, Path], tmp_path: Path
) -> None:
    """The package's own bundle is as authentic as the installed package: no warning on a
    device without keys; on a device with trusted keys it is refused like any unsigned one."""
    r = cli("bundle", "verify", "--config", _config_without_keys(tmp_path))
    assert r.exit_code == 0, r.output
    assert not [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    cfg = tmp_path / "keys.toml"
    cfg.write_text(f'[bundle]\ntrusted_keys = "{keys["pub"]}"\n')
    one_line_error(cli("bundle", "verify", "--config", cfg), "unsigned bundle refused")


def _config_without_keys(d: Path) -> Path:
    p = d / "nokeys.toml"
    p.write_text('[bundle]\ntrusted_keys = ""\n')
    return p


def test_with_trusted_keys_unsigned_and_foreign_bundles_are_refused(
    unsigned: Path, signed: Path, keys: dict[str, Path]
) -> None:
    env = {"EDGECELLS_TRUSTED_KEYS": str(keys["pub"].parent)}
    one_line_error(cli("bundle", "verify", unsigned, env=env), "unsigned bundle refused")
    one_line_error(cli("bundle", "info", unsigned, env=env), "unsigned bundle refused")
    env_other = {"EDGECELLS_TRUSTED_KEYS": str(keys["other_pub"])}
    one_line_error(cli("bundle", "verify", signed, env=env_other), "does not trust")
    r = cli("bundle", "info", signed, "--json", env=env)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["signature"]["status"] == "verified"


def test_one_byte_of_manifest_changed_is_refused(signed: Path, keys: dict[str, Path]) -> None:
    flip_manifest_byte(signed)
    env = {"EDGECELLS_TRUSTED_KEYS": str(keys["pub"])}
    one_line_error(cli("bundle", "verify", signed, env=env), "changed after signing")
    # without trusted keys too: the signature no longer matches its manifest
    one_line_error(cli("bundle", "verify", signed), "changed after signing")


def test_forged_signature_is_refused(signed: Path, keys: dict[str, Path]) -> None:
    doc = json.loads((signed / SIGNATURE_NAME).read_text())
    import base64

    sig = bytearray(base64.b64decode(doc["signature"]))
    sig[0] ^= 1
    doc["signature"] = base64.b64encode(bytes(sig)).decode()
    (signed / SIGNATURE_NAME).write_text(json.dumps(doc))
    trusted = load_trusted_keys([keys["pub"]])
    with pytest.raises(EdgecellsError, match="does not verify"):
        check_signature(signed, trusted)
    with pytest.raises(EdgecellsError, match="does not verify"):
        check_signature(signed, {})


def test_signed_by_another_key_with_its_own_key_embedded_is_refused(
    signed: Path, keys: dict[str, Path]
) -> None:
    """Re-signing a modified bundle with an attacker's key passes only where that key is
    trusted."""
    flip_manifest_byte(signed)
    sign_bundle(signed, keys["other_key"])
    with pytest.raises(EdgecellsError, match="does not trust"):
        check_signature(signed, load_trusted_keys([keys["pub"]]))


def test_trusted_key_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import edgecells.edge.bundle.signing as signing

    default = str(tmp_path / "etc-edgecells-trusted-keys")
    monkeypatch.setattr(signing, "DEFAULT_TRUSTED_KEYS", default)
    assert trusted_key_paths(default) == []  # the default may be absent
    with pytest.raises(EdgecellsError, match="trusted_keys"):
        trusted_key_paths(str(tmp_path / "missing"))
    monkeypatch.setenv("EDGECELLS_TRUSTED_KEYS", str(tmp_path / "missing"))
    with pytest.raises(EdgecellsError, match="EDGECELLS_TRUSTED_KEYS"):
        trusted_key_paths("")
    bad = tmp_path / "keys"
    bad.mkdir()
    (bad / "junk.pub").write_text("not a key")
    with pytest.raises(EdgecellsError, match="junk.pub"):
        load_trusted_keys([bad])


def test_screen_refuses_tampered_signed_bundle(
    signed: Path, keys: dict[str, Path], tmp_path: Path
) -> None:
    env = {"EDGECELLS_TRUSTED_KEYS": str(keys["pub"])}
    out = tmp_path / "ok"
    r = cli("screen", "--bundle", signed, "--source", FRAMES, "--out", out, "--frames", "1",
            "--json", env=env)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["signature"] == "verified"
    flip_manifest_byte(signed)
    out = tmp_path / "bad"
    r = cli("screen", "--bundle", signed, "--source", FRAMES, "--out", out, env=env)
    one_line_error(r, "changed after signing")
    assert not out.exists()
    other = {"EDGECELLS_TRUSTED_KEYS": str(keys["other_pub"])}
    sign_bundle(signed, keys["key"])
    r = cli("screen", "--bundle", signed, "--source", FRAMES, "--out", out, env=other)
    one_line_error(r, "does not trust")


def test_doctor_reports_the_signature(signed: Path, keys: dict[str, Path]) -> None:
    env = {"EDGECELLS_TRUSTED_KEYS": str(keys["other_pub"])}
    r = cli("doctor", "--bundle", signed, "--only", "bundle", "--json", env=env)
    assert r.exit_code == 1
    checks = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
    assert (
        checks["signature"]["status"] == "FAIL"
        and "does not trust" in checks["signature"]["detail"]
    )


def test_cached_archive_with_edited_manifest_is_not_verified(
    signed: Path, keys: dict[str, Path], tmp_path: Path
) -> None:
    arc = tmp_path / "signed.tar.gz"
    with tarfile.open(arc, "w:gz") as tf:
        tf.add(signed, arcname="signed")
    b = load_bundle(arc)
    trusted = str(keys["pub"])
    assert check_bundle(b, trusted).status == "verified"
    cached = b.root / "manifest.json"
    flip_manifest_byte(b.root)
    assert cached.read_bytes() != (signed / "manifest.json").read_bytes()
    again = load_bundle(arc)  # the cache is checked against the archive: extracted again
    assert again.manifest_sha256 == b.manifest_sha256
    assert check_bundle(again, trusted).status == "verified"


# --------------------------------------------------------------------------- device update


def update(root: Path, *args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", FW / "update-bundle.sh", "--root", root, "--python", sys.executable,
         "--no-restart", *args],
        capture_output=True, text=True, timeout=300,
        env={k: v for k, v in os.environ.items() if k != "EDGECELLS_TRUSTED_KEYS"},
    )  # fmt: skip


@pytest.mark.slow
def test_update_bundle_with_trusted_keys(keys: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "root"
    trusted = root / "etc/edgecells/trusted-keys"
    trusted.mkdir(parents=True)
    shutil.copy(keys["pub"], trusted / "fleet.pub")
    bundles = root / "var/lib/edgecells/bundles"
    # unsigned: refused, one error line, nothing installed
    plain = Path(shutil.copytree(TINY, tmp_path / "plain"))
    proc = update(root, plain)
    assert proc.returncode == 1
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "unsigned bundle refused" in errors[0], proc.stderr
    assert f"refused {plain}" in proc.stderr
    assert not (bundles / "current").exists()
    # signed with the fleet key: installed, doctor passes
    good = Path(shutil.copytree(TINY, tmp_path / "good"))
    sign_bundle(good, keys["key"])
    proc = update(root, good)
    assert proc.returncode == 0, proc.stderr
    current = os.readlink(bundles / "current")
    assert (bundles / current / SIGNATURE_NAME).is_file()
    assert "models, verified)" in proc.stdout
    # one byte of manifest changed: refused with one line, current unchanged
    bad = Path(shutil.copytree(good, tmp_path / "bad"))
    data = bytearray((bad / "manifest.json").read_bytes())
    i = data.index(b'"tiny-test"') + 1
    data[i] = ord("T")
    (bad / "manifest.json").write_bytes(bytes(data))
    proc = update(root, bad)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "changed after signing" in errors[0]
    # signed by another key: refused with one line
    other = Path(shutil.copytree(TINY, tmp_path / "other"))
    sign_bundle(other, keys["other_key"])
    proc = update(root, other)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "does not trust" in errors[0]
    assert os.readlink(bundles / "current") == current
