"""Frame sources: files, folders, globs, video, URIs, and a camera that fails and returns."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from edgecells.edge.errors import EdgecellsError
from edgecells.edge.resources import SAMPLES_DIR
from edgecells.edge.sources import CameraLost, ReopeningSource, open_source, parse_uri
from edgecells.edge.sources.base import SourceBase
from edgecells.edge.sources.files import FileSource
from edgecells.edge.sources.video import VideoSource

BCCD = Path(__file__).parent / "fixtures" / "bccd" / "JPEGImages"


def test_parse_uri_kinds() -> None:
    assert parse_uri("picam:0") == ("picam", "0")
    assert parse_uri("cv:2") == ("cv", "2")
    assert parse_uri("gst:videotestsrc ! appsink") == ("gst", "videotestsrc ! appsink")
    assert parse_uri("slide.mp4") == ("video", "slide.mp4")
    assert parse_uri("frames/*.jpg") == ("files", "frames/*.jpg")
    assert parse_uri("") == ("files", str(SAMPLES_DIR))
    with pytest.raises(EdgecellsError, match="camera number"):
        parse_uri("cv:front")
    with pytest.raises(EdgecellsError, match="empty GStreamer"):
        parse_uri("gst:")


def test_folder_source_frames_have_index_and_time() -> None:
    with open_source(str(BCCD)) as src:
        frames = list(src)
    assert [f.index for f in frames] == list(range(6))
    assert all(f.image is not None and f.image.shape == (480, 640, 3) for f in frames)
    ts = [f.timestamp for f in frames]
    assert ts == sorted(ts) and ts[0] > 1e9
    assert frames[0].name.endswith("BloodImage_00007.jpg")


def test_single_file_and_glob() -> None:
    one = str(BCCD / "BloodImage_00011.jpg")
    with open_source(one) as src:
        assert len(list(src)) == 1
    with open_source(str(BCCD / "BloodImage_0001*.jpg")) as src:
        names = [Path(f.name).name for f in src]
    assert names == [f"BloodImage_000{n}.jpg" for n in (11, 15, 16, 18, 19)]
    with pytest.raises(EdgecellsError, match="no image files match"):
        open_source(str(BCCD / "nothing*.png")).open()


def test_default_source_is_the_shipped_samples() -> None:
    with open_source("") as src:
        assert len(list(src)) >= 3


def test_odd_and_broken_files(tmp_path: Path) -> None:
    rgb = np.full((40, 50, 3), 120, np.uint8)
    cv2.imwrite(str(tmp_path / "a_gray.png"), rgb[:, :, 0])
    cv2.imwrite(str(tmp_path / "b_rgba.png"), np.dstack([rgb, np.full((40, 50), 255, np.uint8)]))
    cv2.imwrite(str(tmp_path / "c_16bit.png"), rgb.astype(np.uint16) * 257)
    (tmp_path / "d_broken.jpg").write_bytes(b"not a jpeg at all")
    (tmp_path / "e_empty.png").write_bytes(b"")
    with FileSource(str(tmp_path)) as src:
        frames = list(src)
    assert len(frames) == 5
    for f in frames[:3]:
        assert f.error is None and f.image.shape == (40, 50, 3) and f.image.dtype == np.uint8
        assert int(f.image[0, 0, 0]) == 120
    assert frames[3].image is None and "d_broken.jpg" in frames[3].error
    assert frames[4].image is None and "empty file" in frames[4].error


def test_resume_skips_files() -> None:
    src = FileSource(str(BCCD))
    src.open()
    src.skip_to(4)
    frames = list(src)
    assert [f.index for f in frames] == [4, 5]


def test_video_source(tmp_path: Path) -> None:
    path = tmp_path / "slide.avi"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    assert w.isOpened()
    for i in range(7):
        frame = np.zeros((48, 64, 3), np.uint8)
        frame[:, :, 2] = 30 * i  # red ramp (BGR)
        w.write(frame)
    w.release()
    with open_source(str(path)) as src:
        assert isinstance(src, VideoSource)
        frames = list(src)
    assert [f.index for f in frames] == list(range(7))
    reds = [int(f.image[:, :, 0].mean()) for f in frames]  # RGB: red first
    assert reds == sorted(reds) and reds[-1] > 150
    with pytest.raises(EdgecellsError, match="no such video"):
        open_source(str(tmp_path / "missing.mp4")).open()


class FlakyCamera(SourceBase):
    """Delivers frames, vanishes after ``fail_at`` for ``down`` reopen attempts, returns."""

    def __init__(self, fail_at: int, down: int) -> None:
        super().__init__()
        self.uri = "fake:0"
        self.fail_at, self.down = fail_at, down
        self.opens = 0
        self.reads = 0

    def open(self) -> None:
        self.opens += 1
        if 1 < self.opens <= 1 + self.down:
            raise EdgecellsError("fake:0: camera not found")

    def read(self):  # noqa: ANN201
        self.reads += 1
        if self.reads == self.fail_at:
            raise CameraLost("fake:0: no frame")
        return self._frame(np.zeros((8, 8, 3), np.uint8))


def test_camera_that_fails_and_comes_back() -> None:
    sleeps: list[float] = []
    cam = ReopeningSource(
        FlakyCamera(fail_at=3, down=2), attempts=5, backoff_s=0.1, sleep=sleeps.append
    )
    cam.open()
    frames = [cam.read() for _ in range(6)]
    assert [f.index for f in frames] == list(range(6))  # no gap, session goes on
    assert sleeps == [0.1, 0.2, 0.4]  # back-off doubles
    assert cam.reopened == 1
    assert any("camera back after 3 attempt" in e for e in cam.events)


def test_camera_that_never_comes_back() -> None:
    cam = ReopeningSource(
        FlakyCamera(fail_at=2, down=99), attempts=3, backoff_s=0.0, sleep=lambda s: None
    )
    cam.open()
    cam.read()
    with pytest.raises(CameraLost, match="not back after 3 attempts"):
        cam.read()


def test_missing_opencv_camera_is_a_clear_error() -> None:
    src = open_source("cv:57")
    with pytest.raises(EdgecellsError, match="cv:57: camera not found"):
        src.open()


def test_picamera_missing_is_a_clear_error() -> None:
    pytest.importorskip("numpy")
    try:
        import picamera2  # noqa: F401
    except ImportError:
        with pytest.raises(EdgecellsError, match="picamera2 is not installed"):
            open_source("picam:0").open()
    else:  # pragma: no cover - on a Pi
        pytest.skip("picamera2 installed")


def test_frames_are_validated_once_where_they_enter() -> None:
    """A source converts what the camera gives (BGR, gray, 16-bit) to RGB uint8 once; an
    unusable image is a frame with ``error``; a valid RGB array passes through uncopied."""
    from edgecells.edge.imageio import as_rgb8
    from edgecells.edge.sources.base import SourceBase

    src = SourceBase()
    bgr = np.zeros((4, 5, 3), np.uint8)
    bgr[..., 0] = 255  # blue in OpenCV order
    f = src._frame(bgr, "cam", bgr=True)
    assert f.image.flags.c_contiguous and f.image[0, 0].tolist() == [0, 0, 255]
    assert src._frame(np.full((4, 5), 65535, np.uint16)).image.max() == 255
    bad = src._frame(np.zeros((4, 5, 7), np.uint8), "cam")
    assert bad.image is None and "channels" in bad.error and bad.index == 2
    assert as_rgb8(f.image) is f.image  # already converted: no copy, no second pass
