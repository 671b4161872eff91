"""edge/fileio.py: the one atomic writer (fsync before rename) and its errors."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest

from edgecells.edge import fileio
from edgecells.edge.errors import EdgecellsError


def test_atomic_write_fsyncs_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(
        os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1]
    )
    p = tmp_path / "sub" / "summary.json"
    fileio.write_json_atomic(p, {"a": 1})
    assert calls == ["fsync", "replace"]
    assert json.loads(p.read_text()) == {"a": 1} and p.read_text().endswith("\n")
    fileio.write_text_atomic(p, "new")
    assert p.read_text() == "new" and [f.name for f in p.parent.iterdir()] == ["summary.json"]


def test_failed_write_keeps_the_old_file_and_says_disk_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = tmp_path / "report.html"
    p.write_text("old")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(EdgecellsError, match="disk full") as exc:
        fileio.write_text_atomic(p, "new")
    assert exc.value.exit_code == 3
    assert p.read_text() == "old" and [f.name for f in tmp_path.iterdir()] == ["report.html"]


def test_two_writers_of_one_cache_file_at_once_both_succeed(tmp_path: Path) -> None:
    """Two commands filling the same cache file at the same time (two adapt runs reading
    the PBC val split) must not rename each other's temporary file away: with one fixed
    temporary name the second rename failed with FileNotFoundError."""
    import numpy as np

    p = tmp_path / "cache" / "val-64-abc.npz"

    def outer(f: Any) -> None:
        # the other process writes and renames the same file while this one is writing
        fileio.atomic_save(p, lambda g: np.savez(g, x=np.arange(3)), fsync=False)
        np.savez(f, x=np.arange(5))

    fileio.atomic_save(p, outer, fsync=False)
    with np.load(p) as z:
        assert z["x"].tolist() == [0, 1, 2, 3, 4]
    assert [q.name for q in p.parent.iterdir()] == [p.name]  # no temporary file left
