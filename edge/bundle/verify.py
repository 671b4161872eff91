"""File integrity: SHA-256 and size of every file a manifest lists."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from edgecells.edge.bundle.manifest import MANIFEST_NAME, FileEntry, ModelEntry
from edgecells.edge.errors import EdgecellsError

_HASH_CHUNK = 1 << 20


# --------------------------------------------------------------------------- hashing


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_entry(root: str | os.PathLike[str], relpath: str) -> FileEntry:
    """A :class:`FileEntry` for ``root/relpath`` (posix relative path)."""
    p = Path(root) / relpath
    return FileEntry(path=relpath, sha256=sha256_file(p), bytes=p.stat().st_size)


def verify_files(root: Path, models: list[ModelEntry], extra: Iterable[FileEntry] = ()) -> None:
    """Check size and SHA-256 of every listed file (model files, then ``extra`` such as
    the self-test samples); EdgecellsError naming the file."""
    rroot = root.resolve()
    entries = [f for m in models for f in m.files] + list(extra)
    for f in entries:
        p = root / f.path
        if p.is_symlink() or (p.exists() and not p.resolve().is_relative_to(rroot)):
            raise EdgecellsError(f"{p}: is a link or lies outside the bundle (refused)")
        if not p.is_file():
            raise EdgecellsError(f"{p}: missing (listed in {MANIFEST_NAME})")
        size = p.stat().st_size
        if size != f.bytes:
            what = "truncated" if size < f.bytes else "wrong size"
            raise EdgecellsError(
                f"{p}: {what} ({size} bytes, manifest says {f.bytes}); the file is "
                "damaged or does not belong to this bundle"
            )
        if sha256_file(p) != f.sha256:
            raise EdgecellsError(
                f"{p}: SHA-256 mismatch (file modified or corrupted); refusing to load it"
            )
