"""Packaging rules: the device runtime imports without the host toolchain."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

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


# Imports point one way: CLI -> convert -> training -> calibration -> edge (DESIGN.md).
LAYERS = ["edge", "calibration", "training", "convert"]
PACKAGE_OF = {
    "edge": "edgecells.edge",
    "calibration": "edgecells.calibration",
    "training": "edgecells.training",
    "convert": "edgecells.convert",
}


def _imported_modules(path: Path) -> set[str]:
    import ast

    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_imports_point_one_way() -> None:
    """A layer imports only the layers below it (lazy imports inside functions count)."""
    root = Path(__file__).resolve().parents[1]
    offenders = []
    for i, layer in enumerate(LAYERS):
        forbidden = [PACKAGE_OF[x] for x in LAYERS[i + 1 :]] + [
            "edgecells.cli",
            "edgecells.commands",
        ]
        for f in (root / layer).rglob("*.py"):
            for mod in _imported_modules(f):
                if any(mod == b or mod.startswith(b + ".") for b in forbidden):
                    offenders.append(f"{f.relative_to(root)}: {mod}")
    assert not offenders, offenders


def test_no_import_cycles_between_modules() -> None:
    """No two modules import each other, directly or through a chain (module-level and
    lazy imports alike)."""
    root = Path(__file__).resolve().parents[1]
    graph: dict[str, set[str]] = {}
    for layer, pkg in PACKAGE_OF.items():
        for f in (root / layer).rglob("*.py"):
            rel = f.relative_to(root / layer).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            graph[name] = set()
            for mod in _imported_modules(f):
                graph[name].add(mod)
    names = set(graph)
    edges = {n: {m for m in deps if m in names and m != n} for n, deps in graph.items()}
    # packages (__init__) re-export their children: ignore parent -> child edges
    edges = {n: {m for m in d if not m.startswith(n + ".")} for n, d in edges.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for m in sorted(edges[n]):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m) :] + [m] if m in stack else [n, m])
            elif m not in state:
                visit(m, [*stack, m])
        state[n] = 2

    for n in sorted(edges):
        if n not in state:
            visit(n, [n])
    assert not cycles, cycles


def test_python_m_edgecells_version() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "edgecells", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0
    assert proc.stdout.startswith("edgecells ")
