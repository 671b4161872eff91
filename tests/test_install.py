"""The package never writes into its own install folder (a read-only system install must
work, and files left there outlive ``pip uninstall`` and shadow a later editable install).
The full README sequence in a fresh venv is ``.ci/quickstart`` (run by ``.ci/run``)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgecells.edge import fileio

PACKAGES = (
    "edgecells",
    "edgecells.edge",
    "edgecells.calibration",
    "edgecells.training",
    "edgecells.convert",
)
PACKAGE_ROOTS = sorted(
    {
        Path(p).resolve()
        for n in PACKAGES
        for p in importlib.util.find_spec(n).submodule_search_locations
    }
)


def _files(roots: list[Path]) -> set[Path]:
    return {p for r in roots for p in r.rglob("*") if p.is_file() and p.suffix != ".pyc"}


def test_user_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGECELLS_CACHE", "/x/cache")
    assert fileio.user_cache_dir("numba") == Path("/x/cache/numba")
    monkeypatch.delenv("EDGECELLS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", "/y")
    assert fileio.user_cache_dir() == Path("/y/edgecells")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert fileio.user_cache_dir() == Path.home() / ".cache" / "edgecells"


@pytest.mark.slow
def test_screen_writes_nothing_into_the_package(tmp_path: Path) -> None:
    """A first run (numba compiles and caches its kernels) leaves the package folders as
    they were; the compiled cache lands in the user cache folder."""
    before = _files(PACKAGE_ROOTS)
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "PYTHONPATH")}
    env["EDGECELLS_CACHE"] = str(tmp_path / "cache")
    proc = subprocess.run(
        [sys.executable, "-m", "edgecells", "screen", "--out", str(tmp_path / "out")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    new = sorted(str(p) for p in _files(PACKAGE_ROOTS) - before)
    assert not new, f"written into the package: {new[:10]}"
    from edgecells.edge import stain_kernels

    if stain_kernels.HAVE_NUMBA:
        assert list((tmp_path / "cache" / "numba").rglob("*.nbi")), (
            "numba cache not in the user folder"
        )


def test_unwritable_cache_compiles_without_caching(tmp_path: Path) -> None:
    """No writable cache folder: the kernels still import (no cache, nothing written)."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["EDGECELLS_CACHE"] = str(blocker / "sub")
    code = "from edgecells.edge import stain_kernels as k; print(k.NUMBA_CACHE_DIR, k._CACHE)"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["None", "False"]
