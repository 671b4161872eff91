"""report.html: charts, galleries, timeline, warm-up; checked in a real headless browser
when Chromium is installed (Debian: ``apt-get install chromium``)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from edgecells.edge.imageio import read_image, write_image
from edgecells.edge.latency import LatencyStats
from edgecells.edge.report import (
    FLAG_COLOURS,
    Timeline,
    cell_box,
    differential_chart,
    render_html,
    warmup_line,
)

CLASSES = ["basophil", "eosinophil", "ig", "lymphocyte", "neutrophil", "platelet"]


def _summary(flag: str = "POSITIVE", **extra: object) -> dict:
    counts = {"basophil": 3, "eosinophil": 10, "ig": 30, "lymphocyte": 60, "neutrophil": 97}
    counts["platelet"] = 12
    lat = LatencyStats()
    for i in range(50):
        lat.add_frame({"stain": 400.0 if i == 0 else 1.0 + i % 3}, 30.0 + i % 7, 2)
    d = {
        "flag": flag,
        "reason": "abnormal 30/200: lower 95% bound 0.1108 exceeds 0.0406",
        "cells": 200,
        "abnormal": 30,
        "abnormal_fraction": 0.15,
        "ci95": [0.107, 0.206],
        "counts": counts,
        "abnormal_classes": ["ig"],
        "unidentified": 5,
        "platelets": 12,
        "frames": 50,
        "quality": {"passed": 49, "failed": {"focus": 1}, "unreadable": 0},
        "latency_ms": lat.to_dict(),
        "source": "test",
    }
    d.update(extra)
    return d, lat


def _gallery(folder: Path) -> dict:
    rng = np.random.default_rng(0)
    (folder / "gallery").mkdir(parents=True, exist_ok=True)
    (folder / "frames").mkdir(exist_ok=True)
    g: dict = {c: [] for c in CLASSES}
    for i, c in enumerate(["ig", "neutrophil"]):
        src = f"gallery/000001_{i:03d}.png"
        write_image(folder / src, rng.integers(0, 255, (90, 70, 3), dtype=np.uint8))
        write_image(folder / "frames/000001.jpg", np.full((48, 64, 3), 200, np.uint8))
        g[c].append(
            {"frame": 1, "cell": i, "label": c, "confidence": 0.9, "src": src}
            | {"frame_src": "frames/000001.jpg"}
        )
    return g


def test_timeline_memory_is_bounded() -> None:
    tl = Timeline(max_bins=100)
    for i in range(10_000):
        tl.add(i, 3, 1 if i % 10 == 0 else 0)
    d = tl.to_dict()
    assert len(d["cells"]) <= 100 and d["frames_per_bin"] == 128
    assert sum(d["cells"]) == 30_000 and sum(d["abnormal"]) == 1000


def test_cell_box_is_clipped_and_prefers_the_detected_box() -> None:
    assert cell_box({"x": -10, "y": 5, "w": 40, "h": 40}, (30, 100, 3)) == (0, 5, 30, 30)
    box = {"x": 0, "y": 0, "w": 90, "h": 90, "box_x": 40, "box_y": 40, "box_w": 20}
    box["box_h"] = 20
    assert cell_box(box, (480, 640, 3)) == (35, 35, 65, 65)  # its own box plus 25% margin


def test_warmup_is_kept_out_of_the_percentiles() -> None:
    lat = LatencyStats()
    lat.add_frame({"stain": 500.0, "detect": 3.0}, 510.0, 0)  # no cells: crop/inference idle
    for _ in range(20):
        lat.add_frame({"stain": 1.0, "detect": 3.0, "crop": 2.0, "inference": 4.0}, 12.0, 2)
    d = lat.to_dict()
    assert d["stain"]["p99_ms"] < 2 and d["stain"]["n"] == 20
    # crop and inference first ran on the second frame: that one is warm-up too
    assert d["warmup"]["frames"] == 2 and d["warmup"]["stages_ms"]["stain"] == 500.0
    assert d["inference"]["n"] == 19 and d["frame"]["n"] == 19
    assert "2 frames" in warmup_line(d)


def test_differential_chart_bars_and_intervals() -> None:
    s, _ = _summary()
    svg = differential_chart(s)
    bars = re.findall(
        r"<rect class='bar' data-class='(\w+)' x='[\d.]+' y='[\d.]+' width='([\d.]+)'", svg
    )
    assert [c for c, _ in bars] == ["basophil", "eosinophil", "ig", "lymphocyte", "neutrophil"]
    widths = dict((c, float(w)) for c, w in bars)
    assert widths["neutrophil"] > widths["lymphocyte"] > widths["ig"] > widths["basophil"]
    assert "30 (15.0%; 10.7%-20.6%)" in svg  # Wilson 95% for 30/200: 0.1071-0.2061


def test_render_html_states_and_reason_fields(tmp_path: Path) -> None:
    s, lat = _summary("REVIEW", flag_reason="classifier unsure of 14% of cells")
    page = render_html(s, _gallery(tmp_path), s.get("timeline"), lat.frame.coarse())
    assert FLAG_COLOURS["REVIEW"] in page and "classifier unsure of 14% of cells" in page
    assert "data-flag='REVIEW'" in page and "<script" not in page and "http" not in page
    assert len(set(FLAG_COLOURS.values())) == 4


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        exe = shutil.which(name)
        if exe:
            return exe
    pytest.skip("Chromium is not installed (Debian: apt-get install chromium)")


def _browser(exe: str, page: Path, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [
                exe,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                *args,
                page.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )


@pytest.mark.slow
def test_report_in_a_headless_browser(tmp_path: Path) -> None:
    exe = _chromium()
    tl = Timeline()
    for i in range(40):
        tl.add(i, 5, 2 if i % 4 == 0 else 0)
    s, lat = _summary("POSITIVE", timeline=tl.to_dict())
    page = tmp_path / "report.html"
    page.write_text(render_html(s, _gallery(tmp_path), None, lat.frame.coarse()))
    dom = _browser(exe, page, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    for el in ('id="differential-chart"', 'id="timeline-chart"', 'id="latency-chart"'):
        assert el in html, el
    assert html.count('class="bar"') == 5
    assert 'data-class="ig"' in html and 'href="frames/000001.jpg"' in html
    shot = tmp_path / "shot.png"
    r = _browser(exe, page, f"--screenshot={shot}", "--window-size=1000,1400")
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    img = read_image(shot).astype(int)
    assert img.std() > 20  # not a blank page
    banner = np.array([int(FLAG_COLOURS["POSITIVE"][i : i + 2], 16) for i in (1, 3, 5)])
    near = (np.abs(img[:300, :200] - banner).max(axis=2) <= 3).mean()
    assert near > 0.15, f"flag banner colour covers {near:.1%} of the top-left corner"
    # the gallery image loaded (a broken image would leave no noisy pixels below the charts)
    assert (np.abs(np.diff(img[300:, :, 0], axis=1)) > 60).sum() > 500
