"""A camera through OpenCV (``cv:0`` = device index 0; V4L2 on Linux, e.g. a USB camera).

Size, exposure and white balance are fixed for the session where the driver allows it
(auto exposure changes the stain statistics from frame to frame): with
``exposure_us = 0`` the camera meters for ``warmup_frames`` frames, then auto exposure
and auto white balance are switched off at the values reached.
"""

from __future__ import annotations

import cv2

from edgecells.edge.config import CameraConfig
from edgecells.edge.errors import EdgecellsError
from edgecells.edge.sources.base import CameraLost, Frame, SourceBase


class OpenCVCamera(SourceBase):
    """``cv:N``: OpenCV VideoCapture on device index N."""

    api = cv2.CAP_ANY

    def __init__(
        self, target: int | str, camera: CameraConfig | None = None, uri: str = ""
    ) -> None:
        super().__init__()
        self.target = target
        self.cfg = camera or CameraConfig()
        self.uri = uri or f"cv:{target}"
        self._cap: cv2.VideoCapture | None = None
        self._failures = 0

    def _capture(self) -> cv2.VideoCapture:
        return cv2.VideoCapture(self.target, self.api)

    def open(self) -> None:
        cap = self._capture()
        if not cap.isOpened():
            cap.release()
            raise EdgecellsError(f"{self.uri}: camera not found or busy")
        self._cap = cap
        self._configure(cap)

    def _configure(self, cap: cv2.VideoCapture) -> None:
        cfg = self.cfg
        cap.set(cv2.CAP_PROP_FRAME_WIDTH, cfg.width)
        cap.set(cv2.CAP_PROP_FRAME_HEIGHT, cfg.height)
        for _ in range(cfg.warmup_frames):  # let auto exposure / white balance settle
            cap.read()
        # lock: V4L2 takes 1 = manual exposure (0.25 for some backends), 0 = no auto WB
        cap.set(cv2.CAP_PROP_AUTO_EXPOSURE, 1)
        if cfg.exposure_us > 0:
            cap.set(cv2.CAP_PROP_EXPOSURE, cfg.exposure_us / 100.0)  # V4L2: 100 us units
        if cfg.analogue_gain > 0:
            cap.set(cv2.CAP_PROP_GAIN, cfg.analogue_gain)
        cap.set(cv2.CAP_PROP_AUTO_WB, 0)

    def read(self) -> Frame | None:
        if self._cap is None:
            raise CameraLost(f"{self.uri}: not open")
        ok, bgr = self._cap.read()
        if not ok or bgr is None:
            raise CameraLost(f"{self.uri}: no frame from the camera")
        return self._frame(bgr, bgr=True)

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None
