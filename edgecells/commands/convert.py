"""``edgecells calibrate``, ``edgecells convert`` and ``edgecells bundle info``."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from edgecells.commands._ui import err, out
from edgecells.commands._ui import progress as _progress
from edgecells.edge import jsonsafe
from edgecells.edge.errors import EdgecellsError

bundle_app = typer.Typer(help="Inspect and verify model bundles.", no_args_is_help=True)


def _fmt_pct(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return "-"
    return f"{100 * v:.2f}%"


def _fmt_bytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


# --------------------------------------------------------------------------- calibrate


def calibrate(
    data: Path = typer.Option(
        ..., "--data", help="Labelled data folder (splits.csv / class folders)."
    ),
    target_path: Path | None = typer.Option(
        None, "--target", help="Stain target JSON; default: fit on the training split."
    ),
    out_path: Path = typer.Option(..., "--out", "-o", help="Calibration set to write (.npz)."),
    per_class: int | None = typer.Option(None, "--per-class", help="Images per class."),
    total: int | None = typer.Option(
        None, "--total", help="Total images, shared equally by class (default 300)."
    ),
    size: int = typer.Option(128, "--size", help="Model input side in pixels."),
    mapping: str = typer.Option("pbc8", "--mapping", help="Class mapping preset or JSON file."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    no_stain: bool = typer.Option(False, "--no-stain", help="Skip stain normalization."),
    pixel_size: float | None = typer.Option(
        None,
        "--pixel-size",
        help="The model's input pixel size, µm/px (training's metrics.json "
        "preprocess.pixel_size_um; the reference model: 0.3125). Omit only for models "
        "trained before physical scale (centre square of the image).",
    ),
    data_pixel_size: float | None = typer.Option(
        None, "--data-pixel-size", help="The data's pixel size, µm/px (default: measured)."
    ),
    coverage: bool = typer.Option(
        True, "--coverage/--no-coverage", help="Compare with the validation split's statistics."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Build a representative, stain-normalized calibration set from the training split."""
    from edgecells.calibration.calibset import (
        build_calibset,
        coverage_check,
        save_calibset,
        validation_images,
    )
    from edgecells.calibration.datasets import fit_stain_target, load_dataset
    from edgecells.edge.mappings import load_mapping
    from edgecells.edge.stain import StainTarget

    if not 8 <= size <= 1024:
        raise EdgecellsError(f"--size must be 8..1024, got {size}")
    cmap = load_mapping(mapping)
    target = None
    if not no_stain:
        if target_path is not None:
            target = StainTarget.load(target_path)
        else:
            ds = load_dataset(data, mapping=cmap, seed=seed)
            with _progress(as_json) as bar:
                t = bar.add_task("fitting stain target", total=len(ds.split("train")))
                target, _ = fit_stain_target(ds, "train", progress=lambda k: bar.advance(t, k))
    with _progress(as_json) as bar:
        task = bar.add_task("calibration images", total=None)
        cs = build_calibset(
            data,
            target,
            size,
            per_class=per_class,
            total=total,
            seed=seed,
            mapping=cmap,
            progress=lambda k: bar.advance(task, k),
            model_pixel_um=pixel_size,
            pixel_size_um=data_pixel_size,
        )
    report = None
    if coverage:
        try:
            val = validation_images(
                data,
                target,
                size,
                seed=seed,
                mapping=cmap,
                model_pixel_um=pixel_size,
                pixel_size_um=data_pixel_size,
            )
            report = coverage_check(cs, val)
            cs.manifest["coverage"] = report.to_dict()
        except EdgecellsError as exc:
            err.print(f"[yellow]warning[/] no coverage check: {exc}")
    path = save_calibset(cs, out_path)
    result: dict[str, Any] = {
        "out": str(path),
        "manifest": str(path.with_suffix(".json")),
        "sha256": cs.sha256,
        "n": int(cs.x.shape[0]),
        "size": size,
        "counts": cs.counts(),
        "stain_normalization": cs.manifest["preprocessing"]["stain_normalization"],
        "coverage": report.to_dict() if report else None,
    }
    if report:
        for w in report.warnings:
            err.print(f"[yellow]warning[/] calibration coverage: {w}")
    if as_json:
        print(jsonsafe.dumps(result, indent=2))
        return
    t = Table(title=f"calibration set -> {path}")
    t.add_column("class")
    t.add_column("images", justify="right")
    for c, n in result["counts"].items():
        t.add_row(c, str(n))
    t.add_row("[bold]total", f"[bold]{result['n']}")
    out.print(t)
    if report:
        ok = "[green]covers[/]" if report.ok else "[yellow]does not fully cover[/]"
        out.print(f"coverage: {ok} the validation split ({report.n_val} images)")


