"""``edgecells classify``: single-cell images through the device's preprocessing and model."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

err = Console(stderr=True)
out = Console()


def classify(
    inputs: list[Path] = typer.Argument(..., help="Single-cell images or folders of them."),
    bundle: str | None = typer.Option(
        None,
        "--bundle",
        "-b",
        help="Model bundle (folder, manifest or archive); default: the shipped reference bundle.",
    ),
    pixel_size: float | None = typer.Option(
        None,
        "--pixel-size",
        help="The images' pixel size, µm/px: each is cut at the model's field (µm) around "
        "its centre and resampled to the model's pixel size. Omit: the image's centre "
        "square is taken as the whole field.",
    ),
    backend: str = typer.Option("auto", "--backend", help="Inference runtime."),
    threads: int = typer.Option(1, "--threads", min=1, help="Inference threads."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line per image."),
) -> None:
    """Classify single-cell images: label, confidence, p_abnormal, unidentified per image."""
    from edgecells.edge.backends import open_classifier
    from edgecells.edge.bundle import load_bundle
    from edgecells.edge.classify import classify_images, expand_inputs

    paths = expand_inputs(inputs)
    b = load_bundle(bundle)
    precision = "int8" if b.formats("int8") else "float32"
    clf = open_classifier(b, backend, threads, precision=precision)
    rows = classify_images(paths, b, clf, pixel_size)
    if as_json:
        for r in rows:
            print(json.dumps(r), flush=True)
        return
    t = Table(title=f"{len(paths)} image(s), bundle {b.name} ({b.field_um:.1f} µm field)")
    for col in ("image", "label", "confidence", "p_abnormal"):
        t.add_column(col, justify="left" if col in ("image", "label") else "right")
    for r in rows:
        if "error" in r:
            err.print(f"[yellow]skipped[/] {r['error']}")
            continue
        t.add_row(r["path"], r["label"], f"{r['confidence']:.3f}", f"{r['p_abnormal']:.3f}")
    out.print(t)


def register(app: typer.Typer, evaluate_app: typer.Typer) -> None:
    app.command("classify")(classify)
