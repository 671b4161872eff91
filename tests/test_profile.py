"""Latency profiling: streaming percentiles, profile_run, the ``profile`` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from runtime_bundle import make_bundle
from typer.testing import CliRunner

from edgecells.cli import app
from edgecells.edge.latency import STAGES, Histogram, LatencyStats, peak_rss_mb, rss_mb

FRAMES = Path(__file__).parent / "fixtures" / "bccd" / "JPEGImages"


def test_histogram_percentiles_within_one_percent() -> None:
    rng = np.random.default_rng(1)
    x = rng.lognormal(mean=1.0, sigma=0.8, size=20000)
    h = Histogram()
    for v in x:
        h.add(float(v))
    for q in (50, 95, 99):
        assert h.percentile(q) == pytest.approx(np.percentile(x, q), rel=0.015)
    assert h.n == 20000 and h.mean == pytest.approx(x.mean())
    assert Histogram().percentile(50) == 0.0


def test_latency_stats_memory_does_not_grow() -> None:
    s = LatencyStats()
    before = sum(h.counts.nbytes for h in s.stages.values())
    for i in range(5000):
        s.add("detect", 0.01 * (i % 13))
        s.add("inference", 0.5 + (i % 7))
    assert sum(h.counts.nbytes for h in s.stages.values()) == before
    d = s.to_dict()
    assert d["detect"]["n"] == 5000 and d["inference"]["p50_ms"] > 0.5
    assert rss_mb() > 10 and peak_rss_mb() >= rss_mb() * 0.5


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


def test_profile_command_json(bundle_dir: Path) -> None:
    r = CliRunner().invoke(
        app,
        [
            "profile",
            "--bundle",
            str(bundle_dir),
            "--source",
            str(FRAMES),
            "--frames",
            "9",
            "--backend",
            "onnxruntime",
            "--threads",
            "1",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert set(d["stages"]) == set(STAGES)
    for v in d["stages"].values():
        assert v["p50_ms"] <= v["p95_ms"] <= v["p99_ms"]
    assert d["frames"] == 9  # the 6 fixture frames cycle
    assert d["fps"] > 0 and d["cells_per_s"] > 0
    assert d["backend"] == "onnxruntime" and d["threads"] == 1
    assert d["peak_rss_mb"] > 0


def test_profile_several_thread_counts(bundle_dir: Path) -> None:
    r = CliRunner().invoke(
        app,
        [
            "profile",
            "--bundle",
            str(bundle_dir),
            "--source",
            str(FRAMES),
            "--frames",
            "3",
            "--backend",
            "onnxruntime",
            "--threads",
            "1",
            "--threads",
            "2",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    runs = json.loads(r.stdout)
    assert [x["threads"] for x in runs] == [1, 2]


def test_profile_bad_arguments(bundle_dir: Path) -> None:
    r = CliRunner().invoke(app, ["profile", "--bundle", str(bundle_dir), "--frames", "0"])
    assert r.exit_code != 0 and "--frames" in r.output
    r = CliRunner().invoke(
        app,
        [
            "profile",
            "--bundle",
            str(bundle_dir),
            "--source",
            str(FRAMES / "none*.jpg"),
            "--frames",
            "2",
        ],
    )
    assert r.exit_code != 0 and "no image files match" in r.output
