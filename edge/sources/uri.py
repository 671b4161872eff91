"""Source URIs: ``picam:N``, ``cv:N``, ``gst:PIPELINE``, a video file, an image file, a
folder or a glob. ``""`` means the sample frames shipped in ``edge/data/samples``."""

from __future__ import annotations

from pathlib import Path

from edgecells.edge.config import CameraConfig
from edgecells.edge.errors import EdgecellsError
from edgecells.edge.resources import SAMPLES_DIR
from edgecells.edge.sources.base import ReopeningSource, SourceBase
from edgecells.edge.sources.video import VIDEO_SUFFIXES


def parse_uri(uri: str) -> tuple[str, str]:
    """``(kind, argument)``: kind is picam, cv, gst, video or files."""
    uri = uri.strip()
    if not uri:
        return "files", str(SAMPLES_DIR)
    for kind in ("picam", "cv", "gst"):
        if uri.startswith(kind + ":"):
            arg = uri[len(kind) + 1 :].strip()
            if kind in ("picam", "cv") and not arg.isdigit():
                raise EdgecellsError(f"{uri}: expected {kind}:N with N a camera number")
            if kind == "gst" and not arg:
                raise EdgecellsError(f"{uri}: empty GStreamer pipeline")
            return kind, arg
    if Path(uri).suffix.lower() in VIDEO_SUFFIXES:
        return "video", uri
    return "files", uri


def open_source(uri: str, camera: CameraConfig | None = None) -> SourceBase:
    """A (not yet opened) source for ``uri``; cameras are wrapped to reopen on loss."""
    cam = camera or CameraConfig()
    kind, arg = parse_uri(uri)
    src: SourceBase
    if kind == "files":
        from edgecells.edge.sources.files import FileSource

        return FileSource(arg)
    if kind == "video":
        from edgecells.edge.sources.video import VideoSource

        return VideoSource(arg)
    if kind == "picam":
        from edgecells.edge.sources.picam import PiCamera

        src = PiCamera(int(arg), cam)
    elif kind == "cv":
        from edgecells.edge.sources.opencv import OpenCVCamera

        src = OpenCVCamera(int(arg), cam)
    else:
        from edgecells.edge.sources.gstreamer import GStreamerCamera

        src = GStreamerCamera(arg, cam)
    return ReopeningSource(src, cam.reopen_attempts, cam.reopen_backoff_s)
