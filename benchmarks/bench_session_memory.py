"""A long screening session *with* its output folder (report galleries, timeline, CSV logs):
resident memory and the size of what is written must stay bounded as frames go by.

    nice python benchmarks/bench_session_memory.py [--frames 10000] [--every 1000] [--json]

Frames: the BCCD frames (640x480) from ../shared/data/bccd when present, else the test
fixtures, cycled (numbered on, as one long slide). Bundle: the shipped reference bundle.
Prints the resident memory every ``--every`` frames, the gallery and annotated-frame file
counts, and the size of report.html. Results go in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from edgecells.edge.backends import open_classifier
    from edgecells.edge.bundle import load_bundle
    from edgecells.edge.config import Config
    from edgecells.edge.imageio import list_images, read_image
    from edgecells.edge.latency import rss_mb
    from edgecells.edge.session import Session
    from edgecells.edge.sources.base import Frame

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=10000)
    ap.add_argument("--every", type=int, default=1000)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    bccd = ROOT.parent / "shared/data/bccd/BCCD/JPEGImages"
    src = bccd if bccd.is_dir() else ROOT / "tests/fixtures/bccd/JPEGImages"
    images = [read_image(p) for p in list_images(src)[:50]]
    b = load_bundle()
    cfg = Config()
    clf = open_classifier(b, "auto", 1)
    series = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "session"
        sess = Session(cfg, b, clf, out=out, summary_every_s=5.0)
        try:
            for i in range(a.frames):
                sess.step(Frame(i, time.time(), images[i % len(images)], f"frame{i}"))
                if (i + 1) % a.every == 0:
                    series.append((i + 1, round(rss_mb(), 1)))
        finally:
            sess.close()
            clf.close()
        res = {
            "frames": a.frames,
            "source": str(src.relative_to(ROOT.parent)),
            "cells": sum(sess.timeline.cells),
            "rss_mb": series,
            "gallery_files": len(list((out / "gallery").glob("*.png"))),
            "frame_files": len(list((out / "frames").glob("*"))),
            "gallery_max_per_class": cfg.session.gallery_max,
            "timeline_bins": len(sess.timeline.cells),
            "report_kb": round((out / "report.html").stat().st_size / 1024, 1),
            "output_mb": round(
                sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20, 1
            ),
            "seconds": round(time.perf_counter() - t0, 1),
        }
    if a.json:
        print(json.dumps(res, indent=2))
        return
    for k, v in res.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
