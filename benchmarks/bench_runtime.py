"""Device-runtime benchmark: per-stage latency, frames/s, cells/s for each backend and
thread count, and resident memory over a long run (flat = no leak).

    nice python benchmarks/bench_runtime.py [--bundle B] [--frames 300]
        [--long 10000] [--backends litert,onnxruntime,openvino] [--threads 1,2] [--json]

Frames: the BCCD frames (640x480) from ../shared/data/bccd when present, else the test
fixtures; the source cycles. Bundle: the shipped reference bundle when present, else the
tiny test bundle (tests/fixtures/bundle_tiny). Results go in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from edgecells.edge.backends import available_backends, open_classifier
    from edgecells.edge.bundle import default_bundle_path, load_bundle
    from edgecells.edge.config import Config
    from edgecells.edge.profiling import profile_run

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--source", default=None)
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--long", type=int, default=10000, help="frames of the memory run (0: skip)")
    ap.add_argument("--backends", default="litert,onnxruntime,openvino")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    bundle = a.bundle
    if bundle is None:
        ref = default_bundle_path()
        bundle = str(
            ref if (ref / "manifest.json").is_file() else ROOT / "tests/fixtures/bundle_tiny"
        )
    source = a.source
    if source is None:
        bccd = ROOT.parent / "shared/data/bccd/BCCD/JPEGImages"
        source = str(bccd if bccd.is_dir() else ROOT / "tests/fixtures/bccd/JPEGImages")
    b = load_bundle(bundle)
    precision = "int8" if b.formats("int8") else "float32"
    have = available_backends()
    runs = []
    for be in a.backends.split(","):
        if be not in have:
            continue
        for th in (int(t) for t in a.threads.split(",")):
            cfg = Config()
            cfg.session.source = source
            cfg.inference.threads = th
            clf = open_classifier(b, be, th, precision=precision)
            try:
                profile_run(cfg, b, clf, 20)  # warm-up (JIT, caches)
                r = profile_run(cfg, b, clf, a.frames)
            finally:
                clf.close()
            runs.append(r)
            if not a.json:
                st = r["stages"]
                print(
                    f"{be:12s} x{th}: {r['fps']:6.1f} frames/s {r['cells_per_s']:7.1f} cells/s "
                    f"inference {r['inference_ms_per_cell']:.3f} ms/cell | p50 ms "
                    + " ".join(f"{k} {v['p50_ms']:.2f}" for k, v in st.items())
                    + f" | frame p95 {r['frame_ms']['p95_ms']:.1f} ms"
                )
    long = None
    if a.long:
        cfg = Config()
        cfg.session.source = source
        be = "litert" if "litert" in have else have[0]
        clf = open_classifier(b, be, 1, precision=precision)
        try:
            long = profile_run(cfg, b, clf, a.long, rss_every=max(1, a.long // 20))
        finally:
            clf.close()
        series = long["rss_mb"]
        # growth between the first sample after warm-up and the end
        growth = series[-1][1] - series[1][1] if len(series) > 1 else 0.0
        long["rss_growth_mb"] = round(growth, 1)
        if not a.json:
            print(
                f"memory over {a.long} frames ({be} x1): "
                + " ".join(f"{n}:{m:.0f}" for n, m in series)
                + f" MiB; growth after warm-up {growth:+.1f} MiB; {long['fps']:.1f} frames/s"
            )
    info = {
        "bundle": str(bundle),
        "precision": precision,
        "source": source,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "python": platform.python_version(),
    }
    if a.json:
        print(json.dumps({"info": info, "runs": runs, "long": long}, indent=2))
    else:
        print(json.dumps(info))


if __name__ == "__main__":
    main()
