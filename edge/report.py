"""Session output files, written so that a crash or power cut loses at most the frame in
hand.

``--out DIR`` holds:

``cells.csv``     one row per classified cell (:data:`CELL_FIELDS`), appended and flushed
                  (``fsync`` per frame) as cells are classified.
``frames.csv``    one row per frame read (:data:`FRAME_FIELDS`): status, skip reason,
                  per-stage milliseconds; written after the frame's cells, so a frame in
                  this file is complete (``--resume`` trusts it).
``summary.json``  the result so far, rewritten atomically (temporary file + rename).
``report.html``   one self-contained page (inline CSS and SVG, no script, no network):
                  the flag in colour with its reason, the differential as a bar chart
                  with 95% intervals, cells per frame, per-class galleries of cells cut
                  from the frame at native resolution (``gallery/``), quality, latency
                  (distribution, warm-up apart) — see :func:`render_html`.
``frames/``       annotated frames (boxes coloured by class): a PNG per frame with
                  ``--annotate``, else a JPEG for each frame holding a gallery cell (what
                  a gallery image links to).
"""

from __future__ import annotations

import csv
import html
import math
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edgecells.edge.fileio import disk_error, write_json_atomic, write_text_atomic
from edgecells.edge.imageio import write_image
from edgecells.edge.screening import NON_NUCLEATED, wilson_interval

__all__ = [
    "CELL_FIELDS",
    "FRAME_FIELDS",
    "CsvLog",
    "Timeline",
    "annotate_frame",
    "cell_box",
    "disk_error",
    "read_csv",
    "render_html",
    "rewrite_csv",
    "save_png",
    "write_json_atomic",
    "write_text_atomic",
]

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


