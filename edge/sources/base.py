"""The frame-source protocol: ``open`` / ``read`` / ``close``; frames carry index + time.

A source yields :class:`Frame` objects. ``read()`` returns ``None`` at the end (files,
video); a frame that could not be decoded comes back with ``image=None`` and ``error``
set, so the session counts it as a skip and goes on. This is where frames enter: every
image is validated and converted here, once (:meth:`SourceBase._frame` through
:func:`~edgecells.edge.imageio.as_rgb8`); the pipeline trusts ``Frame.image``.

A camera that stops delivering raises :class:`CameraLost` from ``read``;
:class:`ReopeningSource` wraps a camera and reopens it with exponential back-off,
logging each attempt, so the session continues.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from edgecells.edge.errors import EdgecellsError
from edgecells.edge.imageio import as_rgb8

log = logging.getLogger("edgecells.sources")


@dataclass
class Frame:
    """One frame: ``index`` counts from 0 per session, ``timestamp`` is ``time.time()``;
    ``image`` is RGB uint8 HxWx3, C-contiguous (or None with ``error`` set)."""

    index: int
    timestamp: float
    image: np.ndarray | None
    name: str = ""
    error: str | None = None


class CameraLost(EdgecellsError):
    """The camera stopped delivering frames (unplugged, driver reset)."""


class SourceBase:
    """Shared plumbing: frame numbering, context manager and iteration."""

    uri: str = ""

    def __init__(self) -> None:
        self._next_index = 0

    def _frame(
        self,
        image: np.ndarray | None,
        name: str = "",
        error: str | None = None,
        bgr: bool = False,
    ) -> Frame:
        """The next frame; ``image`` is validated and converted to RGB uint8 here (``bgr``:
        it is in OpenCV channel order). An unusable image gives a frame with ``error``."""
        if image is not None:
            try:
                image = as_rgb8(image, name or self.uri, bgr=bgr and image.ndim == 3)
            except EdgecellsError as exc:
                image, error = None, str(exc)
        f = Frame(self._next_index, time.time(), image, name or self.uri, error)
        self._next_index += 1
        return f

    def skip_to(self, index: int) -> None:
        """Continue numbering (and, for files, reading) from ``index`` (``--resume``)."""
        self._next_index = int(index)

    def open(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def read(self) -> Frame | None:  # pragma: no cover - overridden
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> SourceBase:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Frame]:
        while True:
            f = self.read()
            if f is None:
                return
            yield f


class ReopeningSource(SourceBase):
    """Wraps a camera; on :class:`CameraLost` reopens it with back-off and goes on.

    ``attempts`` reopenings are tried, waiting ``backoff_s``, doubling, capped at
    ``max_backoff_s``; after that the loss is final and :class:`CameraLost` propagates.
    ``events`` records what happened (for the session's report).
    """

    def __init__(
        self,
        inner: SourceBase,
        attempts: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.uri = inner.uri
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._sleep = sleep
        self.events: list[str] = []
        self.reopened = 0

    def open(self) -> None:
        self.inner.open()

    def skip_to(self, index: int) -> None:
        self.inner.skip_to(index)

    def read(self) -> Frame | None:
        try:
            return self.inner.read()
        except CameraLost as exc:
            lost = str(exc)
        wait = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            msg = f"{self.uri}: camera lost ({lost}); reopening, attempt {attempt}/{self.attempts}"
            log.warning(msg)
            self.events.append(msg)
            self._sleep(wait)
            wait = min(wait * 2, self.max_backoff_s)
            try:
                self.inner.close()
            except Exception:  # noqa: BLE001 - a dead device may fail to close
                pass
            try:
                self.inner.open()
                frame = self.inner.read()
            except CameraLost as exc:
                lost = str(exc)
                continue
            except EdgecellsError as exc:
                lost = str(exc)
                continue
            self.reopened += 1
            msg = f"{self.uri}: camera back after {attempt} attempt(s)"
            log.warning(msg)
            self.events.append(msg)
            return frame
        raise CameraLost(f"{self.uri}: camera lost and not back after {self.attempts} attempts")

    def close(self) -> None:
        self.inner.close()
