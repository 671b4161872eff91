"""A GStreamer pipeline through OpenCV (``gst:PIPELINE``); needs OpenCV built with
GStreamer (the pip wheels are not; on a Jetson use the system ``python3-opencv``).

The pipeline must end in ``appsink`` delivering BGR. The Jetson CSI camera (Argus)::

    gst:nvarguscamerasrc sensor-id=0 aelock=true awblock=true
        ! video/x-raw(memory:NVMM),width=1280,height=720,framerate=30/1
        ! nvvidconv ! video/x-raw,format=BGRx ! videoconvert
        ! video/x-raw,format=BGR ! appsink drop=true max-buffers=2

(one line; ``aelock``/``awblock`` lock exposure and white balance for the session, and
``exposuretimerange="20000000 20000000"`` with ``gainrange="1 1"`` fix them to known
values). A V4L2 USB camera: ``gst:v4l2src device=/dev/video0 ! videoconvert ! appsink``.
"""

from __future__ import annotations

import cv2

from edgecells.edge.config import CameraConfig
from edgecells.edge.sources.opencv import OpenCVCamera

JETSON_CSI_PIPELINE = (
    "nvarguscamerasrc sensor-id=0 aelock=true awblock=true "
    "! video/x-raw(memory:NVMM),width={width},height={height},framerate=30/1 "
    "! nvvidconv ! video/x-raw,format=BGRx ! videoconvert "
    "! video/x-raw,format=BGR ! appsink drop=true max-buffers=2"
)


class GStreamerCamera(OpenCVCamera):
    """``gst:PIPELINE``; exposure and white balance are locked in the pipeline itself."""

    api = cv2.CAP_GSTREAMER

    def __init__(self, pipeline: str, camera: CameraConfig | None = None) -> None:
        super().__init__(pipeline, camera, uri=f"gst:{pipeline}")

    def _configure(self, cap: cv2.VideoCapture) -> None:
        pass  # caps and locks are part of the pipeline string
