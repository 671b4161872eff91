"""Raspberry Pi camera via picamera2 (``picam:N``), imported only when opened.

Resolution, exposure and white balance are locked for the session: auto exposure and
auto white balance change the stain statistics from frame to frame. Fixed values come
from ``[camera]`` (``exposure_us``, ``analogue_gain``, ``awb_gains``); a value left at 0 /
``[]`` is metered once, over ``warmup_frames`` frames with the automatic algorithms on,
and then frozen.
"""

from __future__ import annotations

from typing import Any

from edgecells.edge.config import CameraConfig
from edgecells.edge.errors import EdgecellsError
from edgecells.edge.sources.base import CameraLost, Frame, SourceBase


class PiCamera(SourceBase):
    """``picam:N``: camera number N of picamera2."""

    def __init__(self, num: int = 0, camera: CameraConfig | None = None) -> None:
        super().__init__()
        self.num = num
        self.cfg = camera or CameraConfig()
        self.uri = f"picam:{num}"
        self._cam: Any = None
        self.locked: dict[str, Any] = {}

    def open(self) -> None:
        try:
            from picamera2 import Picamera2  # type: ignore[import-not-found]
        except ImportError:
            raise EdgecellsError(
                f"{self.uri}: picamera2 is not installed (on Raspberry Pi OS: "
                "sudo apt install python3-picamera2)"
            ) from None
        try:
            cam = Picamera2(self.num)
        except (IndexError, RuntimeError) as exc:
            raise EdgecellsError(f"{self.uri}: camera not found ({exc})") from None
        cfg = self.cfg
        # picamera2's "RGB888" is BGR in memory order; we ask for it and swap once
        conf = cam.create_video_configuration(
            main={"size": (cfg.width, cfg.height), "format": "RGB888"}, buffer_count=4
        )
        cam.configure(conf)
        cam.start()
        self._cam = cam
        self._lock(cam)

    def _lock(self, cam: Any) -> None:
        cfg = self.cfg
        for _ in range(cfg.warmup_frames):
            cam.capture_array("main")
        meta = cam.capture_metadata()
        exposure = cfg.exposure_us or int(meta.get("ExposureTime", 10000))
        gain = cfg.analogue_gain or float(meta.get("AnalogueGain", 1.0))
        gains = tuple(cfg.awb_gains) if cfg.awb_gains else tuple(meta.get("ColourGains", (1, 1)))
        self.locked = {
            "AeEnable": False,
            "AwbEnable": False,
            "ExposureTime": int(exposure),
            "AnalogueGain": float(gain),
            "ColourGains": (float(gains[0]), float(gains[1])),
        }
        cam.set_controls(self.locked)

    def read(self) -> Frame | None:
        if self._cam is None:
            raise CameraLost(f"{self.uri}: not open")
        try:
            arr = self._cam.capture_array("main")
        except Exception as exc:  # noqa: BLE001 - libcamera raises various errors
            raise CameraLost(f"{self.uri}: {exc}") from None
        return self._frame(arr[:, :, :3], bgr=True)  # BGR(X) -> RGB

    def close(self) -> None:
        if self._cam is not None:
            try:
                self._cam.stop()
                self._cam.close()
            finally:
                self._cam = None
