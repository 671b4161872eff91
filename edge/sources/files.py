"""Image files as a (simulated) camera: one file, a folder (sorted, recursive) or a glob."""

from __future__ import annotations

import glob as globmod
from pathlib import Path

from edgecells.edge.errors import EdgecellsError
from edgecells.edge.imageio import IMAGE_SUFFIXES, list_images, read_image
from edgecells.edge.sources.base import Frame, SourceBase


def expand(spec: str) -> list[Path]:
    """The image files a path, folder or glob names (sorted); error when none."""
    if any(ch in spec for ch in "*?["):
        files = sorted(
            Path(p)
            for p in globmod.glob(spec, recursive=True)
            if Path(p).is_file() and Path(p).suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise EdgecellsError(f"{spec}: no image files match")
        return files
    files = list_images(spec)
    if not files:
        raise EdgecellsError(f"{spec}: no image files in this folder")
    return files


class FileSource(SourceBase):
    """Reads image files in order; an unreadable file is a frame with ``error`` set."""

    def __init__(self, spec: str) -> None:
        super().__init__()
        self.uri = spec
        self.files: list[Path] = []

    def open(self) -> None:
        self.files = expand(self.uri)

    def __len__(self) -> int:
        return len(self.files)

    def read(self) -> Frame | None:
        i = self._next_index
        if i >= len(self.files):
            return None
        path = self.files[i]
        try:
            img = read_image(path)
        except EdgecellsError as exc:
            return self._frame(None, str(path), str(exc))
        return self._frame(img, str(path))
