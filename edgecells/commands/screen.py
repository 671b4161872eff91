"""``edgecells screen``, ``edgecells profile``, ``edgecells evaluate detector`` and
``edgecells evaluate screening``: the device runtime's commands."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from edgecells.commands._ui import out, progress
from edgecells.edge import jsonsafe
from edgecells.edge.errors import EdgecellsError


def _setup(
    config: Path | None,
    source: str | None,
    bundle: str | None,
    backend: str | None,
    threads: int | None,
) -> tuple[Any, Any, Any]:
    """Config with command-line overrides, the verified bundle, the open classifier."""
    from edgecells.edge.backends import open_classifier
    from edgecells.edge.bundle import load_bundle
    from edgecells.edge.bundle.signing import check_bundle
    from edgecells.edge.config import load_config, validate

    cfg = load_config(config)
    if source is not None:
        cfg.session.source = source
    if bundle is not None:
        cfg.session.bundle = bundle
    if backend is not None:
        cfg.inference.backend = backend
    if threads is not None:
        if threads < 1:
            raise EdgecellsError(f"--threads must be >= 1, got {threads}")
        cfg.inference.threads = threads
    validate(cfg, str(config) if config else "config")
    b = load_bundle(cfg.session.bundle or None)
    sig = check_bundle(b, cfg.bundle.trusted_keys)
    if sig.warning:
        typer.echo(f"warning: {sig.warning}", err=True)
    clf = open_classifier(
        b,
        cfg.inference.backend,
        cfg.inference.threads,
        precision=_precision(b),
        max_batch=cfg.inference.batch,
    )
    return cfg, b, clf


def _precision(bundle: Any) -> str:
    return "int8" if bundle.formats("int8") else "float32"


def screen(
    source: str | None = typer.Option(
        None, "--source", "-s", help="picam:N, cv:N, gst:PIPELINE, video, image, folder or glob."
    ),
    bundle: str | None = typer.Option(None, "--bundle", "-b", help="Model bundle (folder)."),
    config: Path | None = typer.Option(None, "--config", "-c", help="config.toml."),
    out_dir: Path | None = typer.Option(None, "--out", "-o", help="Output folder."),
    backend: str | None = typer.Option(
        None, "--backend", help="auto, litert, openvino, onnxruntime, tensorrt."
    ),
    threads: int | None = typer.Option(None, "--threads", help="Inference threads."),
    frames: int | None = typer.Option(None, "--frames", help="Stop after N frames."),
    annotate: bool = typer.Option(False, "--annotate", help="Write an annotated PNG per frame."),
    resume: bool = typer.Option(False, "--resume", help="Continue the session in --out."),
    export_crops: Path | None = typer.Option(
        None,
        "--export-crops",
        help="Also write every classified cell at native resolution into "
        "DIR/<predicted class>/ with DIR/index.csv (label them for `edgecells adapt`).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Screen a slide: classify the cells of every frame, count, flag, report.

    With no arguments: the sample frames and the reference bundle shipped in the package.
    """
    from edgecells.edge.sdnotify import ServiceHooks, StopRequested
    from edgecells.edge.session import Session, source_identity
    from edgecells.edge.sources import open_source

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if frames is not None and frames < 0:
        raise EdgecellsError(f"--frames must be >= 0 (0 = until the source ends), got {frames}")
    cfg, b, clf = _setup(config, source, bundle, backend, threads)
    out_path = out_dir if out_dir is not None else Path(cfg.session.out)
    n = frames if frames is not None else cfg.session.frames
    from edgecells.edge.scale import resolve_pixel_size

    try:
        scale_info = resolve_pixel_size(cfg)  # "auto": estimated from the first frames
    except EdgecellsError:
        clf.close()
        raise
    info = {
        "source": cfg.session.source or "samples",
        "bundle": str(b.source or b.root),
        "bundle_sha256": b.manifest_sha256,
        "signature": b.signature.get("status", ""),
        "backend": clf.backend,
        "threads": cfg.inference.threads,
        **scale_info,
    }
    if cfg.quality.domain_check:
        info.update(_pixel_size_estimate(cfg))
    # The source opens before anything is written: a missing camera or a wrong path
    # leaves no output behind to block the corrected rerun.
    src = open_source(cfg.session.source, cfg.camera)
    try:
        src.open()
        sess = Session(
            cfg,
            b,
            clf,
            out=out_path,
            resume=resume,
            annotate=annotate or cfg.session.annotate,
            info=info,
            source_id=source_identity(cfg.session.source),
            export_crops=export_crops,
        )
    except BaseException:
        src.close()
        clf.close()
        raise
    total = n or (len(src) if hasattr(src, "__len__") else None)  # type: ignore[arg-type]
    # Under systemd: READY/watchdog/STATUS; SIGTERM ends the session at a frame boundary.
    hooks = ServiceHooks.install()
    hooks.ready(f"screening {info['source']}")

    def _frame_done(r: Any) -> None:
        bar.advance(task)
        hooks.frame_done(sess.frames)

    try:
        with progress(as_json) as bar:
            task = bar.add_task("screening", total=total)
            if sess.next_index:
                bar.update(task, completed=sess.next_index)
            try:
                summary = sess.run(src, n, progress=_frame_done)
            except StopRequested:  # Session.run has written the final summary
                summary = sess.summary()
    finally:
        hooks.stopping()
        hooks.uninstall()
        src.close()
        clf.close()
    if as_json:
        typer.echo(jsonsafe.dumps(_public(summary), indent=2))
    else:
        _print_summary(summary, out_path)


