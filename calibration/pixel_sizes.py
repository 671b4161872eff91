"""Measured pixel sizes (µm/px) of the shared data sets, for loaders, benchmarks and the
classifier's physical field.

Method: ``edgecells.edge.scale`` (red-cell inscribed circles, 7.5 µm red cells, the
inscribed-to-diameter factor fitted on BCCD trainval and DeepBioNet train/val VOC
red-cell boxes), 40 frames, 95% bootstrap interval of the median; the VOC column is
7.5 µm / the median side of the square, untruncated VOC red-cell boxes (all frames).
Command: ``python benchmarks/bench_scale.py`` (figures in benchmarks/RESULTS.md).

DeepBioNet frames come at two scales (the source resized them): per-frame estimates fall
into two groups, 260 frames around 0.083 µm/px and 240 around 0.122 µm/px; use a
per-frame estimate (``estimate_pixel_size([frame])``) where the frame's scale matters.
PBC and LISC single-cell crops are not measured: a 200-224 px crop holds a white cell and
at most a few cut red cells, and the estimator then measures the white cell (it gave
0.062 and 0.158 µm/px, not credible); their pixel size needs another method.
"""

from __future__ import annotations

PIXEL_SIZES: dict[str, dict[str, object]] = {
    "bccd": {
        "pixel_size_um": 0.0738,
        "interval": (0.0728, 0.0752),
        "voc_pixel_size_um": 0.0721,
        "method": "red cells, first 40 of all 364 frames (sorted); VOC boxes: all frames",
    },
    "deepbionet": {
        "pixel_size_um": 0.1225,
        "groups": {"0.083": 260, "0.122": 240},
        "voc_pixel_size_um": 0.1271,
        "method": "red cells per frame, median of the larger-pixel group (240 of 500 frames); "
        "the other 260 frames are at about 0.083 um/px",
    },
}
