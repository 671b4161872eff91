"""Size and speed of the reference cell classifier against the edge targets.

Prints parameters, FLOPs per image (target <= 100 M), the int8 TFLite file size of a
bundle (target <= 1 MB) and per-image latency of the float Keras model and of the
bundle's int8 TFLite model (LiteRT, batch 1 and batch 32, single thread).

    python benchmarks/bench_classifier.py [--model models/reference/model.keras]
        [--bundle BUNDLE_DIR] [--repeat 200]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _time(fn, x: np.ndarray, repeat: int) -> float:
    fn(x)  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn(x)
    return (time.perf_counter() - t0) * 1000.0 / (repeat * len(x))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "reference" / "model.keras"))
    ap.add_argument("--bundle", default=None, help="bundle folder with a tflite-int8 model")
    ap.add_argument("--repeat", type=int, default=200)
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    from edgecells.training.model import count_flops

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    model = keras.models.load_model(args.model, compile=False)
    size = int(model.input_shape[1])
    flops = count_flops(model)
    print(f"model {args.model}: input {size}px, {model.count_params():,} parameters")
    print(
        f"FLOPs/image: {flops / 1e6:.1f} M (target <= 100 M: {'PASS' if flops <= 1e8 else 'FAIL'})"
    )
    rng = np.random.default_rng(0)
    x1 = rng.integers(0, 256, (1, size, size, 3)).astype(np.float32)
    x32 = rng.integers(0, 256, (32, size, size, 3)).astype(np.float32)
    f = tf.function(lambda a: model(a, training=False))
    print(
        f"keras float32, 1 thread: batch 1 {_time(f, x1, args.repeat):.3f} ms/image, "
        f"batch 32 {_time(f, x32, max(1, args.repeat // 10)):.3f} ms/image"
    )
    if args.bundle:
        from edgecells.edge.backends import open_classifier
        from edgecells.edge.bundle import load_bundle

        b = load_bundle(args.bundle)
        m = b.model("tflite", "int8")
        size_b = m.total_bytes
        print(
            f"int8 TFLite: {size_b:,} bytes (target <= 1 MB: "
            f"{'PASS' if size_b <= 1_000_000 else 'FAIL'})"
        )
        clf = open_classifier(b, backend="litert", threads=1)
        u1, u32 = x1.astype(np.uint8), x32.astype(np.uint8)
        print(
            f"int8 LiteRT, 1 thread: batch 1 {_time(clf.predict, u1, args.repeat):.3f} "
            f"ms/image, batch 32 {_time(clf.predict, u32, max(1, args.repeat // 10)):.3f} "
            "ms/image"
        )


if __name__ == "__main__":
    main()
