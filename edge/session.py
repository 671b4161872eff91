"""The screening pipeline for one slide: capture -> stain statistics -> detect ->
crop + normalize -> batch inference -> aggregate, timed per stage.

* A frame that cannot be read, or fails a quality gate, is a counted, logged skip.
* Output files (see :mod:`.report`) are appended and flushed per frame; ``summary.json``
  is rewritten atomically every ``summary_every_s`` seconds and at the end.
* ``resume=True`` continues a session in the same output folder: frames listed in
  ``frames.csv`` are complete; cells of an unfinished frame are dropped; counts are
  rebuilt from the files; reading continues after the last complete frame.
* A full disk or a failed bundle ends the session with an
  :class:`~edgecells.edge.errors.EdgecellsError` (rows already written stay).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edgecells.edge.config import Config
from edgecells.edge.detect import NUCLEATED
from edgecells.edge.errors import EdgecellsError
from edgecells.edge.export import CropExporter
from edgecells.edge.pipeline import FrameResult, Pipeline
from edgecells.edge.quality import QualityTally
from edgecells.edge.report import (
    CELL_FIELDS,
    FRAME_FIELDS,
    CsvLog,
    annotate_frame,
    read_csv,
    render_html,
    rewrite_csv,
    save_png,
    write_json_atomic,
    write_text_atomic,
)
from edgecells.edge.screening import (
    UNIDENTIFIED,
    Tally,
)
from edgecells.edge.sources.base import Frame, SourceBase

log = logging.getLogger("edgecells.session")


class Session:
    """One slide: a pipeline, its tallies and (optionally) its output folder."""

    def __init__(
        self,
        cfg: Config,
        bundle: Any,
        classifier: Any,
        out: str | Path | None = None,
        resume: bool = False,
        annotate: bool = False,
        info: dict[str, Any] | None = None,
        summary_every_s: float = 1.0,
        export_crops: str | Path | None = None,
    ) -> None:
        self.pipe = Pipeline(cfg, bundle, classifier)
        self.cfg = cfg
        self.classes = self.pipe.classes
        abnormal = list(self.pipe.abnormal_mask)
        self.tally = Tally(self.classes, abnormal)
        self.quality = QualityTally()
        self.frames = 0
        self.next_index = 0
        self.platelet_kind = 0
        self.red_cells = 0
        self.nucleated_found = 0
        self.annotate = annotate
        self.info = dict(info or {})
        self.info.setdefault("started", datetime.now(timezone.utc).isoformat(timespec="seconds"))
        self.gallery: dict[str, list[dict[str, Any]]] = {"abnormal": [], "unidentified": []}
        self.gallery_max = cfg.session.gallery_max
        self.events: list[str] = []
        self.summary_every_s = summary_every_s
        self._last_summary = 0.0
        self.out = Path(out) if out is not None else None
        self._cells: CsvLog | None = None
        self._frames: CsvLog | None = None
        if self.out is not None:
            self._open_out(resume)
        self.exporter: CropExporter | None = None
        if export_crops is not None:  # after _open_out: next_index is known on --resume
            self.exporter = CropExporter(export_crops, self.next_index if resume else None)

    # ------------------------------------------------------------------ output folder
    def _open_out(self, resume: bool) -> None:
        out = self.out
        assert out is not None
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EdgecellsError(f"{out}: cannot create output folder ({exc.strerror})") from None
        cells_p, frames_p = out / "cells.csv", out / "frames.csv"
        existing = cells_p.exists() or frames_p.exists()
        if existing and not resume:
            raise EdgecellsError(
                f"{out}: holds a previous session; use --resume to continue it or "
                "choose another --out"
            )
        if resume and existing:
            self._restore(cells_p, frames_p)
        self._cells = CsvLog(cells_p, CELL_FIELDS)
        self._frames = CsvLog(frames_p, FRAME_FIELDS)

    def _restore(self, cells_p: Path, frames_p: Path) -> None:
        frames = read_csv(frames_p)
        done = {int(r["frame"]) for r in frames if r.get("frame", "").isdigit()}
        cells = read_csv(cells_p)
        kept = [r for r in cells if r.get("frame", "").isdigit() and int(r["frame"]) in done]
        if len(kept) != len(cells) or (cells_p.exists() and not _ends_newline(cells_p)):
            rewrite_csv(cells_p, CELL_FIELDS, kept)
        if frames and not _ends_newline(frames_p):
            rewrite_csv(frames_p, FRAME_FIELDS, frames)
        for r in frames:
            self.frames += 1
            if r["status"] == "ok":
                self.quality.passed += 1
            elif r["reason"] == "unreadable":
                self.quality.unreadable += 1
            else:
                self.quality.failed[r["reason"]] += 1
            self.red_cells += int(r.get("red_cells") or 0)
        for r in kept:
            label = r["label"]
            if label != UNIDENTIFIED and label not in self.tally.counts:
                raise EdgecellsError(
                    f"{cells_p}: class {label!r} is not in this bundle; resume with the "
                    "bundle the session started with"
                )
            self.tally.add(label)
            self.nucleated_found += r.get("kind") == NUCLEATED
            if label == UNIDENTIFIED or label in self.pipe.abnormal_names():
                key = "unidentified" if label == UNIDENTIFIED else "abnormal"
                src = f"gallery/{int(r['frame']):06d}_{int(r['cell']):03d}.png"
                if (self.out / src).exists() and len(self.gallery[key]) < self.gallery_max:
                    self.gallery[key].append(
                        {
                            "frame": r["frame"],
                            "label": label,
                            "confidence": r["confidence"],
                            "src": src,
                        }
                    )
        self.next_index = max(done) + 1 if done else 0
        self.events.append(f"resumed after frame {self.next_index - 1} ({len(kept)} cells)")
        log.info(self.events[-1])

    # ------------------------------------------------------------------ running
    def run(
        self,
        source: SourceBase,
        max_frames: int = 0,
        progress: Callable[[FrameResult], None] | None = None,
    ) -> dict[str, Any]:
        """Read frames until the source ends or ``max_frames`` (0 = no limit) in total."""
        if self.next_index:
            source.skip_to(self.next_index)
        try:
            while max_frames <= 0 or self.frames < max_frames:
                t0 = time.perf_counter()
                frame = source.read()
                cap_ms = (time.perf_counter() - t0) * 1000
                if frame is None:
                    break
                self.step(frame, cap_ms)
                if progress is not None:
                    progress(self._last)
        finally:
            self.events.extend(getattr(source, "events", []))
            self.close()
        return self.summary()

    def step(self, frame: Frame, capture_ms: float = 0.0) -> FrameResult:
        """Process one frame and record it."""
        f0 = time.perf_counter()
        try:
            res, crops = self.pipe.process(frame)
        except EdgecellsError as exc:  # an odd frame never ends the session
            res, crops = FrameResult(frame.index, "skip", "unreadable"), None
            log.warning("frame %d: %s", frame.index, exc)
        if frame.error:
            log.warning("frame %d skipped: %s", frame.index, frame.error)
        res.timings["capture"] = capture_ms
        a0 = time.perf_counter()
        self._record(frame, res, crops)
        res.timings["aggregate"] = (time.perf_counter() - a0) * 1000
        lat = self.pipe.latency
        for k, v in res.timings.items():
            lat.add(k, v)
        if res.status == "ok" and res.cells:
            lat.per_cell.add(res.timings["inference"] / len(res.cells))
        lat.frame.add((time.perf_counter() - f0) * 1000 + capture_ms)
        self._write_frame_row(frame, res)
        self._last = res
        return res

    def _record(self, frame: Frame, res: FrameResult, crops: np.ndarray | None) -> None:
        self.frames += 1
        self.next_index = frame.index + 1
        self.red_cells += res.red_cells
        if res.status != "ok":
            if res.reason == "unreadable":
                self.quality.unreadable += 1
            else:
                self.quality.failed[res.reason] += 1
            return
        self.quality.passed += 1
        abnormal_names = self.pipe.abnormal_names()
        for i, c in enumerate(res.cells):
            self.tally.add(c["label"])
            self.nucleated_found += c["kind"] == NUCLEATED
            if self._cells is not None:
                self._cells.write(c)
            key = None
            if c["label"] == UNIDENTIFIED:
                key = "unidentified"
            elif c["label"] in abnormal_names:
                key = "abnormal"
            if key and self.out is not None and crops is not None:
                if len(self.gallery[key]) < self.gallery_max:
                    src = f"gallery/{frame.index:06d}_{i:03d}.png"
                    save_png(self.out / src, crops[i])
                    self.gallery[key].append(
                        {
                            "frame": frame.index,
                            "label": c["label"],
                            "confidence": c["confidence"],
                            "src": src,
                        }
                    )
        if self.exporter is not None and frame.image is not None and res.cells:
            self.exporter.add(frame.image, frame.index, frame.name, res.cells, res.stain_stats)
        if self.annotate and self.out is not None and frame.image is not None:
            img = annotate_frame(frame.image, res.cells, self.classes)
            save_png(self.out / "frames" / f"{frame.index:06d}.png", img)

    def _write_frame_row(self, frame: Frame, res: FrameResult) -> None:
        if self._frames is None:
            return
        if self._cells is not None:
            self._cells.sync()  # the frame's cells are on disk before the frame is listed
        if self.exporter is not None:
            self.exporter.sync()
        row: dict[str, Any] = {
            "frame": frame.index,
            "name": frame.name,
            "timestamp": f"{frame.timestamp:.3f}",
            "status": res.status,
            "reason": res.reason,
            "cells": len(res.cells),
            "red_cells": res.red_cells,
        }
        for k, v in res.timings.items():
            row[f"{k}_ms"] = round(v, 3)
        self._frames.write(row)
        now = time.monotonic()
        if now - self._last_summary >= self.summary_every_s:
            self._last_summary = now
            self.write_summary(final=False)

    # ------------------------------------------------------------------ results
    def summary(self, final: bool = True) -> dict[str, Any]:
        r = self.tally.result(self.pipe.rule)
        d = r.to_dict()
        d["frames"] = self.frames
        d["quality"] = self.quality.to_dict()
        d["red_cells"] = self.red_cells
        d["latency_ms"] = self.pipe.latency.to_dict()
        d["complete"] = final
        d["events"] = list(self.events)
        d.update(self.info)
        return d

    def write_summary(self, final: bool = True) -> dict[str, Any]:
        d = self.summary(final)
        if self.out is not None:
            write_json_atomic(self.out / "summary.json", d)
            if final:
                write_text_atomic(self.out / "report.html", render_html(d, self.gallery))
        return d

    def close(self) -> None:
        try:
            if self.out is not None:
                self.write_summary(final=True)
        finally:
            for log_ in (self._cells, self._frames, self.exporter):
                if log_ is not None:
                    log_.close()
            self._cells = self._frames = self.exporter = None


def _ends_newline(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            f.seek(0, 2)
            if f.tell() == 0:
                return True
            f.seek(-1, 2)
            return f.read(1) == b"\n"
    except OSError:
        return True
