"""A video file as a (simulated) camera, read with OpenCV."""

from __future__ import annotations

from pathlib import Path

import cv2

from edgecells.edge.errors import EdgecellsError
from edgecells.edge.sources.base import Frame, SourceBase

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm", ".mjpeg", ".mjpg")


class VideoSource(SourceBase):
    """Frames of a video file until its end; a frame that fails to convert is a skip."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.uri = path
        self._cap: cv2.VideoCapture | None = None

    def open(self) -> None:
        p = Path(self.uri)
        if not p.is_file():
            raise EdgecellsError(f"{p}: no such video file")
        cap = cv2.VideoCapture(str(p))
        if not cap.isOpened():
            raise EdgecellsError(f"{p}: not a readable video")
        self._cap = cap
        if self._next_index:
            cap.set(cv2.CAP_PROP_POS_FRAMES, self._next_index)

    def skip_to(self, index: int) -> None:
        super().skip_to(index)
        if self._cap is not None:
            self._cap.set(cv2.CAP_PROP_POS_FRAMES, index)

    def __len__(self) -> int:
        return int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT)) if self._cap is not None else 0

    def read(self) -> Frame | None:
        if self._cap is None:
            raise EdgecellsError(f"{self.uri}: video not opened")
        ok, bgr = self._cap.read()
        if not ok or bgr is None:
            return None
        return self._frame(bgr, bgr=True)

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None
