"""``edgecells screen --export-crops DIR``: every classified cell at native resolution,
filed under its predicted class, for a technician to confirm (site adaptation).

Layout written (append-and-flush, like the session's other files)::

    DIR/index.csv                        one row per exported cell (INDEX_FIELDS)
    DIR/<predicted class>/f000123_c02_x310_y205.png
    DIR/unidentified/...                 cells below min_confidence or contradicting the detector

A crop is the square the device classified (``x, y, w, h`` in frame pixels here: the
cell row's ``crop_x, crop_y, crop_side``, the same square ``cut_crop`` cuts), clipped
to the frame: never resized, never padded. The frame's
stain statistics and size are in the row (for the record; the device normalizes each
crop with its own statistics), so :func:`device_input` later rebuilds the model input
exactly as the device made it (reflection at the frame edge, resample, normalization).
Moving a file to another class folder is the labelling step;
``edgecells adapt`` reads the folders, not the predicted label.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edgecells.edge.errors import EdgecellsError
from edgecells.edge.report import CsvLog, read_csv, rewrite_csv, save_png

INDEX_NAME = "index.csv"
INDEX_FIELDS = (
    "file",
    "frame",
    "source",
    "cell",
    "x",
    "y",
    "w",
    "h",
    "frame_w",
    "frame_h",
    "kind",
    "label",
    "confidence",
    "stain_ok",
    "stain_mean_q10",
    "stain_std_q10",
    "stain_threshold_q10",
)
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def crop_name(frame: int, cell: int, x: int, y: int) -> str:
    """``f000123_c02_x310_y205.png``: frame index, cell index, top-left of the square."""
    return f"f{frame:06d}_c{cell:02d}_x{x}_y{y}.png"


def clip_square(image: np.ndarray, x: int, y: int, w: int, h: int) -> np.ndarray:
    """The part of the square ``(x, y, w, h)`` inside the frame (no padding)."""
    fh, fw = image.shape[:2]
    x0, y0, x1, y1 = max(0, x), max(0, y), min(fw, x + w), min(fh, y + h)
    if x1 <= x0 or y1 <= y0:
        raise EdgecellsError(f"crop ({x}, {y}, {w}, {h}) lies outside the {fw}x{fh} frame")
    return image[y0:y1, x0:x1]


class CropExporter:
    """Writes crops and ``index.csv`` rows for the cells of each processed frame."""

    def __init__(self, root: str | Path, resume_before: int | None = None) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EdgecellsError(f"{self.root}: cannot create folder ({exc.strerror})") from None
        index = self.root / INDEX_NAME
        if index.exists():
            if resume_before is None:
                raise EdgecellsError(
                    f"{self.root}: holds exported crops already (index.csv); choose another "
                    "--export-crops folder (or --resume the session that wrote it)"
                )
            rows = read_csv(index)
            kept = [r for r in rows if r.get("frame", "").isdigit()]
            kept = [r for r in kept if int(r["frame"]) < resume_before]
            if len(kept) != len(rows):
                rewrite_csv(index, INDEX_FIELDS, kept)
        self._log = CsvLog(index, INDEX_FIELDS)
        self.n = 0

    def add(
        self,
        image: np.ndarray,
        frame: int,
        source: str,
        cells: list[dict[str, Any]],
        stats: Any,
    ) -> None:
        """Export the cells of one frame (``cells``: the pipeline's cell dicts)."""
        fh, fw = image.shape[:2]
        ok = bool(stats is not None and stats.ok)
        for c in cells:
            if "crop_side" in c:  # the pipeline's rows: x, y, w, h is the cell's own box
                x, y = int(c["crop_x"]), int(c["crop_y"])
                w = h = int(c["crop_side"])
            else:
                x, y, w, h = int(c["x"]), int(c["y"]), int(c["w"]), int(c["h"])
            label = _SAFE.sub("_", str(c["label"])) or "unidentified"
            rel = f"{label}/{crop_name(frame, int(c['cell']), x, y)}"
            save_png(self.root / rel, clip_square(image, x, y, w, h))
            self._log.write(
                {
                    "file": rel,
                    "frame": frame,
                    "source": source,
                    "cell": c["cell"],
                    "x": x,
                    "y": y,
                    "w": w,
                    "h": h,
                    "frame_w": fw,
                    "frame_h": fh,
                    "kind": c.get("kind", ""),
                    "label": c["label"],
                    "confidence": float(c["confidence"]),
                    "stain_ok": int(ok),
                    "stain_mean_q10": " ".join(str(v) for v in stats.mean_q10) if ok else "",
                    "stain_std_q10": " ".join(str(v) for v in stats.std_q10) if ok else "",
                    "stain_threshold_q10": int(stats.threshold_q10) if ok else "",
                }
            )
            self.n += 1

    def sync(self) -> None:
        self._log.sync()

    def close(self) -> None:
        self._log.close()


def pad_to_square(crop: np.ndarray, row: dict[str, str]) -> np.ndarray:
    """Undo the clipping: reflect the crop at the frame edges it was clipped at, exactly as
    :func:`edgecells.edge.detect.cut_crop` reflected the frame."""
    try:
        x, y, w, h = (int(row[k]) for k in ("x", "y", "w", "h"))
        fw, fh = int(row["frame_w"]), int(row["frame_h"])
    except (KeyError, ValueError):
        raise EdgecellsError(f"index row {row.get('file')}: malformed geometry") from None
    pad_l, pad_t = max(0, -x), max(0, -y)
    pad_r, pad_b = max(0, x + w - fw), max(0, y + h - fh)
    inner_w, inner_h = w - pad_l - pad_r, h - pad_t - pad_b
    if crop.shape[:2] != (inner_h, inner_w):
        raise EdgecellsError(
            f"{row.get('file')}: image is {crop.shape[1]}x{crop.shape[0]} but index.csv "
            f"says {inner_w}x{inner_h} (edited or replaced?)"
        )
    if not (pad_l or pad_t or pad_r or pad_b):
        return crop
    mode = cv2.BORDER_REFLECT_101 if min(crop.shape[:2]) > 1 else cv2.BORDER_REPLICATE
    try:
        return cv2.copyMakeBorder(crop, pad_t, pad_b, pad_l, pad_r, mode)
    except cv2.error:
        return cv2.copyMakeBorder(crop, pad_t, pad_b, pad_l, pad_r, cv2.BORDER_REPLICATE)


def device_input(
    crop: np.ndarray,
    row: dict[str, str] | None,
    normalizer: Any,
    size: int,
    pixel_size_um: float | None = None,
    model_pixel_um: float | None = None,
) -> np.ndarray:
    """The model input the device made for an exported crop (``row``: its index.csv row).

    An exported square already spans the model's field (the pipeline cut it at
    ``crop_side``), so it is reflected back to the full square, resampled whole and
    normalized with its own (resampled) statistics — :func:`prepare_cell`'s steps. A crop
    without a row is a single-cell image: :func:`prepare_crop`, cut at the model's field
    when both pixel sizes are given (``edgecells classify --pixel-size``), else the centre
    square resampled whole (legacy)."""
    from edgecells.edge.preprocess import prepare_crop

    if row is None:
        return prepare_crop(crop, normalizer, size, pixel_size_um, model_pixel_um)
    return prepare_crop(pad_to_square(crop, row), normalizer, size)


def read_index(root: str | Path) -> dict[str, dict[str, str]]:
    """index.csv rows keyed by crop file name (the name survives moving between folders)."""
    rows = read_csv(Path(root) / INDEX_NAME)
    return {Path(r["file"]).name: r for r in rows if r.get("file")}