# --------------------------------------------------------------------------- convert


def _validation_data(
    path: Path, mapping: Any, size: int, target: Any, split: str, model_pixel_um: Any = None
) -> tuple[Any, Any, str]:
    from edgecells.calibration.datasets import load_dataset, load_split

    ds = load_dataset(path, mapping=mapping)
    with _progress() as bar:
        t = bar.add_task(f"reading {split} split", total=len(ds.split(split)))
        loaded = load_split(
            ds,
            split,
            size,
            target,
            progress=lambda k: bar.advance(t, k),
            model_pixel_um=model_pixel_um,
        )
    if loaded.x.shape[0] == 0:
        raise EdgecellsError(f"{path}: the {split} split has no readable images")
    return loaded.x, loaded.y, f"{path.name} {split} split ({loaded.x.shape[0]} images)"


def convert(
    model: Path | None = typer.Argument(
        None, help="Keras .keras/.h5, SavedModel folder or .onnx (omit with --zoo)."
    ),
    calibration: Path | None = typer.Option(
        None, "--calibration", "-c", help="Calibration set from `edgecells calibrate`."
    ),
    formats: str = typer.Option("tflite,openvino,onnx", "--formats", help="Comma-separated."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Bundle folder to write."),
    validate_dir: Path | None = typer.Option(
        None, "--validate", help="Labelled data folder to validate on (its test split)."
    ),
    validate_split: str = typer.Option("test", "--validate-split", help="test, val or all."),
    max_drop: float | None = typer.Option(
        None, "--max-drop", help="Largest int8 accuracy drop allowed, percentage points (1.0)."
    ),
    force: bool = typer.Option(False, "--force", help="Keep a bundle that fails the gate."),
    archive: bool = typer.Option(False, "--archive", help="Also write OUT.tar.gz (or .zip)."),
    archive_format: str = typer.Option("tar.gz", "--archive-format", help="tar.gz or zip."),
    zoo: str | None = typer.Option(None, "--zoo", help="Convert a zoo architecture instead."),
    io_type: str = typer.Option("int8", "--io-type", help="TFLite input/output: int8 or uint8."),
    mapping: str | None = typer.Option(
        None, "--mapping", help="Class mapping (default: the calibration set's classes / pbc8)."
    ),
    keep_float: bool = typer.Option(
        True, "--keep-float/--no-keep-float", help="Keep float32 references in the bundle."
    ),
    name: str | None = typer.Option(None, "--name", help="Bundle name."),
    threads: int | None = typer.Option(None, "--threads", help="Inference threads."),
    training_files: bool = typer.Option(
        True,
        "--training-files/--no-training-files",
        help="Put the float Keras model and a replay set in the bundle (for `edgecells adapt`).",
    ),
    views: str | None = typer.Option(
        None,
        "--views",
        help="Test-time views the device averages, comma-separated (identity, hflip, vflip, "
        "transpose, rot180); validation and threshold fitting use them too. Default: identity.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Quantize a model to int8 TFLite / OpenVINO / ONNX, validate, and write a bundle."""
    from edgecells.calibration.calibset import load_calibset
    from edgecells.convert import pipeline, writer
    from edgecells.convert.source import from_keras, load_source
    from edgecells.edge.mappings import load_mapping

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ logs quiet
    fmts = pipeline.parse_formats(formats)
    view_list = None
    if views is not None:
        from edgecells.edge.bundle import check_views

        view_list = check_views([v.strip() for v in views.split(",")], "convert", "--views")
    if validate_split not in ("test", "val", "all"):
        raise EdgecellsError(f"--validate-split must be test, val or all, not {validate_split!r}")
    if archive_format not in ("tar.gz", "zip"):
        raise EdgecellsError(f"--archive-format must be tar.gz or zip, not {archive_format!r}")
    steps = len(fmts) * 2 + 2
    with pipeline.stdout_to_stderr(), _progress(as_json) as bar:
        task = bar.add_task("loading model", total=steps)

        def step(msg: str) -> None:
            bar.update(task, description=msg, advance=1)

        extra: dict[str, Any] = {}
        if zoo is not None:
            from edgecells.convert import zoo as zoo_mod

            if model is not None:
                raise EdgecellsError("give a MODEL or --zoo NAME, not both")
            entry = zoo_mod.get(zoo)
            classes, cmap_d, task_kind = zoo_mod.classes_and_mapping(zoo)
            source = from_keras(zoo_mod.build(zoo), Path(f"{zoo}.keras"))
            extra = {"zoo": zoo, "zoo_reference": entry.reference, "weights": "random (None)"}
        else:
            if model is None:
                raise EdgecellsError("give a MODEL to convert (or --zoo NAME)")
            source = load_source(model)
            task_kind = "multiclass"
            cmap_d = None
        if calibration is not None:
            calib = load_calibset(calibration)
        elif zoo is not None:
            from edgecells.convert import zoo as zoo_mod

            n = writer.defaults()["calibration"]["synthetic_images"]
            calib = zoo_mod.synthetic_calibration(source.input_size, n)
        else:
            raise EdgecellsError("--calibration calib.npz is required (edgecells calibrate)")
        if cmap_d is None:
            cm = load_mapping(mapping or "pbc8")
            if calib.classes and list(calib.classes) != list(cm.classes) and mapping is None:
                raise EdgecellsError(
                    f"{calibration}: calibration classes {calib.classes} differ from mapping "
                    f"{cm.name}; pass --mapping"
                )
            classes, cmap_d = list(cm.classes), cm.to_dict()
            if source.num_outputs == 1 and len(classes) == 2:
                task_kind = "binary"
        elif mapping is not None:
            cm = load_mapping(mapping)
            classes, cmap_d = list(cm.classes), cm.to_dict()
        val_x = val_y = None
        val_desc = ""
        if validate_dir is not None:
            from edgecells.edge.stain import StainTarget

            t = calib.manifest.get("stain_target")
            target = StainTarget.from_dict(t) if t else None
            val_x, val_y, val_desc = _validation_data(
                validate_dir,
                load_mapping(mapping or "pbc8"),
                source.input_size,
                target,
                validate_split,
                calib.manifest.get("preprocessing", {}).get("pixel_size_um"),
            )
        step(f"converting {fmts[0]}")
        result = pipeline.convert_model(
            source,
            calib,
            out_dir,
            fmts,
            classes=classes,
            mapping=cmap_d,
            task=task_kind,
            io_type=io_type,
            keep_float=keep_float,
            val_x=val_x,
            val_y=val_y,
            val_desc=val_desc,
            max_drop=max_drop,
            name=name or (zoo or source.path.stem),
            extra_provenance=extra,
            step=step,
            threads=threads,
            continue_on_error=zoo is not None,
            analyse_layers=zoo is None,  # random zoo weights: disagreement says nothing
            training_files=training_files and zoo is None,
            test_time_views=view_list,
        )
    gate_failed = [f for f in result.failures if "conversion failed" not in f]
    if (
        validate_dir is not None
        and (validate_dir / "splits.csv").is_file()
        and task_kind != "binary"
    ):
        from edgecells.training.abstention import refit_bundle

        step("fitting abstention and flag thresholds on the val split")
        try:
            fit_report = refit_bundle(out_dir, validate_dir)
        except EdgecellsError as exc:  # too little val data: the bundle keeps the defaults
            err.print(f"warning: thresholds not fitted ({exc}); defaults kept", soft_wrap=True)
        else:
            if not as_json:
                _print_refit(out_dir, fit_report)
    if archive and (result.passed or force or zoo):
        suffix = ".zip" if archive_format == "zip" else ".tar.gz"
        result.archive = writer.archive(out_dir, out_dir.with_name(out_dir.name + suffix))
    if as_json:
        print(jsonsafe.dumps(result.to_dict(), indent=2))
    else:
        _print_convert(result)
    if gate_failed and not force:
        raise EdgecellsError(
            "int8 accuracy drop too large: "
            + "; ".join(gate_failed)
            + f". Report: {result.report_path}. Use --force to keep the bundle anyway.",
            exit_code=3,
        )


def _print_convert(result: Any) -> None:
    t = Table(title=f"bundle -> {result.bundle_dir}  ({result.validation_data})")
    for col in (
        "format",
        "converted",
        "int8 size",
        "float size",
        "ratio",
        "acc float",
        "acc int8",
        "drop pp",
        "agree",
        "max |dp|",
        "gate",
    ):
        t.add_column(col, justify="right" if col not in ("format", "converted") else "left")
    for r in result.formats:
        v = r.validation
        if r.error:
            t.add_row(r.format, "[red]no[/]", *["-"] * 8, f"[red]{r.error[:60]}[/]")
            continue
        gate = "-" if v is None else ("[green]pass[/]" if v.passed else "[red]FAIL[/]")
        t.add_row(
            r.format,
            f"yes ({r.seconds:.1f}s)",
            _fmt_bytes(r.int8_bytes),
            _fmt_bytes(r.float32_bytes),
            f"{r.size_ratio:.2f}",
            _fmt_pct(v.float32.accuracy if v else None),
            _fmt_pct(v.int8.accuracy if v else None),
            "-" if v is None or v.accuracy_drop_pp is None else f"{v.accuracy_drop_pp:.2f}",
            _fmt_pct(v.agreement if v else None),
            "-" if v is None else f"{v.prob_diff_max:.3f}",
            gate,
        )
    out.print(t)
    for r in result.formats:
        if r.validation and r.validation.blame:
            out.print(f"[bold]{r.format}[/]: layers with the largest int8 error:")
            for row in r.validation.blame:
                out.print("  " + ", ".join(f"{k}={v}" for k, v in row.items()))
    out.print(f"report: {result.report_path}  ({result.seconds:.1f}s)")
    if result.archive:
        out.print(f"archive: {result.archive}")


# --------------------------------------------------------------------------- bundle info


def load_checked(bundle: str | None, config: Path | None) -> tuple[Any, Any]:
    """Load and verify a bundle, then apply the signature policy (config ``[bundle]
    trusted_keys`` and ``$EDGECELLS_TRUSTED_KEYS``): refused with one line, or a one-line
    warning on stderr when nothing proves who made it."""
    from edgecells.edge.bundle import load_bundle
    from edgecells.edge.bundle.signing import check_bundle
    from edgecells.edge.config import load_config

    cfg = load_config(config)
    b = load_bundle(bundle)
    sig = check_bundle(b, cfg.bundle.trusted_keys)
    if sig.warning:
        typer.echo(f"warning: {sig.warning}", err=True)
    return b, sig


def keygen(
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder for the new key pair."),
) -> None:
    """Make an Ed25519 signing key pair: edgecells-signing.key (private, keep it off
    devices) and edgecells-signing.pub (install it on devices as a trusted key)."""
    from edgecells.edge.bundle.signing import keygen as make_keys

    priv, pub, kid = make_keys(out_dir)
    out.print(f"key {kid}\n  private: {priv} (keep secret)\n  public:  {pub} (install on devices)")


def sign(
    bundle: Path = typer.Argument(..., help="Bundle folder to sign (in place)."),
    key: Path = typer.Option(..., "--key", "-k", help="Private key from `bundle keygen`."),
) -> None:
    """Verify a bundle folder, then sign its manifest.json (writes signature.json)."""
    from edgecells.edge.bundle.signing import key_id_of, load_private_key, sign_bundle

    sig = sign_bundle(bundle, key)
    kid = key_id_of(load_private_key(key).public_key())
    out.print(f"signed {bundle} with key {kid} -> {sig}")


def verify(
    bundle: str | None = typer.Argument(
        None, help="Bundle folder, manifest.json or archive (default: the shipped bundle)."
    ),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="config.toml ([bundle] trusted_keys)."
    ),
) -> None:
    """Verify a bundle (schema, every file's SHA-256, signature policy) in one line."""
    b, sig = load_checked(bundle, config)
    typer.echo(f"{b.source or b.root}: verified ({len(b.models)} models, {sig.status})")


def info(
    bundle: str | None = typer.Argument(
        None, help="Bundle folder, manifest.json or archive (default: the shipped bundle)."
    ),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="config.toml ([bundle] trusted_keys)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest summary as JSON."),
) -> None:
    """Show a bundle's manifest, verify every file's SHA-256 and its signature."""
    from edgecells.edge.backends import available_backends

    b, sig = load_checked(bundle, config)
    s = b.summary()
    s["signature"] = sig.to_dict()
    s["available_backends"] = available_backends()
    if as_json:
        print(jsonsafe.dumps(s, indent=2))
        return
    signed = "signed by trusted key " + sig.key_id if sig.status == "verified" else sig.status
    out.print(
        f"[bold]{b.name}[/] ({s['bundle']}) — [green]verified[/] (schema v1, SHA-256 ok, {signed})"
    )
    out.print(
        f"task {b.task}, input {b.input_size}x{b.input_size} RGB, stain "
        f"{s['stain_normalization']}, classes: {', '.join(b.classes)}; abnormal: "
        f"{', '.join(b.abnormal_classes) or '-'}"
    )
    if b.test_time_views != ["identity"]:
        out.print(
            f"test-time views: {', '.join(b.test_time_views)} (the device averages their "
            "probabilities)"
        )
    t = Table()
    for col in ("model", "backend", "role", "size", "input", "output", "accuracy", "agree"):
        t.add_column(col)
    for m in b.models:
        v = b.validation.get(m.id)
        v = v if isinstance(v, dict) else {}
        q = m.input
        qi = f"{q.dtype}" + (f" s={q.scale:g} zp={q.zero_point}" if q.quantized else "")
        o = m.output
        qo = f"{o.dtype}" + (f" s={o.scale:g} zp={o.zero_point}" if o.quantized else "")
        t.add_row(
            m.id,
            m.backend,
            m.role,
            _fmt_bytes(m.total_bytes),
            qi,
            qo,
            _fmt_pct(v.get("accuracy_int8")),
            _fmt_pct(v.get("agreement")),
        )
    out.print(t)
    prov = b.provenance
    out.print(
        f"source {prov.get('source_model')} ({str(prov.get('source_model_sha256'))[:12]}), "
        f"edgecells {prov.get('edgecells_version')}, created {prov.get('created')}"
    )
    out.print(f"runtimes here: {', '.join(s['available_backends']) or 'none'}")


bundle_app.command("info")(info)
bundle_app.command("verify")(verify)
bundle_app.command("keygen")(keygen)
bundle_app.command("sign")(sign)


def refit(
    bundle: Path = typer.Argument(..., help="Bundle folder to refit (its manifest is rewritten)."),
    data: Path = typer.Option(..., "--data", help="Labelled data folder with splits.csv."),
    model_id: str | None = typer.Option(None, "--model", help="Model id (default: auto)."),
    target_unidentified: float = typer.Option(
        0.02, "--target-unidentified", help="Share of known validation cells left unidentified."
    ),
    views: str | None = typer.Option(
        None,
        "--views",
        help="Test-time views to average, comma-separated (identity, hflip, vflip, "
        "transpose, rot180; e.g. identity,hflip); set before the refit. Default: keep.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the fit report as JSON."),
) -> None:
    """Refit a bundle's temperature, OOD threshold, flag thresholds, per-cell rates and
    domain ranges on the validation split of --data, through the device path."""
    from edgecells.training.abstention import refit_bundle

    if not 0 < target_unidentified < 0.5:
        raise EdgecellsError("--target-unidentified must be in (0, 0.5)")
    with _progress(as_json) as bar:
        task = bar.add_task("classifying val split", total=None)
        rep = refit_bundle(
            bundle,
            data,
            model_id,
            target_unidentified,
            lambda n, t: bar.update(task, total=t, completed=n),
            [v.strip() for v in views.split(",")] if views is not None else None,
        )
    if as_json:
        print(jsonsafe.dumps(rep, indent=2))
        return
    _print_refit(bundle, rep)


def _print_refit(bundle: Any, rep: dict[str, Any]) -> None:
    out.print(f"[bold]{bundle}[/]: thresholds refitted on {rep['data']}")
    if rep.get("test_time_views", ["identity"]) != ["identity"]:
        out.print(f"test-time views: {', '.join(rep['test_time_views'])} (probabilities averaged)")
    out.print(
        f"temperature {rep['temperature']:g} (ECE {rep['ece_before']:.2%} -> "
        f"{rep['ece_after']:.2%}), OOD threshold {rep['ood_threshold']:.4f} "
        f"(unidentified {rep['unidentified_rate']:.2%} of nucleated val cells)"
    )
    out.print(
        f"flag: abnormal_fraction {rep['abnormal_fraction']}, max_unidentified_fraction "
        f"{rep['max_unidentified_fraction']}; per cell: false positive "
        f"{rep['false_positive_rate']:.2%}, abnormal sensitivity "
        f"{rep['per_cell_sensitivity']:.2%}"
    )


bundle_app.command("refit")(refit)


def register(app: typer.Typer, evaluate_app: typer.Typer) -> None:
    from edgecells.cli import _Group

    bundle_app.info.cls = _Group
    app.command("calibrate")(calibrate)
    app.command("convert")(convert)
    app.add_typer(bundle_app, name="bundle")
