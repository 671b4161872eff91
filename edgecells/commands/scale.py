"""``edgecells scale``: the camera's pixel size from red cells (see edge/scale.py)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from edgecells.edge.errors import EdgecellsError


def scale(
    source: str | None = typer.Option(
        None, "--source", "-s", help="Source URI (default: config's [session] source)."
    ),
    frames: int | None = typer.Option(
        None, "--frames", "-n", help="Frames to measure (default: [camera] scale_frames)."
    ),
    config: Path | None = typer.Option(None, "--config", "-c", help="config.toml."),
    rbc_um: float | None = typer.Option(
        None, "--rbc-um", help="Red-cell diameter to assume (default: [camera] rbc_diameter_um)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the estimate as JSON."),
) -> None:
    """Estimate the camera's pixel size (um/px) from the red cells of the first frames.

    Assumes normal red cells (7.5 um); a stage micrometer is better: put its value in
    [camera] pixel_size_um and use this command to cross-check it.
    """
    from edgecells.edge.config import AUTO, load_config
    from edgecells.edge.scale import estimate_from_source

    cfg = load_config(config)
    n = frames if frames is not None else cfg.camera.scale_frames
    if n < 1:
        raise EdgecellsError(f"--frames must be >= 1, got {n}")
    if rbc_um is not None:
        if not rbc_um > 0:
            raise EdgecellsError(f"--rbc-um must be > 0, got {rbc_um}")
        cfg.camera.rbc_diameter_um = rbc_um
    uri = cfg.session.source if source is None else source
    est = estimate_from_source(uri, cfg.camera, n)
    res = {"source": uri or "samples", **est.to_dict()}
    configured = cfg.camera.pixel_size_um
    if configured != AUTO:
        res["configured_um"] = float(configured)
        res["difference"] = round(est.pixel_size_um / float(configured) - 1, 4)
    if as_json:
        typer.echo(json.dumps(res, indent=2))
        return
    t = Table(title=f"Pixel size from red cells ({res['source']})")
    t.add_column("")
    t.add_column("value", justify="right")
    t.add_row("estimate", f"{est.pixel_size_um:.4f} um/px")
    t.add_row("95% interval", f"{est.low_um:.4f} - {est.high_um:.4f}")
    t.add_row("red cells / frames", f"{est.cells} / {est.frames}")
    t.add_row("median diameter", f"{est.diameter_px:.1f} px = {est.rbc_diameter_um} um")
    if "configured_um" in res:
        t.add_row("configured", f"{res['configured_um']:.4f} um/px ({res['difference']:+.1%})")
    Console().print(t)


def register(app: typer.Typer, evaluate_app: typer.Typer) -> None:
    app.command("scale")(scale)
