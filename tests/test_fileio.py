"""edge/fileio.py: the one atomic writer (fsync before rename) and its errors."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

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
