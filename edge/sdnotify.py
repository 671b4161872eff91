"""systemd service integration for ``edgecells screen``, in pure Python (no libsystemd).

* ``sd_notify``: ``READY=1`` once the model and camera are open, ``WATCHDOG=1`` after
  frames (rate-limited to twice per ``WatchdogSec``), ``STATUS=...`` for
  ``systemctl status``, ``STOPPING=1`` on the way out. Without ``$NOTIFY_SOCKET`` (not
  run by systemd) every call is a cheap no-op.
* SIGTERM (``systemctl stop``): the first one asks the session to stop at the next frame
  boundary, so the frame in hand is recorded and the summary is written as final; a
  second one stops at once.

>>> hooks = ServiceHooks.install()        # before the loop (installs the SIGTERM handler)
>>> hooks.ready("screening picam:0")      # model and source open
>>> hooks.frame_done(frames=12)           # after each frame: watchdog; raises StopRequested
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any


class StopRequested(Exception):
    """Raised between frames after SIGTERM: finish the session cleanly."""


def notify(state: str, env: dict[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd; False when not under systemd."""
    e = os.environ if env is None else env
    addr = e.get("NOTIFY_SOCKET", "")
    if not addr:
        return False
    if addr.startswith("@"):  # abstract namespace socket
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode("utf-8", "replace"))
        return True
    except OSError:
        return False


def watchdog_interval_s(env: dict[str, str] | None = None) -> float | None:
    """``WatchdogSec`` in seconds if the watchdog is on for this process, else None."""
    e = os.environ if env is None else env
    usec = e.get("WATCHDOG_USEC", "")
    pid = e.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) <= 0:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 1e6


class ServiceHooks:
    """Readiness, watchdog and a clean SIGTERM for a long-running session."""

    def __init__(
        self,
        env: dict[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.env = dict(os.environ if env is None else env)
        self.clock = clock
        self.enabled = bool(self.env.get("NOTIFY_SOCKET"))
        wd = watchdog_interval_s(self.env)
        self.ping_every_s = wd / 2 if wd else None
        self._last_ping = float("-inf")
        self.stop_requested = False
        self._previous: Any = None

    @classmethod
    def install(cls, env: dict[str, str] | None = None) -> ServiceHooks:
        """Hooks with a SIGTERM handler (main thread only; elsewhere no handler)."""
        hooks = cls(env)
        if threading.current_thread() is threading.main_thread():
            hooks._previous = signal.signal(signal.SIGTERM, hooks._on_sigterm)
        return hooks

    def uninstall(self) -> None:
        """Put back the SIGTERM handler that was there before :meth:`install`."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if self.stop_requested:  # a second SIGTERM: stop now
            raise SystemExit(128 + signum)
        self.stop_requested = True
        self._send("STOPPING=1\nSTATUS=stopping: finishing the frame in hand")

    def _send(self, state: str) -> None:
        if self.enabled:
            notify(state, self.env)

    def ready(self, status: str = "") -> None:
        """The model and the source are open: systemd considers the service started."""
        self._send("READY=1" + (f"\nSTATUS={status}" if status else ""))
        self.ping()

    def status(self, text: str) -> None:
        self._send(f"STATUS={text}")

    def ping(self) -> bool:
        """A watchdog keep-alive, sent at most every half ``WatchdogSec``."""
        if self.ping_every_s is None:
            return False
        now = self.clock()
        if now - self._last_ping < self.ping_every_s:
            return False
        self._last_ping = now
        self._send("WATCHDOG=1")
        return True

    def frame_done(self, frames: int | None = None) -> None:
        """Call after each frame: keeps the watchdog fed; raises StopRequested after SIGTERM."""
        if self.ping() and frames is not None:
            self.status(f"screening: {frames} frames")
        if self.stop_requested:
            raise StopRequested()

    def stopping(self) -> None:
        self._send("STOPPING=1")