def cell_box(cell: dict[str, Any], shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """The region to show for a cell, ``(x0, y0, x1, y1)`` clipped to a frame of ``shape``.

    The detected cell's own box, with a quarter of its larger side as margin: ``x/y/w/h``
    in rows that carry the crop square separately (``crop_x/crop_y/crop_side``, the
    pipeline's rows), or ``box_x/box_y/box_w/box_h``; else (older rows) the classifier's
    crop square ``x/y/w/h``. Cut from the frame itself, never padded or mirrored."""
    h_img, w_img = int(shape[0]), int(shape[1])
    own = None
    if all(cell.get(k) not in (None, "") for k in ("box_x", "box_y", "box_w", "box_h")):
        own = ("box_x", "box_y", "box_w", "box_h")
    elif cell.get("crop_side") not in (None, ""):
        own = ("x", "y", "w", "h")
    if own is not None:
        x, y, w, h = (float(cell[k]) for k in own)
        m = 0.25 * max(w, h)
        x, y, w, h = x - m, y - m, w + 2 * m, h + 2 * m
    else:
        x, y, w, h = (float(cell[k]) for k in ("x", "y", "w", "h"))
    x0, y0 = max(0, int(math.floor(x))), max(0, int(math.floor(y)))
    x1, y1 = min(w_img, int(math.ceil(x + w))), min(h_img, int(math.ceil(y + h)))
    return x0, y0, max(x0, x1), max(y0, y1)


class Timeline:
    """Cells and abnormal cells per frame in at most ``max_bins`` bins (constant memory:
    when the bins are full, neighbours merge and each bin covers twice the frames)."""

    def __init__(self, max_bins: int = 200) -> None:
        self.max_bins = max(2, max_bins - max_bins % 2)
        self.width = 1  # frames per bin
        self.cells: list[int] = []
        self.abnormal: list[int] = []
        self.first = -1  # index of the first frame

    def add(self, index: int, cells: int, abnormal: int) -> None:
        if self.first < 0:
            self.first = index
        b = max(0, index - self.first) // self.width
        while b >= self.max_bins:
            self.cells = [sum(self.cells[i : i + 2]) for i in range(0, len(self.cells), 2)]
            self.abnormal = [sum(self.abnormal[i : i + 2]) for i in range(0, len(self.abnormal), 2)]
            self.width *= 2
            b = (index - self.first) // self.width
        while len(self.cells) <= b:
            self.cells.append(0)
            self.abnormal.append(0)
        self.cells[b] += cells
        self.abnormal[b] += abnormal

    def to_dict(self) -> dict[str, Any]:
        return {
            "first_frame": max(self.first, 0),
            "frames_per_bin": self.width,
            "cells": list(self.cells),
            "abnormal": list(self.abnormal),
        }


# --------------------------------------------------------------------------- report.html

FLAG_COLOURS = {
    "POSITIVE": "#b00020",  # red
    "REVIEW": "#c25e00",  # orange
    "NEGATIVE": "#1b7f3b",  # green
    "INSUFFICIENT": "#5f6368",  # grey
}
ABNORMAL_COLOUR = "#c62828"
NORMAL_COLOUR = "#1f77b4"
_CSS = """
body{font-family:sans-serif;margin:1.5em;max-width:72em;color:#222}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right}th{background:#eee}td:first-child{text-align:left}
.flag{color:#fff;padding:.6em 1em;border-radius:6px;margin:.5em 0 1em}
.flag .state{font-size:2em;font-weight:bold;letter-spacing:.05em}
.flag .why{font-size:1.05em;margin-top:.2em}
svg{display:block;margin:.4em 0}svg text{font-family:sans-serif;font-size:12px}
.g{display:flex;flex-wrap:wrap;gap:6px}.g figure{margin:0;text-align:center;font-size:70%}
.g img{height:112px;width:auto;border:1px solid #999;display:block}
.note{color:#555;font-size:90%}
"""


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _table(rows: list[tuple[Any, ...]], head: tuple[str, ...]) -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def flag_reason(summary: dict[str, Any]) -> str:
    """The flag's reason, whichever field the screening result carries it in."""
    for key in ("flag_reason", "review_reason", "reason"):
        v = summary.get(key)
        if v:
            return str(v)
    return ""


def differential_chart(summary: dict[str, Any], width: int = 640) -> str:
    """Horizontal bars: each nucleated class's share of the identified nucleated cells,
    with its 95% Wilson interval as a whisker; abnormal classes in red."""
    counts = summary.get("counts", {}) or {}
    abnormal = set(summary.get("abnormal_classes", []) or [])
    classes = [c for c in counts if c.lower() not in NON_NUCLEATED]
    n = sum(int(counts[c]) for c in classes)
    row, left, right = 22, 110, 150
    plot = width - left - right
    h = row * len(classes) + 30
    parts = [
        f"<svg id='differential-chart' width='{width}' "
        f"height='{h}' role='img' aria-label='differential count with 95% intervals'>"
    ]
    for t in (0, 0.25, 0.5, 0.75, 1.0):
        x = left + t * plot
        parts.append(
            f"<line x1='{x:.1f}' y1='4' x2='{x:.1f}' y2='{h - 22}' stroke='#ddd'/>"
            f"<text x='{x:.1f}' y='{h - 8}' text-anchor='middle'>{t:.0%}</text>"
        )
    for i, c in enumerate(classes):
        k = int(counts[c])
        y = 6 + i * row
        frac = k / n if n else 0.0
        lo, hi = wilson_interval(k, n)
        colour = ABNORMAL_COLOUR if c in abnormal else NORMAL_COLOUR
        parts.append(
            f"<text x='{left - 6}' y='{y + 13}' text-anchor='end'>{_e(c)}</text>"
            f"<rect class='bar' data-class='{_e(c)}' x='{left}' y='{y + 2}' "
            f"width='{frac * plot:.1f}' height='{row - 8}' fill='{colour}'/>"
        )
        if n:
            x0, x1, ym = left + lo * plot, left + hi * plot, y + row / 2 - 1
            parts.append(
                f"<g stroke='#222' stroke-width='1.3'><line x1='{x0:.1f}' y1='{ym:.1f}' "
                f"x2='{x1:.1f}' y2='{ym:.1f}'/><line x1='{x0:.1f}' y1='{ym - 5:.1f}' "
                f"x2='{x0:.1f}' y2='{ym + 5:.1f}'/><line x1='{x1:.1f}' y1='{ym - 5:.1f}' "
                f"x2='{x1:.1f}' y2='{ym + 5:.1f}'/></g>"
            )
        label = f"{k} ({frac:.1%}; {lo:.1%}-{hi:.1%})" if n else str(k)
        parts.append(f"<text x='{left + plot + 6}' y='{y + 13}'>{_e(label)}</text>")
    parts.append("</svg>")
    return "".join(parts)


def timeline_chart(tl: dict[str, Any] | None, width: int = 640, height: int = 120) -> str:
    """Cells (grey) and abnormal cells (red) per frame (or per bin of frames)."""
    if not tl or not tl.get("cells"):
        return "<p class='note'>No frames yet.</p>"
    cells, abn = tl["cells"], tl["abnormal"]
    per, first = int(tl.get("frames_per_bin", 1)), int(tl.get("first_frame", 0))
    left, bottom = 40, 22
    plot_w, plot_h = width - left - 10, height - bottom - 8
    top = max(max(cells), 1)
    bw = plot_w / len(cells)
    parts = [
        f"<svg id='timeline-chart' width='{width}' "
        f"height='{height}' role='img' aria-label='cells per frame'>",
        f"<text x='{left - 4}' y='14' text-anchor='end'>{top}</text>"
        f"<text x='{left - 4}' y='{8 + plot_h}' text-anchor='end'>0</text>",
    ]
    for i, (c, a) in enumerate(zip(cells, abn)):
        x = left + i * bw
        hc, ha = plot_h * c / top, plot_h * a / top
        parts.append(
            f"<rect x='{x:.2f}' y='{8 + plot_h - hc:.2f}' width='{max(bw - 0.5, 0.5):.2f}' "
            f"height='{hc:.2f}' fill='#9e9e9e'/>"
        )
        if a:
            parts.append(
                f"<rect class='abn' x='{x:.2f}' y='{8 + plot_h - ha:.2f}' "
                f"width='{max(bw - 0.5, 0.5):.2f}' height='{ha:.2f}' fill='{ABNORMAL_COLOUR}'/>"
            )
    last = first + per * len(cells) - 1
    unit = "frame" if per == 1 else f"frame ({per} frames per bar)"
    parts.append(
        f"<text x='{left}' y='{height - 6}'>{first}</text>"
        f"<text x='{width - 10}' y='{height - 6}' text-anchor='end'>{last}</text>"
        f"<text x='{left + plot_w / 2:.0f}' y='{height - 6}' text-anchor='middle'>{_e(unit)}"
        "</text></svg>"
    )
    return "".join(parts)


def latency_chart(
    bins: list[tuple[float, float, int]] | None, marks: dict[str, float], width: int = 640
) -> str:
    """Histogram of per-frame latency (log-spaced bins) with p50/p95/p99 marks."""
    if not bins:
        return "<p class='note'>No timed frames after warm-up.</p>"
    height, left, bottom = 140, 40, 24
    plot_w, plot_h = width - left - 10, height - bottom - 10
    top = max(c for _, _, c in bins) or 1
    lo_all, hi_all = max(bins[0][0], 1e-3), max(bins[-1][1], bins[0][0] * 1.01 + 1e-3)
    span = math.log(hi_all / lo_all) or 1.0

    def xpos(ms: float) -> float:
        return left + plot_w * min(max(math.log(max(ms, 1e-3) / lo_all) / span, 0.0), 1.0)

    parts = [
        f"<svg id='latency-chart' width='{width}' "
        f"height='{height}' role='img' aria-label='frame latency distribution'>"
    ]
    for lo, hi, c in bins:
        x0, x1 = xpos(max(lo, lo_all)), xpos(hi)
        hc = plot_h * c / top
        parts.append(
            f"<rect x='{x0:.1f}' y='{10 + plot_h - hc:.1f}' width='{max(x1 - x0 - 0.5, 0.8):.1f}' "
            f"height='{hc:.1f}' fill='{NORMAL_COLOUR}'><title>{lo:.2f}-{hi:.2f} ms: {c}</title>"
            "</rect>"
        )
    for i, (name, ms) in enumerate(marks.items()):
        x = xpos(ms)
        right = x > left + 0.7 * plot_w  # label on the left of its line near the edge
        tx, anchor = (x - 3, "end") if right else (x + 3, "start")
        parts.append(
            f"<line x1='{x:.1f}' y1='8' x2='{x:.1f}' y2='{10 + plot_h}' stroke='#222' "
            f"stroke-dasharray='3,2'/><text x='{tx:.1f}' y='{20 + 12 * i}' "
            f"text-anchor='{anchor}'>{_e(name)} {ms:.1f} ms</text>"
        )
    parts.append(
        f"<text x='{left}' y='{height - 6}'>{lo_all:.1f} ms</text>"
        f"<text x='{width - 10}' y='{height - 6}' text-anchor='end'>{hi_all:.1f} ms</text>"
        f"<text x='{left + plot_w / 2:.0f}' y='{height - 6}' text-anchor='middle'>"
        "ms per frame (log scale)</text></svg>"
    )
    return "".join(parts)


def warmup_line(lat: dict[str, Any]) -> str:
    """``warm-up: 1 frame, 512 ms (stain 430, ...)``, or '' without warm-up."""
    w = lat.get("warmup") or {}
    if not w.get("frames"):
        return ""
    stages = ", ".join(f"{k} {v:.1f}" for k, v in (w.get("stages_ms") or {}).items())
    n = int(w["frames"])
    return (
        f"warm-up (first run of each stage, not in the percentiles): {n} frame"
        f"{'s' if n != 1 else ''}, {float(w.get('frame_ms', 0)):.1f} ms ({stages} ms)"
    )


def render_html(
    summary: dict[str, Any],
    gallery: dict[str, list[dict[str, Any]]],
    timeline: dict[str, Any] | None = None,
    latency_bins: list[tuple[float, float, int]] | None = None,
) -> str:
    """The human report, one self-contained page (inline CSS and SVG; no script, no
    network): the flag and its reason in colour, the differential with 95% intervals,
    cells per frame, per-class galleries (each links to its annotated frame), quality,
    latency with its distribution and warm-up, and the run."""
    flag = str(summary.get("flag", ""))
    colour = FLAG_COLOURS.get(flag, "#444")
    lo, hi = summary.get("ci95", [0.0, 1.0])
    counts = summary.get("counts", {}) or {}
    reason = flag_reason(summary)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>edgecells report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>edgecells screening report</h1>",
        *(
            [
                "<p id='ended-early' style='color:#b00020;font-weight:bold'>Session ended "
                f"early, not complete: {_e(summary['error'])}</p>"
            ]
            if summary.get("error")
            else []
        ),
        f"<div id='flag' class='flag' data-flag='{_e(flag)}' style='background:{colour}'>"
        f"<div class='state'>{_e(flag)}</div><div class='why'>{_e(reason)}</div></div>",
    ]
    if summary.get("reason") and summary.get("reason") != reason:
        parts.append(f"<p>{_e(summary['reason'])}</p>")
    parts += [
        f"<p>Abnormal {summary.get('abnormal', 0)} of {summary.get('cells', 0)} identified "
        f"nucleated cells: {summary.get('abnormal_fraction', 0.0):.2%} "
        f"(95% Wilson CI {lo:.2%} – {hi:.2%}); unidentified {summary.get('unidentified', 0)};"
        f" platelets {summary.get('platelets', 0)}.</p>",
        "<h2>Differential count</h2>",
        "<p class='note'>Share of the identified nucleated cells per class with its 95% Wilson"
        " interval; abnormal classes in red. Unidentified cells and platelets are not in the"
        " differential.</p>",
        differential_chart(summary),
        _table(
            [(k, v) for k, v in counts.items()]
            + [("unidentified", summary.get("unidentified", 0))],
            ("class", "cells"),
        ),
        "<h2>Cells per frame</h2>",
        "<p class='note'>All classified cells (grey) and abnormal ones (red).</p>",
        timeline_chart(timeline or summary.get("timeline")),
    ]
    parts.append("<h2>Cells to review</h2>")
    shown = [(k, v) for k, v in gallery.items() if v]
    if not shown:
        parts.append("<p class='note'>No cells.</p>")
    for title, items in shown:
        total = summary.get("unidentified", 0) if title == "unidentified" else counts.get(title)
        of = f" of {total}" if total is not None else ""
        parts.append(
            f"<h3>{_e(title)} ({len(items)}{of} shown)</h3>"
            f"<div class='g gallery' data-class='{_e(title)}'>"
        )
        for it in items:
            cap = f"frame {it['frame']} · {it['label']} {float(it['confidence']):.2f}"
            img = f"<img src='{_e(it['src'])}' alt='{_e(cap)}'>"
            if it.get("frame_src"):
                img = f"<a href='{_e(it['frame_src'])}' title='annotated frame'>{img}</a>"
            parts.append(f"<figure>{img}<figcaption>{_e(cap)}</figcaption></figure>")
        parts.append("</div>")
    parts.append("<h2>Frames and quality</h2>")
    q = summary.get("quality", {})
    qrows = [("frames read", summary.get("frames", 0)), ("passed", q.get("passed", 0))]
    qrows += [(f"skipped: {k}", v) for k, v in (q.get("failed") or {}).items()]
    qrows.append(("skipped: unreadable", q.get("unreadable", 0)))
    parts.append(_table(qrows, ("", "frames")))
    lat = summary.get("latency_ms", {})
    lrows = [
        (k, v.get("p50_ms", ""), v.get("p95_ms", ""), v.get("p99_ms", ""), v.get("n", ""))
        for k, v in lat.items()
        if isinstance(v, dict) and "p50_ms" in v
    ]
    parts += ["<h2>Latency (ms)</h2>", _table(lrows, ("stage", "p50", "p95", "p99", "n"))]
    wl = warmup_line(lat)
    if wl:
        parts.append(f"<p id='warmup'>{_e(wl)}</p>")
    fr = lat.get("frame", {}) if isinstance(lat.get("frame"), dict) else {}
    marks = {k[:3]: float(fr[k]) for k in ("p50_ms", "p95_ms", "p99_ms") if fr.get(k)}
    parts.append(latency_chart(latency_bins, marks))
    run = {
        k: summary.get(k)
        for k in ("source", "bundle", "backend", "threads", "started")
        if summary.get(k) is not None
    }
    parts.append("<h2>Run</h2>" + _table([(k, v) for k, v in run.items()], ("", "")))
    parts.append("</body></html>")
    return "\n".join(parts)
