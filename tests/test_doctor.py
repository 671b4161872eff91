"""edgecells doctor (file source, broken bundle, self-test, Pi health) and the systemd
hooks of edgecells screen (sd_notify, watchdog, clean SIGTERM stop)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgecells.convert.selftest import make_selftest
from edgecells.edge import doctor as doc
from edgecells.edge.resources import SAMPLES_DIR
from edgecells.edge.sdnotify import ServiceHooks, StopRequested, notify, watchdog_interval_s

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "bundle_tiny"
SAMPLES = SAMPLES_DIR
PBC = ROOT / "tests" / "fixtures" / "pbc"


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgecells", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def by_name(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


def test_doctor_ok_with_a_file_source(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[session]\nsource = "{SAMPLES}"\nbundle = "{TINY}"\nout = "{tmp_path}"\n')
    proc = run_cli("doctor", "--config", cfg, "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    checks = by_name(report)
    assert report["ok"] is True
    assert checks["config"]["status"] == "OK"
    assert checks["camera"]["status"] == "OK" and "640x480" in checks["camera"]["detail"]
    assert checks["bundle"]["status"] == "OK" and "hashes verified" in checks["bundle"]["detail"]
    assert checks["pipeline"]["status"] == "OK"
    assert checks["disk"]["status"] == "OK"
    assert any(n.startswith("backend ") and c["status"] == "OK" for n, c in checks.items())
    # the human table too
    proc = run_cli("doctor", "--config", cfg, "--only", "camera,disk")
    assert proc.returncode == 0 and "camera" in proc.stdout and "OK" in proc.stdout


def test_doctor_fails_on_a_broken_bundle_and_a_missing_camera(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(TINY, bad)
    model = bad / "model_int8.tflite"
    data = bytearray(model.read_bytes())
    data[100] ^= 0x55
    model.write_bytes(bytes(data))
    proc = run_cli("doctor", "--bundle", bad, "--source", tmp_path / "nothing-here", "--json")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    checks = by_name(json.loads(proc.stdout))
    assert checks["bundle"]["status"] == "FAIL"
    assert (
        "SHA-256" in checks["bundle"]["detail"]
        and "model_int8.tflite" in (checks["bundle"]["detail"])
    )
    assert "rollback" in checks["bundle"]["fix"]
    assert checks["camera"]["status"] == "FAIL" and checks["camera"]["fix"]
    proc = run_cli("doctor", "--only", "nonsense")
    assert proc.returncode != 0 and "unknown check" in proc.stderr


def test_selftest_passes_then_catches_a_wrong_label(tmp_path: Path) -> None:
    from edgecells.edge.backends import open_classifier
    from edgecells.edge.bundle import load_bundle
    from edgecells.edge.imageio import read_image
    from edgecells.edge.preprocess import prepare_crop

    bundle = tmp_path / "bundle"
    shutil.copytree(TINY, bundle)
    b = load_bundle(bundle)
    files = sorted(PBC.rglob("*.jpg"))
    crops = [prepare_crop(read_image(p), None, b.input_size) for p in files]
    entry = make_selftest(bundle, crops, min_margin=0.0, per_class=2)
    assert entry["samples"] and all((bundle / s["path"]).is_file() for s in entry["samples"])
    b = load_bundle(bundle)  # the manifest is still valid and its files still verify
    with open_classifier(b, "auto") as clf:
        status, detail, _ = doc.run_selftest(b, clf)
        assert status == "OK", detail
        # a label the model does not give is caught
        m = json.loads((bundle / "manifest.json").read_text())
        first = m["selftest"]["samples"][0]
        first["label"] = next(c for c in b.classes if c != first["label"])
        (bundle / "manifest.json").write_text(json.dumps(m))
        b2 = load_bundle(bundle)
        status, detail, fix = doc.run_selftest(b2, clf)
        assert status == "FAIL" and "another label" in detail and "rollback" in fix
        # a modified sample image is caught too
        (bundle / first["path"]).write_bytes(b"not the sample")
        status, detail, _ = doc.run_selftest(b2, clf)
        assert status == "FAIL" and "modified" in detail


def test_selftest_needs_a_margin(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(TINY, bundle)
    with pytest.raises(Exception, match="margin"):
        make_selftest(bundle, [np.zeros((32, 32, 3), np.uint8)], min_margin=2.0)
    assert not (bundle / "selftest").exists()


def test_pi_temperature_and_throttling(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.write_bytes(b"Raspberry Pi 5 Model B Rev 1.0\0")
    temp = tmp_path / "temp"
    lim = doc.Limits()

    def run(milli_c: int, throttled: str) -> dict[str, doc.Check]:
        temp.write_text(f"{milli_c}\n")
        r = doc.Report()
        doc.check_system(r, lim, model, temp, vcgencmd=lambda: throttled)
        return {c.name: c for c in r.checks}

    c = run(52000, "throttled=0x0\n")
    assert c["temperature"].status == "OK" and c["throttling"].status == "OK"
    c = run(79000, "throttled=0x50000\n")
    assert c["temperature"].status == "WARN" and c["throttling"].status == "WARN"
    assert "under-voltage has occurred" in c["throttling"].detail
    c = run(86000, "throttled=0x50005\n")
    assert c["temperature"].status == "FAIL" and c["throttling"].status == "FAIL"
    assert "power supply" in c["throttling"].fix
    assert doc.parse_throttled("garbage") is None
    # not a Pi: no Pi checks
    r = doc.Report()
    doc.check_system(r, lim, tmp_path / "absent", temp, vcgencmd=lambda: "throttled=0x5")
    assert [c.name for c in r.checks] == ["system"] and r.ok


def test_disk_limits(tmp_path: Path) -> None:
    r = doc.Report()
    doc.check_disk(r, str(tmp_path / "not" / "yet"), doc.Limits(disk_fail_mb=10**12))
    assert r.checks[0].status == "FAIL" and str(tmp_path) in r.checks[0].detail
    r = doc.Report()
    doc.check_disk(r, str(tmp_path), doc.Limits(disk_fail_mb=0, disk_warn_mb=10**12))
    assert r.checks[0].status == "WARN"


# --------------------------------------------------------------------------- sd_notify


@pytest.fixture
def notify_socket(tmp_path: Path):
    path = tmp_path / "notify.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(60)
    yield s, str(path)
    s.close()


def test_notify_and_watchdog_rate_limit(notify_socket) -> None:
    sock, path = notify_socket
    assert notify("READY=1", {}) is False  # not under systemd: a no-op
    assert notify("READY=1", {"NOTIFY_SOCKET": path}) is True
    assert sock.recv(256) == b"READY=1"
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval_s(env) == 10.0
    assert watchdog_interval_s({**env, "WATCHDOG_PID": "1"}) is None
    now = [100.0]
    hooks = ServiceHooks(env, clock=lambda: now[0])
    assert hooks.ping() is True and sock.recv(64) == b"WATCHDOG=1"
    now[0] += 4.9
    assert hooks.ping() is False  # at most every WatchdogSec / 2
    now[0] += 0.2
    hooks.frame_done(frames=7)
    assert sock.recv(64) == b"WATCHDOG=1"
    assert sock.recv(64) == b"STATUS=screening: 7 frames"


def test_sigterm_stops_at_the_next_frame_boundary() -> None:
    hooks = ServiceHooks.install({})
    try:
        hooks.frame_done()  # nothing pending
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert hooks.stop_requested
        with pytest.raises(StopRequested):
            hooks.frame_done()
        with pytest.raises(SystemExit):  # a second SIGTERM: stop now
            hooks._on_sigterm(signal.SIGTERM, None)
    finally:
        hooks.uninstall()
    assert signal.getsignal(signal.SIGTERM) is not hooks._on_sigterm


@pytest.mark.slow
def test_screen_under_systemd_stops_cleanly_on_sigterm(tmp_path: Path, notify_socket) -> None:
    sock, path = notify_socket
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(300):  # a long slide
        shutil.copy(SAMPLES / "BloodImage_00007.jpg", frames / f"f{i:04d}.jpg")
    out = tmp_path / "session"
    env = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC="2000000")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgecells", "screen", "--source", str(frames), "--bundle",
         str(TINY), "--out", str(out), "--json"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        msgs = []
        while not any(m.startswith(b"READY=1") for m in msgs):
            msgs.append(sock.recv(256))
        while b"WATCHDOG=1" not in msgs:  # pinged from the frame loop
            msgs.append(sock.recv(256))
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is True
    rows = (out / "frames.csv").read_text().strip().splitlines()
    # stopped early, at a frame boundary: the summary counts every recorded frame
    assert 0 < summary["frames"] < 300
    assert len(rows) == summary["frames"] + 1  # header + one row per frame
    assert json.loads(stdout)["complete"] is True
