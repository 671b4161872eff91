#!/usr/bin/env bash
# Benchmark-only comparison libraries for benchmarks/bench_stain.py (not needed to use edgecells).
# staintools and histomicstk go in with --no-deps: staintools would swap in the GUI OpenCV,
# and histomicstk's large-image[sources] dependency wants GDAL. spams-bin provides the `spams`
# module staintools imports (spams' own source build fails).
set -euo pipefail
pip install -e ".[bench]"
pip install --no-deps staintools histomicstk
