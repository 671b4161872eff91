"""Session output files, written so that a crash or power cut loses at most the frame in
hand.

``--out DIR`` holds:

``cells.csv``     one row per classified cell (:data:`CELL_FIELDS`), appended and flushed
                  (``fsync`` per frame) as cells are classified.
``frames.csv``    one row per frame read (:data:`FRAME_FIELDS`): status, skip reason,
                  per-stage milliseconds; written after the frame's cells, so a frame in
                  this file is complete (``--resume`` trusts it).
``summary.json``  the result so far, rewritten atomically (temporary file + rename).
``report.html``   counts, flag, confidence interval, quality, latency and a gallery of
                  abnormal and unidentified crops (``gallery/``) for a person to review.
``frames/``       annotated PNG per frame on request (boxes coloured by class).
"""

from __future__ import annotations

import csv
import errno
import html
import os
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edgecells.edge.errors import EdgecellsError
from edgecells.edge.imageio import default_file_mode, write_image
from edgecells.edge.jsonsafe import dumps

CELL_FIELDS = (
    "frame",
    "cell",
    "x",
    "y",
    "w",
    "h",
    "crop_x",
    "crop_y",
    "crop_side",
    "kind",
    "label",
    "confidence",
    "p_abnormal",
)
FRAME_FIELDS = (
    "frame",
    "name",
    "timestamp",
    "status",
    "reason",
    "cells",
    "red_cells",
    "capture_ms",
    "stain_ms",
    "detect_ms",
    "crop_ms",
    "inference_ms",
    "aggregate_ms",
)

# box colours (RGB) per class index, and for unidentified cells
PALETTE = [
    (31, 119, 180),
    (255, 127, 14),
    (214, 39, 40),
    (148, 103, 189),
    (44, 160, 44),
    (140, 86, 75),
    (227, 119, 194),
    (188, 189, 34),
    (23, 190, 207),
    (127, 127, 127),
]
UNIDENTIFIED_COLOUR = (0, 0, 0)


def disk_error(path: Path, exc: OSError) -> EdgecellsError:
    """A one-line error for a failed write; a full disk says so."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return EdgecellsError(f"{path}: disk full; rows written so far are kept", exit_code=3)
    return EdgecellsError(f"{path}: cannot write ({exc.strerror or exc})", exit_code=3)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file in the same folder, fsync, then rename."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(dumps(data, indent=2))
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, default_file_mode())  # as the CSVs (mkstemp makes 0600)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise disk_error(path, exc) from None


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(tmp, default_file_mode())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise disk_error(path, exc) from None


class CsvLog:
    """An append-only CSV with a header; each :meth:`write` is flushed to the OS."""

    def __init__(self, path: Path, fields: tuple[str, ...]) -> None:
        self.path = Path(path)
        self.fields = fields
        try:
            new = not self.path.exists() or self.path.stat().st_size == 0
            self._f = open(self.path, "a", newline="", encoding="utf-8")  # noqa: SIM115
            self._w = csv.writer(self._f)
            if new:
                self._w.writerow(fields)
                self._f.flush()
        except OSError as exc:
            raise disk_error(self.path, exc) from None

    def write(self, row: dict[str, Any]) -> None:
        try:
            self._w.writerow([_fmt(row.get(k, "")) for k in self.fields])
            self._f.flush()
        except OSError as exc:
            raise disk_error(self.path, exc) from None

    def sync(self) -> None:
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as exc:
            raise disk_error(self.path, exc) from None

    def close(self) -> None:
        try:
            self._f.close()
        except OSError:
            pass


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def read_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV log; a torn last line (crash mid-write) and lines holding NUL bytes
    are dropped."""
    p = Path(path)
    if not p.is_file():
        return []
    with open(p, newline="", encoding="utf-8") as f:
        text = f.read()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]  # drop the incomplete last line
    # a line with NUL bytes is what a power cut leaves where a row was being written
    lines = [ln for ln in text.splitlines() if "\x00" not in ln]
    return list(csv.DictReader(lines))


