"""Regenerate tests/golden/stain_golden.json (only when the algorithm changes on purpose).

    python tests/golden/generate.py

Inputs are lossless PNGs (real PBC and BCCD pixels) plus a synthetic colour sweep, so
decoding is exact everywhere; outputs are pinned by SHA-256 of their raw bytes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from edgecells.edge.imageio import read_image
from edgecells.edge.stain import ReinhardNormalizer, StainTarget

HERE = Path(__file__).parent
INPUTS = ["pbc_eosinophil.png", "pbc_ig.png", "bccd_region.png"]
# A fixed target (Q10 CIELAB), independent of any fit.
FIXED_TARGET = {"mean_q10": [55000, 24000, -16000], "std_q10": [21000, 13500, 23000]}
CROP = (40, 60, 96, 80)  # y, x, h, w of the crop-path check


def sweep() -> np.ndarray:
    """A deterministic 256x256 sweep over many RGB colours, with stained and glass parts."""
    i, j = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    return np.stack([(i * 7) % 256, (j * 13) % 256, (i + j) % 256], axis=-1).astype(np.uint8)


def sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def fixed_target() -> StainTarget:
    return StainTarget(tuple(FIXED_TARGET["mean_q10"]), tuple(FIXED_TARGET["std_q10"]))


def compute(kernel: str = "auto") -> dict:
    images = {name: read_image(HERE / name) for name in INPUTS}
    images["sweep"] = sweep()
    fitted = StainTarget.fit([images[n] for n in INPUTS], kernel=kernel)
    norm = ReinhardNormalizer(fixed_target(), kernel=kernel)
    result: dict = {
        "fitted_target": {"mean_q10": list(fitted.mean_q10), "std_q10": list(fitted.std_q10)},
        "fixed_target": FIXED_TARGET,
        "images": {},
    }
    y, x, h, w = CROP
    for name, img in images.items():
        res = norm.normalize(img)
        stats = norm.frame_stats(img)
        crop = norm.transform_crop(img[y : y + h, x : x + w], stats)
        result["images"][name] = {
            "input_sha256": sha(img),
            "applied": res.applied,
            "mean_q10": list(res.stats.mean_q10),
            "std_q10": list(res.stats.std_q10),
            "threshold_q10": res.stats.threshold_q10,
            "output_sha256": sha(res.image),
            "crop_stats_mean_q10": list(stats.mean_q10),
            "crop_output_sha256": sha(crop),
        }
    return result


if __name__ == "__main__":
    out = HERE / "stain_golden.json"
    out.write_text(json.dumps(compute(), indent=2) + "\n")
    print(f"wrote {out}")
