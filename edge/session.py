"""The screening pipeline for one slide: capture -> stain statistics -> detect ->
crop + normalize -> batch inference -> aggregate, timed per stage.

* A frame that cannot be read, or fails a quality gate, is a counted, logged skip.
* Output files (see :mod:`.report`) are appended and flushed per frame; ``summary.json``
  is rewritten atomically every ``summary_every_s`` seconds and at the end.
* ``session.json`` records what the session reads: the source (URI, files resolved to
  absolute paths) and the bundle (SHA-256 of its manifest). ``--resume`` refuses a
  folder whose session read another source or bundle (two slides never merge).
* ``resume=True`` continues a session in the same output folder: a frame listed in
  ``frames.csv`` is complete when its row is well formed and ``cells.csv`` holds exactly
  its cells; the first frame that is not (torn or NUL-padded rows after a power cut), and
  everything after it, is dropped and read again; counts are rebuilt from the files.
* A full disk or a failed bundle ends the session with an
  :class:`~edgecells.edge.errors.EdgecellsError` (rows already written stay). The
  summary then says ``"complete": false`` with the ``"error"``, and counts only the
  frames whose rows reached ``frames.csv``.
* Output files that hold only a header (a start that failed) count as no session.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgecells.edge.config import Config
from edgecells.edge.detect import NUCLEATED
from edgecells.edge.errors import EdgecellsError
from edgecells.edge.export import CropExporter
from edgecells.edge.ood import DomainCheck
from edgecells.edge.pipeline import FrameResult, Pipeline
from edgecells.edge.quality import QualityTally
from edgecells.edge.report import (
    CELL_FIELDS,
    FRAME_FIELDS,
    CsvLog,
    Timeline,
    annotate_frame,
    cell_box,
    read_csv,
    render_html,
    rewrite_csv,
    save_png,
    write_json_atomic,
    write_text_atomic,
)
from edgecells.edge.screening import (
    INSUFFICIENT,
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
        source_id: str | None = None,
    ) -> None:
        self.pipe = Pipeline(cfg, bundle, classifier)
        self.cfg = cfg
        self.classes = self.pipe.classes
        abnormal = list(self.pipe.abnormal_mask)
        self.tally = Tally(self.classes, abnormal)
        domain = bundle.thresholds.get("domain") if cfg.quality.domain_check else None
        self.domain = DomainCheck(dict(domain or {}))
        self.quality = QualityTally()
        self.frames = 0
        self.next_index = 0
        self.platelet_kind = 0
        self.red_cells = 0
        self.nucleated_found = 0
        self.annotate = annotate
        self.info = dict(info or {})
        self.info.setdefault("started", datetime.now(timezone.utc).isoformat(timespec="seconds"))
        # per-class galleries (abnormal classes, unidentified, then normal classes), each
        # capped at gallery_max cells: native-resolution cuts of the frame, so the memory
        # and disk a session uses do not grow with its length
        abn = self.pipe.abnormal_names()
        order = [c for c in self.classes if c in abn] + [UNIDENTIFIED]
        order += [c for c in self.classes if c not in abn]
        self.gallery: dict[str, list[dict[str, Any]]] = {c: [] for c in order}
        self.gallery_max = cfg.session.gallery_max
        self.timeline = Timeline()
        self.events: list[str] = []
        self.summary_every_s = summary_every_s
        self._last_summary = 0.0
        self.error: str | None = None  # why the session ended early, if it did
        self.source_id = source_id
        self.bundle_sha256 = str(getattr(bundle, "manifest_sha256", "") or "")
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
        existing = _has_rows(cells_p) or _has_rows(frames_p)
        if existing and not resume:
            raise EdgecellsError(
                f"{out}: holds a previous session; use --resume to continue it or "
                "choose another --out"
            )
        if resume and existing:
            self._check_identity(out)
            self._restore(cells_p, frames_p)
        self._write_identity(out)
        self._cells = CsvLog(cells_p, CELL_FIELDS)
        self._frames = CsvLog(frames_p, FRAME_FIELDS)

    def _identity(self) -> dict[str, Any]:
        return {
            "schema": "edgecells.session/1",
            "source": self.source_id,
            "bundle_sha256": self.bundle_sha256 or None,
            "bundle": self.info.get("bundle"),
            "started": self.info.get("started"),
        }

    def _check_identity(self, out: Path) -> None:
        """--resume: the folder's session must have read this source with this bundle."""
        p = out / SESSION_FILE
        if not p.is_file():
            log.warning("%s: no %s (older session): source and bundle not checked", out, p.name)
            return
        try:
            rec = json.loads(p.read_text(encoding="utf-8"))
            if not isinstance(rec, dict):
                raise ValueError("not an object")
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise EdgecellsError(
                f"{p}: unreadable ({exc}); cannot tell which slide this folder holds; "
                "choose another --out"
            ) from None
        theirs, ours = rec.get("source"), self.source_id
        if ours is not None and theirs is not None and theirs != ours:
            raise EdgecellsError(
                f"{out}: holds a session of another source ({theirs}); this run reads "
                f"{ours}. Refusing to merge two slides: choose another --out"
            )
        theirs_b, ours_b = rec.get("bundle_sha256"), self.bundle_sha256
        if ours_b and theirs_b and theirs_b != ours_b:
            raise EdgecellsError(
                f"{out}: was screened with another bundle (manifest {str(theirs_b)[:12]}, "
                f"this one {ours_b[:12]}); resume with the bundle the session started with "
                "or choose another --out"
            )

    def _write_identity(self, out: Path) -> None:
        rec = self._identity()
        p = out / SESSION_FILE
        if p.is_file():
            try:
                old = json.loads(p.read_text(encoding="utf-8"))
                if isinstance(old, dict):
                    rec["started"] = old.get("started", rec["started"])
                    rec["source"] = old.get("source") or rec["source"]
                    rec["bundle_sha256"] = old.get("bundle_sha256") or rec["bundle_sha256"]
            except (OSError, UnicodeDecodeError, ValueError):
                pass
        write_json_atomic(p, rec)

    def _restore(self, cells_p: Path, frames_p: Path) -> None:
        frames_all = read_csv(frames_p)
        cells_all = read_csv(cells_p)
        cells_of: dict[int, list[dict[str, str]]] = defaultdict(list)
        for r in cells_all:
            if _valid_cell(r):
                cells_of[int(r["frame"])].append(r)
        frames: list[dict[str, str]] = []
        last = -1
        for r in frames_all:
            # Frames are listed in reading order; the first one that is torn, out of
            # order or whose cells are not all in cells.csv ends what is trusted.
            if not _valid_frame(r):
                break
            idx = int(r["frame"])
            want = int(r["cells"]) if r["status"] == "ok" else 0
            if idx <= last or len(cells_of.get(idx, [])) != want:
                break
            frames.append(r)
            last = idx
        done = {int(r["frame"]) for r in frames}
        kept = [c for r in frames for c in cells_of.get(int(r["frame"]), [])]
        dropped = len(frames_all) - len(frames)
        if (
            len(kept) != len(cells_all)
            or not _ends_newline(cells_p)
            or _has_nul(cells_p)
            or len(cells_all) != _count_lines(cells_p) - 1
        ):
            rewrite_csv(cells_p, CELL_FIELDS, kept)
        if dropped or not _ends_newline(frames_p) or _has_nul(frames_p):
            rewrite_csv(frames_p, FRAME_FIELDS, frames)
        if dropped:
            msg = f"{dropped} frame row(s) from frame {last + 1} on were torn or incomplete"
            self.events.append(msg + "; those frames are read again")
            log.warning(self.events[-1])
        for r in frames:
            self.frames += 1
            self.quality.count(r["status"], r["reason"])
            self.red_cells += int(r.get("red_cells") or 0)
        abnormal_names = self.pipe.abnormal_names()
        per_frame: dict[int, list[int]] = {}
        for r in kept:
            label = r["label"]
            if label != UNIDENTIFIED and label not in self.tally.counts:
                raise EdgecellsError(
                    f"{cells_p}: class {label!r} is not in this bundle; resume with the "
                    "bundle the session started with"
                )
            self.tally.add(label)
            self.nucleated_found += r.get("kind") == NUCLEATED
            fi = int(r["frame"])
            tl = per_frame.setdefault(fi, [0, 0])
            tl[0] += 1
            tl[1] += label in abnormal_names
            src = f"gallery/{fi:06d}_{int(r['cell']):03d}.png"
            items = self.gallery.get(label)
            if items is not None and len(items) < self.gallery_max and (self.out / src).exists():
                items.append(self._gallery_item(fi, int(r["cell"]), label, r["confidence"]))
        for r in frames:
            fi = int(r["frame"])
            c, a = per_frame.get(fi, (0, 0))
            self.timeline.add(fi, c, a)
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
        except BaseException as exc:
            if not _is_clean_stop(exc):
                self.error = _describe(exc)
            raise
        finally:
            self.events.extend(getattr(source, "events", []))
            self.close()
        return self.summary()

    def step(self, frame: Frame, capture_ms: float = 0.0) -> FrameResult:
        """Process one frame and record it.

        The frame's rows are written first (cells, then its frames.csv row); the tallies
        count it only once they are on disk, so the summary never counts a frame that a
        failed write (full disk) left out of frames.csv."""
        f0 = time.perf_counter()
        try:
            res, _ = self.pipe.process(frame)
        except EdgecellsError as exc:  # an odd frame never ends the session
            res = FrameResult(frame.index, "skip", "unreadable")
            log.warning("frame %d: %s", frame.index, exc)
        if frame.error:
            log.warning("frame %d skipped: %s", frame.index, frame.error)
        res.timings["capture"] = capture_ms
        a0 = time.perf_counter()
        shown = self._write_cells(frame, res)
        res.timings["aggregate"] = (time.perf_counter() - a0) * 1000
        frame_ms = (time.perf_counter() - f0) * 1000 + capture_ms
        self.pipe.latency.add_frame(res.timings, frame_ms, len(res.cells))
        self._write_frame_row(frame, res)
        self._count(frame, res, shown)
        self._last = res
        if self._frames is not None:
            now = time.monotonic()
            if now - self._last_summary >= self.summary_every_s:
                self._last_summary = now
                self.write_summary(final=False)
        return res

    def _write_cells(self, frame: Frame, res: FrameResult) -> list[tuple[str, dict[str, Any]]]:
        """Write the frame's cell rows, gallery cells (cut from the frame at native
        resolution) and annotated frame; returns the gallery entries to add once the
        frame is recorded."""
        shown: list[tuple[str, dict[str, Any]]] = []
        if res.status != "ok":
            return shown
        room = {k: self.gallery_max - len(v) for k, v in self.gallery.items()}
        img = frame.image
        for i, c in enumerate(res.cells):
            if self._cells is not None:
                self._cells.write(c)
            label = c["label"]
            if self.out is None or img is None or room.get(label, 0) <= 0:
                continue
            x0, y0, x1, y1 = cell_box(c, img.shape)
            if x1 > x0 and y1 > y0:
                room[label] -= 1
                item = self._gallery_item(frame.index, i, label, c["confidence"])
                save_png(self.out / item["src"], img[y0:y1, x0:x1])
                shown.append((label, item))
        if self.out is not None and img is not None and (self.annotate or shown):
            save_png(
                self.out / self._frame_file(frame.index),
                annotate_frame(img, res.cells, self.classes),
            )
        if self.exporter is not None and frame.image is not None and res.cells:
            self.exporter.add(frame.image, frame.index, frame.name, res.cells, res.stain_stats)
        return shown

    def _frame_file(self, index: int) -> str:
        """The annotated frame: PNG for every frame with ``--annotate``, else a JPEG for
        the frames that hold gallery cells (what a gallery image links to)."""
        return f"frames/{index:06d}.{'png' if self.annotate else 'jpg'}"

    def _gallery_item(self, frame: int, cell: int, label: str, conf: Any) -> dict[str, Any]:
        item = {
            "frame": frame,
            "cell": cell,
            "label": label,
            "confidence": conf,
            "src": f"gallery/{frame:06d}_{cell:03d}.png",
            "frame_src": self._frame_file(frame),
        }
        if self.out is not None and not (self.out / item["frame_src"]).exists():
            # resumed with a different --annotate: link whichever annotated frame exists
            for ext in ("png", "jpg"):
                if (self.out / f"frames/{frame:06d}.{ext}").exists():
                    item["frame_src"] = f"frames/{frame:06d}.{ext}"
        return item

    def _count(
        self, frame: Frame, res: FrameResult, shown: list[tuple[str, dict[str, Any]]]
    ) -> None:
        self.frames += 1
        self.next_index = frame.index + 1
        self.red_cells += res.red_cells
        self.quality.count(res.status, res.reason)
        abnormal = self.pipe.abnormal_names()
        self.timeline.add(
            frame.index, len(res.cells), sum(c["label"] in abnormal for c in res.cells)
        )
        if res.status != "ok":
            return
        self.domain.add_frame(res.stain_mean)
        self.domain.add_cells(res.focus)
        for c in res.cells:
            self.tally.add(c["label"])
            self.nucleated_found += c["kind"] == NUCLEATED
        for key, entry in shown:
            self.gallery[key].append(entry)

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

    # ------------------------------------------------------------------ results
    def summary(self, final: bool = True) -> dict[str, Any]:
        px = self.cfg.camera.pixel_size_um
        est = self.info.get("pixel_size_estimate_um")  # a session that estimates it
        if est is None and isinstance(self.info.get("pixel_size_estimate"), dict):
            est = self.info["pixel_size_estimate"].get("pixel_size_um")
        if isinstance(est, int | float) and est > 0:
            self.domain.pixel_size_estimate_um = float(est)
        reasons = self.domain.verdict(px)
        r = self.tally.result(self.pipe.rule, reasons)
        skipped = sum(self.quality.failed.values()) + self.quality.unreadable
        if r.flag == INSUFFICIENT and skipped:  # say why there were too few cells
            why = ", ".join(f"{g} {k}" for g, k in self.quality.failed.items() if k)
            if self.quality.unreadable:
                why = ", ".join(x for x in (why, f"unreadable {self.quality.unreadable}") if x)
            r.reason += f"; {skipped} of {self.frames} frames skipped ({why})"
        d = r.to_dict()
        d["screening"] = {
            "flag": r.flag,
            "reason": r.reason,
            "domain": self.domain.measurements(px),
            "domain_reasons": reasons,
            "unidentified_fraction": round(r.unidentified_fraction, 4),
        }
        d["frames"] = self.frames
        d["quality"] = self.quality.to_dict()
        d["red_cells"] = self.red_cells
        d["latency_ms"] = self.pipe.latency.to_dict()
        d["abnormal_classes"] = sorted(self.pipe.abnormal_names())
        d["timeline"] = self.timeline.to_dict()
        d["complete"] = final and self.error is None
        d["error"] = self.error
        d["events"] = list(self.events)
        d.update(self.info)
        return d

    def write_summary(self, final: bool = True) -> dict[str, Any]:
        d = self.summary(final)
        if self.out is not None:
            write_json_atomic(self.out / "summary.json", d)
            if final:
                html = render_html(d, self.gallery, latency_bins=self.pipe.latency.frame.coarse())
                write_text_atomic(self.out / "report.html", html)
        return d

    def close(self) -> None:
        try:
            if self.out is not None:
                try:
                    self.write_summary(final=True)
                except EdgecellsError as exc:
                    if self.error is None:
                        raise
                    # the session already failed (often: the disk is full); the last
                    # summary written says complete: false
                    log.warning("final summary not written: %s", exc)
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