def _public(s: dict[str, Any]) -> dict[str, Any]:
    d = dict(s)
    d["latency_ms"] = {k: v for k, v in s["latency_ms"].items()}
    return d


def _print_summary(s: dict[str, Any], out_path: Path) -> None:
    from edgecells.edge.report import flag_reason, warmup_line

    colour = {"POSITIVE": "red", "REVIEW": "dark_orange", "NEGATIVE": "green"}.get(
        s["flag"], "grey50"
    )
    out.print(f"[bold {colour}]{s['flag']}[/]  {flag_reason(s)}")
    t = Table(title="Differential count")
    t.add_column("class")
    t.add_column("cells", justify="right")
    for k, v in s["counts"].items():
        t.add_row(k, str(v))
    t.add_row("unidentified", str(s["unidentified"]))
    out.print(t)
    lo, hi = s["ci95"]
    q = s["quality"]
    reasons = [f"{k} {v}" for k, v in q["failed"].items() if v]
    if q["unreadable"]:
        reasons.append(f"unreadable {q['unreadable']}")
    skipped = sum(q["failed"].values()) + q["unreadable"]
    out.print(
        f"abnormal {s['abnormal']}/{s['cells']} = {s['abnormal_fraction']:.2%} "
        f"(95% CI {lo:.2%}-{hi:.2%}); frames {s['frames']} ({q['passed']} passed, "
        f"{skipped} skipped{': ' + ', '.join(reasons) if reasons else ''})"
    )
    lat = s["latency_ms"]
    out.print(
        "latency p50 ms: "
        + ", ".join(
            f"{k} {v['p50_ms']:.2f}"
            for k, v in lat.items()
            if k != "inference_per_cell" and isinstance(v, dict) and "p50_ms" in v
        )
    )
    if warmup_line(lat):
        out.print(warmup_line(lat))
    for e in s.get("events", []):
        out.print(f"[yellow]{e}[/]")
    out.print(f"report: {out_path / 'report.html'}")


# --------------------------------------------------------------------------- profile


