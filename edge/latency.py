"""Latency and memory measurement with constant memory (long sessions, 10,000+ frames).

:class:`LatencyStats` keeps a log-spaced histogram per stage (bins 1% wide from 1 µs
to 100 s), so percentiles are exact to about 1% whatever the session length, and memory
does not grow with the number of frames.

**Warm-up.** The first run of each stage in a process pays one-off costs (numba loading
or compiling its kernels, the inference runtime allocating its tensors, OpenCV
initializing): 400-600 ms for the stain stage against about 1 ms after. Those first runs
are kept out of the percentiles and reported on their own (``warmup`` in
:meth:`LatencyStats.to_dict`); a frame holding any first run is a warm-up frame.
``crop`` and ``inference`` only count as run on a frame that had cells.
"""

from __future__ import annotations

import math
import os
import resource
import sys
from typing import Any

import numpy as np

STAGES = ("capture", "stain", "detect", "crop", "inference", "aggregate")
_LO_MS = 1e-3
_HI_MS = 1e5
_RATIO = 1.01
_NBINS = int(math.ceil(math.log(_HI_MS / _LO_MS) / math.log(_RATIO))) + 2


class Histogram:
    """Streaming log-histogram of durations in milliseconds."""

    def __init__(self) -> None:
        self.counts = np.zeros(_NBINS, dtype=np.int64)
        self.n = 0
        self.total = 0.0
        self.max = 0.0

    def add(self, ms: float) -> None:
        if ms <= _LO_MS:
            b = 0
        else:
            b = min(_NBINS - 1, 1 + int(math.log(ms / _LO_MS) / math.log(_RATIO)))
        self.counts[b] += 1
        self.n += 1
        self.total += ms
        self.max = max(self.max, ms)

    def percentile(self, q: float) -> float:
        if self.n == 0:
            return 0.0
        rank = max(1, int(math.ceil(q / 100.0 * self.n)))
        b = int(np.searchsorted(np.cumsum(self.counts), rank))
        if b == 0:
            return _LO_MS
        # bin centre (geometric) of [LO*R^(b-1), LO*R^b)
        return min(self.max, _LO_MS * _RATIO ** (b - 0.5))

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else 0.0

    def coarse(self, bins: int = 24) -> list[tuple[float, float, int]]:
        """The distribution regrouped into at most ``bins`` log-spaced bins between the
        smallest and largest value seen: ``(lo_ms, hi_ms, count)`` per bin (for plots)."""
        nz = np.flatnonzero(self.counts)
        if self.n == 0 or len(nz) == 0:
            return []
        first, last = int(nz[0]), int(nz[-1]) + 1
        step = max(1, int(math.ceil((last - first) / bins)))
        out = []
        for b0 in range(first, last, step):
            b1 = min(last, b0 + step)
            lo = _LO_MS * _RATIO ** max(b0 - 1, 0) if b0 > 0 else 0.0
            out.append((lo, _LO_MS * _RATIO ** (b1 - 1), int(self.counts[b0:b1].sum())))
        return out

    def to_dict(self) -> dict[str, float]:
        return {
            "p50_ms": round(self.percentile(50), 4),
            "p95_ms": round(self.percentile(95), 4),
            "p99_ms": round(self.percentile(99), 4),
            "mean_ms": round(self.mean, 4),
            "n": self.n,
        }


class LatencyStats:
    """Per-stage histograms plus one for the whole frame, warm-up kept apart."""

    def __init__(self, stages: tuple[str, ...] = STAGES) -> None:
        self.stages = {s: Histogram() for s in stages}
        self.frame = Histogram()
        self.per_cell = Histogram()  # inference ms per cell
        self.warmup: dict[str, float] = {}  # each stage's first run (ms), not in the histograms
        self.warmup_frames = 0
        self.warmup_frame_ms = 0.0

    def add(self, stage: str, ms: float) -> None:
        """One timing of ``stage`` into its histogram (no warm-up logic)."""
        self.stages[stage].add(ms)

    def add_frame(self, timings: dict[str, float], frame_ms: float, cells: int) -> bool:
        """Record one frame's stage timings and total; returns True for a warm-up frame.

        A stage's first run in this process goes to :attr:`warmup` instead of its
        histogram (see the module docstring)."""
        warm = False
        for stage, ms in timings.items():
            ran = cells > 0 or stage not in ("crop", "inference")
            if ran and stage not in self.warmup:
                self.warmup[stage] = ms
                warm = True
            else:
                self.stages[stage].add(ms)
        if warm:
            self.warmup_frames += 1
            self.warmup_frame_ms += frame_ms
        else:
            self.frame.add(frame_ms)
            if cells > 0 and "inference" in timings:
                self.per_cell.add(timings["inference"] / cells)
        return warm

    def warmup_dict(self) -> dict[str, Any]:
        return {
            "frames": self.warmup_frames,
            "frame_ms": round(self.warmup_frame_ms, 3),
            "stages_ms": {k: round(v, 3) for k, v in self.warmup.items()},
        }

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {s: h.to_dict() for s, h in self.stages.items()}
        d["frame"] = self.frame.to_dict()
        d["inference_per_cell"] = self.per_cell.to_dict()
        d["warmup"] = self.warmup_dict()
        return d


def rss_mb() -> float:
    """Current resident memory of this process in MiB (Linux /proc; else peak)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024