SESSION_FILE = "session.json"
_FRAME_STATUS = ("ok", "skip")


def source_identity(uri: str) -> str:
    """What ``session.json`` records of a source URI: files, folders, globs and videos as
    absolute paths (``--source ./a`` and ``--source /x/a`` are the same slide), cameras as
    given, ``""`` as the shipped samples."""
    from edgecells.edge.sources.uri import parse_uri

    kind, arg = parse_uri(uri)
    if kind in ("files", "video"):
        return f"{kind}:{os.path.abspath(os.path.expanduser(arg))}"
    return f"{kind}:{arg}"


def _is_clean_stop(exc: BaseException) -> bool:
    from edgecells.edge.sdnotify import StopRequested

    return isinstance(exc, StopRequested)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, EdgecellsError):
        return str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return f"{type(exc).__name__}: {exc}"


def _has_rows(p: Path) -> bool:
    """True when a CSV log holds at least one row besides its header (NUL bytes, left by
    a power cut, do not count)."""
    try:
        with open(p, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    lines = [ln for ln in head.replace(b"\x00", b"").split(b"\n") if ln.strip()]
    return len(lines) > 1


def _has_nul(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                if b"\x00" in chunk:
                    return True
    except OSError:
        return False
    return False


def _count_lines(p: Path) -> int:
    try:
        with open(p, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except OSError:
        return 0


def _int_ok(v: str | None, signed: bool = False) -> bool:
    if v is None:
        return False
    v = v[1:] if signed and v.startswith("-") else v
    return v.isdigit() and v.isascii()


def _float_ok(v: str | None) -> bool:
    try:
        return v is not None and math.isfinite(float(v))
    except ValueError:
        return False


def _valid_frame(r: dict[str, Any]) -> bool:
    return (
        None not in r
        and all(r.get(k) is not None for k in FRAME_FIELDS)
        and _int_ok(r["frame"])
        and r["status"] in _FRAME_STATUS
        and _int_ok(r["cells"])
        and (r["red_cells"] == "" or _int_ok(r["red_cells"]))
    )


def _valid_cell(r: dict[str, Any]) -> bool:
    return (
        None not in r
        and all(r.get(k) is not None for k in CELL_FIELDS)
        and _int_ok(r["frame"])
        and _int_ok(r["cell"])
        and all(_int_ok(r[k], signed=True) for k in ("x", "y", "w", "h"))
        and bool(r["label"])
        and _float_ok(r["confidence"])
    )