def profile(
    bundle: str | None = typer.Option(None, "--bundle", "-b", help="Model bundle."),
    source: str | None = typer.Option(None, "--source", "-s", help="Frame source URI."),
    config: Path | None = typer.Option(None, "--config", "-c", help="config.toml."),
    frames: int = typer.Option(200, "--frames", help="Frames per run (the source cycles)."),
    backend: list[str] = typer.Option(["auto"], "--backend", help="Backend(s) to profile."),
    threads: list[int] = typer.Option([1], "--threads", help="Thread count(s) to profile."),
    zoo: str | None = typer.Option(None, "--zoo", help="Profile a zoo architecture instead."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
) -> None:
    """Per-stage latency (p50/p95/p99), frames/s, cells/s and peak memory."""
    from edgecells.edge.profiling import profile_run
    from edgecells.edge.report import warmup_line
    from edgecells.edge.scale import resolve_pixel_size

    if frames < 1:
        raise EdgecellsError(f"--frames must be >= 1, got {frames}")
    results = []
    for be in backend:
        for th in threads:
            if zoo is not None:
                results.append(_profile_zoo(zoo, be, th, frames, source, config))
                continue
            cfg, b, clf = _setup(config, source, bundle, be, th)
            try:
                resolve_pixel_size(cfg)
            except EdgecellsError:
                clf.close()
                raise
            try:
                with progress(as_json) as bar:
                    task = bar.add_task(f"{clf.backend} x{th}", total=frames)
                    r = profile_run(cfg, b, clf, frames, lambda t=task: bar.advance(t))
            finally:
                clf.close()
            results.append(r)
    if as_json:
        typer.echo(jsonsafe.dumps(results[0] if len(results) == 1 else results, indent=2))
        return
    for r in results:
        t = Table(title=f"{r['backend']}, {r['threads']} thread(s), {r['frames']} frames")
        t.add_column("stage")
        for c in ("p50 ms", "p95 ms", "p99 ms"):
            t.add_column(c, justify="right")
        for k, v in r["stages"].items():
            t.add_row(k, f"{v['p50_ms']:.3f}", f"{v['p95_ms']:.3f}", f"{v['p99_ms']:.3f}")
        out.print(t)
        out.print(
            f"{r['fps']:.1f} frames/s, {r['cells_per_s']:.1f} cells/s, inference "
            f"{r['inference_ms_per_cell']:.3f} ms/cell, peak memory {r['peak_rss_mb']:.0f} MiB"
        )
        if warmup_line({"warmup": r.get("warmup")}):
            out.print(warmup_line({"warmup": r.get("warmup")}))


def _profile_zoo(
    name: str, backend: str, threads: int, frames: int, source: str | None, config: Path | None
) -> dict[str, Any]:
    """Convert a zoo architecture (random weights, synthetic calibration) to int8 in a
    temporary bundle for ``backend``'s format, then profile it like any bundle."""
    import tempfile

    try:
        from edgecells.convert import pipeline, writer
        from edgecells.convert import zoo as zoo_mod
        from edgecells.convert.source import from_keras
    except ImportError as exc:
        raise EdgecellsError(f"--zoo needs the conversion toolchain ({exc})") from None
    from edgecells.edge.backends import backend_module, open_classifier
    from edgecells.edge.bundle import load_bundle
    from edgecells.edge.config import load_config
    from edgecells.edge.profiling import profile_run

    fmt = "tflite" if backend == "auto" else backend_module(backend).FORMAT
    classes, cmap_d, task_kind = zoo_mod.classes_and_mapping(name)
    with tempfile.TemporaryDirectory() as tmp, pipeline.stdout_to_stderr():
        # the converters print to stdout (C level too): keep it for --json
        src_model = from_keras(zoo_mod.build(name), Path(f"{name}.keras"))
        n = writer.defaults()["calibration"]["synthetic_images"]
        calib = zoo_mod.synthetic_calibration(src_model.input_size, n)
        res = pipeline.convert_model(
            src_model,
            calib,
            Path(tmp) / "bundle",
            [fmt],
            classes=classes,
            mapping=cmap_d,
            task=task_kind,
            keep_float=False,
            name=f"zoo-{name}",
        )
        b = load_bundle(res.bundle_dir)
        cfg = load_config(config)
        if source is not None:
            cfg.session.source = source
        cfg.inference.threads = threads
        clf = open_classifier(b, backend, threads, precision=_precision(b))
        try:
            r = profile_run(cfg, b, clf, frames)
        finally:
            clf.close()
    r["zoo"] = name
    return r


# --------------------------------------------------------------------------- evaluate


def evaluate_detector(
    frames_dir: Path = typer.Option(..., "--frames", help="Folder of frames (JPEGImages)."),
    annotations: Path = typer.Option(..., "--annotations", help="Pascal VOC XML folder."),
    image_set: Path | None = typer.Option(
        None, "--list", help="Only the frames named in this file (e.g. ImageSets/Main/test.txt)."
    ),
    config: Path | None = typer.Option(None, "--config", "-c", help="config.toml."),
    pixel_size: float | None = typer.Option(
        None, "--pixel-size", help="Frames' um/px (default: config's [camera] pixel_size_um)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the scores as JSON."),
) -> None:
    """Score the cell detector against Pascal VOC boxes (centre-in-box, one-to-one)."""
    from edgecells.edge.config import AUTO, load_config
    from edgecells.edge.detect import NUCLEATED, PLATELET, CellDetector
    from edgecells.edge.imageio import list_images, read_image
    from edgecells.training.detection import (
        VOC_PLATELETS,
        VOC_WBC,
        DetectionScore,
        match_centres,
        read_voc,
    )

    cfg = load_config(config)
    if pixel_size is not None:
        if not pixel_size > 0:
            raise EdgecellsError(f"--pixel-size must be > 0 um/px, got {pixel_size}")
        cfg.camera.pixel_size_um = pixel_size
    if cfg.camera.pixel_size_um == AUTO:
        raise EdgecellsError(
            'evaluate detector: [camera] pixel_size_um = "auto"; give --pixel-size '
            "(calibration/pixel_sizes.py has the data sets' values)"
        )
    det = CellDetector(cfg.detect, float(cfg.camera.pixel_size_um))
    if not annotations.is_dir():
        raise EdgecellsError(f"{annotations}: no such annotation folder")
    files = list_images(frames_dir)
    if image_set is not None:
        if not image_set.is_file():
            raise EdgecellsError(f"{image_set}: no such list file")
        names = {ln.strip() for ln in image_set.read_text().splitlines() if ln.strip()}
        files = [f for f in files if f.stem in names]
    files = [f for f in files if (annotations / f"{f.stem}.xml").is_file()]
    if not files:
        raise EdgecellsError(f"{frames_dir}: no frames with annotations in {annotations}")
    wbc, plt = DetectionScore(), DetectionScore()
    with progress(as_json) as bar:
        task = bar.add_task("detecting", total=len(files))
        for f in files:
            boxes = read_voc(annotations / f"{f.stem}.xml")
            d = det.detect(read_image(f))
            for score, kind, names_ in ((wbc, NUCLEATED, VOC_WBC), (plt, PLATELET, VOC_PLATELETS)):
                truth = [b for n in names_ for b in boxes.get(n, [])]
                pred = [(c.cx, c.cy) for c in d.cells if c.kind == kind]
                score.n_true += len(truth)
                score.n_pred += len(pred)
                score.tp += match_centres(pred, truth)
            bar.advance(task)
    result = {
        "frames": len(files),
        "matching": "centre-in-box, one-to-one",
        "wbc": wbc.to_dict(),
        "platelets": plt.to_dict(),
    }
    if as_json:
        typer.echo(jsonsafe.dumps(result, indent=2))
        return
    t = Table(title=f"Detection on {len(files)} frames (centre-in-box)")
    for c in ("cells", "recall", "precision", "true", "predicted"):
        t.add_column(c, justify="right")
    for name, s in (("white cells", wbc), ("platelets", plt)):
        t.add_row(name, f"{s.recall:.2%}", f"{s.precision:.2%}", str(s.n_true), str(s.n_pred))
    out.print(t)


def _pixel_size_estimate(cfg: Any) -> dict[str, Any]:
    """A pixel-size estimate from the source's red cells for the domain check (the flag
    is REVIEW when the configured pixel size is off it), where this edgecells has the
    estimator (edge/scale.py); {} when it has none or the estimate fails."""
    try:
        from edgecells.edge.scale import estimate_from_source  # type: ignore[import-not-found]
    except ImportError:
        return {}
    try:
        est = estimate_from_source(
            cfg.session.source, cfg.camera, int(getattr(cfg.camera, "scale_frames", 10))
        )
    except Exception as exc:  # noqa: BLE001 - no estimate: the scale check is skipped
        logging.getLogger("edgecells.screen").info("no pixel-size estimate: %s", exc)
        return {}
    return {"pixel_size_estimate_um": round(float(est.pixel_size_um), 5)}


def evaluate_screening(
    bundle: str | None = typer.Argument(None, help="Model bundle (default: reference)."),
    data: Path = typer.Option(..., "--data", help="PBC folder with splits.csv."),
    slides: int = typer.Option(500, "--slides", help="Simulated slides per condition."),
    cells: int = typer.Option(200, "--cells", help="Cells per slide."),
    fractions: str = typer.Option("0.02,0.05,0.10", "--fractions", help="Abnormal fractions."),
    config: Path | None = typer.Option(None, "--config", "-c", help="config.toml."),
    backend: str = typer.Option("auto", "--backend", help="Inference backend."),
    threads: int = typer.Option(1, "--threads", help="Inference threads."),
    seed: int = typer.Option(0, "--seed", help="Random seed for the slides."),
    split: str = typer.Option(
        "test", "--split", help="val (where the thresholds were fitted) or test (report)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Flag sensitivity/specificity on simulated slides from a PBC split.

    Each image is classified once by the bundle through the device path (temperature,
    out-of-distribution threshold); a slide draws CELLS nucleated cells with replacement
    (normal slides: normal classes only; abnormal slides: the given fraction from
    erythroblast/IG). Specificity = NEGATIVE / normal slides, sensitivity = POSITIVE /
    abnormal slides (REVIEW and INSUFFICIENT count against both). The bundle's thresholds
    were fitted on the validation split: quote --split test.
    """
    from edgecells.edge.ood import calibrate
    from edgecells.edge.screening import ScreeningRule, label_cells
    from edgecells.training.abstention import expected_calibration_error, run_split
    from edgecells.training.slides import simulate

    if split not in ("val", "test"):
        raise EdgecellsError(f"--split must be val or test, not {split!r}")

    try:
        fr = [float(x) for x in fractions.split(",") if x.strip()]
    except ValueError:
        raise EdgecellsError(f"--fractions: not a list of numbers: {fractions!r}") from None
    cfg, b, clf = _setup(config, None, bundle, backend, threads)
    try:
        with progress(as_json) as bar:
            task = bar.add_task(f"classifying {split} split", total=None)
            outs = run_split(
                b, clf, data, split, lambda n, t: bar.update(task, total=t, completed=n)
            )
    finally:
        clf.close()
    rule = ScreeningRule.from_bundle(b.thresholds, cfg.screening)
    labels = label_cells(
        outs.probs, b.classes, rule.min_confidence, rule.temperature, rule.ood_threshold
    )
    truth = [b.classes[k] for k in outs.y]
    res = simulate(b, cfg, labels, truth, slides, cells, fr, seed)
    res["split"] = split
    res["data"] = outs.source
    res["ece_uncalibrated"] = round(expected_calibration_error(outs.probs, outs.y), 4)
    res["ece_calibrated"] = round(
        expected_calibration_error(calibrate(outs.probs, rule.temperature), outs.y), 4
    )
    if as_json:
        typer.echo(jsonsafe.dumps(res, indent=2))
        return
    t = Table(title=f"Simulated slides of {cells} cells ({slides} per condition), {split} split")
    for c in (
        "slides",
        "abnormal fraction",
        "POSITIVE",
        "NEGATIVE",
        "REVIEW",
        "INSUFFICIENT",
        "metric",
    ):
        t.add_column(c, justify="right")
    for row in res["conditions"]:
        metric = (
            f"specificity {row['specificity']:.2%}"
            if row["fraction"] == 0
            else f"sensitivity {row['sensitivity']:.2%}"
        )
        t.add_row(
            row["name"],
            f"{row['fraction']:.0%}",
            str(row["POSITIVE"]),
            str(row["NEGATIVE"]),
            str(row["REVIEW"]),
            str(row["INSUFFICIENT"]),
            metric,
        )
    out.print(t)
    out.print(
        f"per cell ({split}): false positive {res['cell_false_positive_rate']:.2%}, "
        f"abnormal sensitivity {res['cell_sensitivity']:.2%}, unidentified "
        f"{res['unidentified_rate']:.2%}; ECE {res['ece_uncalibrated']:.2%} -> "
        f"{res['ece_calibrated']:.2%} calibrated"
    )
    out.print(f"rule: {res['rule']}")


def register(app: typer.Typer, evaluate_app: typer.Typer) -> None:
    app.command("screen")(screen)
    app.command("profile")(profile)
    evaluate_app.command("detector")(evaluate_detector)
    evaluate_app.command("screening")(evaluate_screening)
