"""Packaging rules: the device runtime imports without the host toolchain."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys
    BLOCKED = {"tensorflow", "keras", "nncf", "tf2onnx", "tf_keras"}
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
            return None
    sys.meta_path.insert(0, Block())
    """
)


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_edge_imports_without_tensorflow_nncf_tf2onnx() -> None:
    proc = _run(
        """
        import pkgutil, importlib
        import edgecells.edge as edge
        names = [m.name for m in pkgutil.walk_packages(edge.__path__, "edgecells.edge.")]
        for name in names:
            importlib.import_module(name)
        assert "edgecells.edge.stain" in names
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not leaked, leaked
        print(len(names), "modules")
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "modules" in proc.stdout


def test_cli_starts_without_tensorflow() -> None:
    proc = _run(
        """
        from edgecells.cli import app
        from typer.testing import CliRunner
        r = CliRunner().invoke(app, ["--help"])
        assert r.exit_code == 0, r.output
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not leaked, leaked
        """
    )
    assert proc.returncode == 0, proc.stderr


def test_edge_does_not_import_host_packages() -> None:
    """edge/ is the core: it imports nothing from calibration/, convert/ or the CLI."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "edge"
    offenders = []
    for f in root.rglob("*.py"):
        text = f.read_text()
        for bad in (
            "edgecells.calibration",
            "edgecells.convert",
            "edgecells.cli",
            "edgecells.commands",
        ):
            if bad in text:
                offenders.append(f"{f.name}: {bad}")
    assert not offenders, offenders


def test_python_m_edgecells_version() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "edgecells", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0
    assert proc.stdout.startswith("edgecells ")
