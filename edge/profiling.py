"""Profiling a bundle on a frame source: the pipeline without file output, per-stage
latency percentiles, throughput and memory (``edgecells profile``)."""

from __future__ import annotations

import time
from typing import Any

from edgecells.edge.errors import EdgecellsError
from edgecells.edge.latency import STAGES, Histogram, LatencyStats, peak_rss_mb, rss_mb
from edgecells.edge.session import Session
from edgecells.edge.sources import open_source

__all__ = ["STAGES", "Histogram", "LatencyStats", "peak_rss_mb", "profile_run", "rss_mb"]


def profile_run(
    cfg: Any,
    bundle: Any,
    classifier: Any,
    frames: int,
    tick: Any = None,
    rss_every: int = 0,
) -> dict[str, Any]:
    """Run the pipeline (no files written) over ``frames`` frames of the configured source,
    cycling it when it ends; per-stage percentiles (warm-up excluded, reported apart),
    throughput and memory.

    ``rss_every`` > 0 samples the resident memory every that many frames (``rss_mb``
    series in the result, to check that memory stays flat over long runs)."""
    sess = Session(cfg, bundle, classifier, out=None)
    src = open_source(cfg.session.source, cfg.camera)
    src.open()
    n_cells = 0
    series: list[tuple[int, float]] = []
    rss0 = rss_mb()
    t0 = time.perf_counter()
    try:
        done = 0
        while done < frames:
            c0 = time.perf_counter()
            f = src.read()
            cap = (time.perf_counter() - c0) * 1000
            if f is None:
                if done == 0:
                    raise EdgecellsError(f"{src.uri}: no frames")
                src.close()
                src.skip_to(0)
                src.open()
                continue
            f.index = done
            r = sess.step(f, cap)
            n_cells += len(r.cells)
            done += 1
            if rss_every and done % rss_every == 0:
                series.append((done, round(rss_mb(), 1)))
            if tick is not None:
                tick()
    finally:
        src.close()
    wall = time.perf_counter() - t0
    if sess.quality.unreadable >= frames:
        raise EdgecellsError(
            f"{src.uri}: all {frames} frames were unreadable; nothing was profiled"
        )
    lat = sess.pipe.latency
    stages = {
        s: {k: v for k, v in h.to_dict().items() if k.endswith("_ms")}
        for s, h in lat.stages.items()
    }
    out = {
        "backend": getattr(classifier, "backend", "?"),
        "threads": cfg.inference.threads,
        "frames": frames,
        "cells": n_cells,
        "stages": stages,
        "frame_ms": {k: v for k, v in lat.frame.to_dict().items() if k.endswith("_ms")},
        "warmup": lat.warmup_dict(),  # each stage's first run: not in the percentiles
        "fps": round(frames / wall, 2) if wall > 0 else 0.0,
        "cells_per_s": round(n_cells / wall, 2) if wall > 0 else 0.0,
        "inference_ms_per_cell": round(lat.per_cell.mean, 4),
        "rss_start_mb": round(rss0, 1),
        "rss_end_mb": round(rss_mb(), 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "quality": sess.quality.to_dict(),
    }
    if series:
        out["rss_mb"] = series
    return out