def rewrite_csv(path: Path, fields: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    """Replace a CSV atomically (``--resume`` drops the rows of an unfinished frame)."""
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(fields)
    for r in rows:
        w.writerow([r.get(k, "") for k in fields])
    write_text_atomic(Path(path), buf.getvalue())


def annotate_frame(
    frame: np.ndarray, cells: list[dict[str, Any]], classes: list[str]
) -> np.ndarray:
    """A copy of the frame with each detected cell's own box (``x, y, w, h``; not the
    crop square) coloured by class and short labels."""
    img = np.ascontiguousarray(frame.copy())
    for c in cells:
        label = c["label"]
        colour = (
            PALETTE[classes.index(label) % len(PALETTE)]
            if label in classes
            else UNIDENTIFIED_COLOUR
        )
        x, y, w, h = int(c["x"]), int(c["y"]), int(c["w"]), int(c["h"])
        cv2.rectangle(img, (x, y), (x + w, y + h), colour, 2)
        cv2.putText(
            img,
            f"{label} {float(c['confidence']):.2f}",
            (x, max(12, y - 4)),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.45,
            colour,
            1,
            cv2.LINE_AA,
        )
    return img


def save_png(path: Path, image: np.ndarray) -> None:
    try:
        write_image(path, image)
    except OSError as exc:
        raise disk_error(path, exc) from None


def _table(rows: list[tuple[Any, ...]], head: tuple[str, ...]) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>" for r in rows
    )
    return f"<table><tr>{th}</tr>{body}</table>"


def render_html(summary: dict[str, Any], gallery: dict[str, list[dict[str, Any]]]) -> str:
    """The human report: flag, counts, CI, quality, latency, crops to review."""
    flag = summary.get("flag", "")
    colour = {"POSITIVE": "#b00020", "NEGATIVE": "#1b7f3b"}.get(flag, "#8a6d00")
    lo, hi = summary.get("ci95", [0.0, 1.0])
    counts = summary.get("counts", {})
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>edgecells report</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:70em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
        "padding:3px 8px;text-align:right}th{background:#eee}.flag{font-size:2em;"
        f"font-weight:bold;color:{colour}}}.g img{{width:96px;height:96px;margin:2px;"
        "image-rendering:pixelated}.g figure{display:inline-block;margin:2px;"
        "font-size:70%;text-align:center}</style></head><body>",
        "<h1>edgecells screening report</h1>",
        *(
            [
                "<p style='color:#b00020;font-weight:bold'>Session ended early, not "
                f"complete: {html.escape(str(summary['error']))}</p>"
            ]
            if summary.get("error")
            else []
        ),
        f"<p class='flag'>{html.escape(flag)}</p>",
        f"<p>{html.escape(summary.get('reason', ''))}</p>",
        f"<p>Abnormal {summary.get('abnormal', 0)} of {summary.get('cells', 0)} identified "
        f"nucleated cells: {summary.get('abnormal_fraction', 0.0):.2%} "
        f"(95% Wilson CI {lo:.2%} – {hi:.2%}); unidentified {summary.get('unidentified', 0)};"
        f" platelets {summary.get('platelets', 0)}.</p>",
        "<h2>Differential count</h2>",
        _table([(k, v) for k, v in counts.items()], ("class", "cells")),
        "<h2>Frames and quality</h2>",
    ]
    q = summary.get("quality", {})
    qrows = [("frames read", summary.get("frames", 0)), ("passed", q.get("passed", 0))]
    qrows += [(f"skipped: {k}", v) for k, v in (q.get("failed") or {}).items()]
    qrows.append(("skipped: unreadable", q.get("unreadable", 0)))
    parts.append(_table(qrows, ("", "frames")))
    lat = summary.get("latency_ms", {})
    lrows = [
        (k, v.get("p50_ms", ""), v.get("p95_ms", ""), v.get("p99_ms", ""))
        for k, v in lat.items()
        if isinstance(v, dict)
    ]
    parts += ["<h2>Latency (ms)</h2>", _table(lrows, ("stage", "p50", "p95", "p99"))]
    for title, items in gallery.items():
        parts.append(f"<h2>{html.escape(title)} ({len(items)} shown)</h2><div class='g'>")
        for it in items:
            cap = f"frame {it['frame']} · {it['label']} {float(it['confidence']):.2f}"
            parts.append(
                f"<figure><img src='{html.escape(it['src'])}' alt=''>"
                f"<figcaption>{html.escape(cap)}</figcaption></figure>"
            )
        parts.append("</div>")
    run = {k: summary.get(k) for k in ("source", "bundle", "backend", "threads", "started")}
    parts.append("<h2>Run</h2>" + _table([(k, v) for k, v in run.items()], ("", "")))
    parts.append("</body></html>")
    return "\n".join(parts)
