"""``edgecells stain fit`` and ``edgecells stain apply``."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from edgecells.commands._ui import err, out, progress
from edgecells.edge.errors import EdgecellsError
from edgecells.edge.imageio import list_images, read_image, write_image

stain_app = typer.Typer(
    help="Fit a stain target and normalize images with it.", no_args_is_help=True
)


def _collect(inputs: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in inputs:
        files += list_images(p)
    if not files:
        raise EdgecellsError(f"no images found in {', '.join(map(str, inputs))}")
    return files


def fit(
    inputs: list[Path] = typer.Argument(..., help="Reference images or folders of them."),
    out_path: Path = typer.Option(..., "--out", "-o", help="Where to write target.json."),
    as_json: bool = typer.Option(False, "--json", help="Print the target as JSON."),
) -> None:
    """Fit a stain target, pooled over the stained pixels of all reference images."""
    from edgecells.edge.stain import StainTarget

    files = _collect(inputs)
    images, names, failed = [], [], []
    with progress(len(files) < 2, remaining=True) as bar:
        task = bar.add_task("reading", total=len(files))
        for f in files:
            try:
                images.append(read_image(f))
                names.append(f.name)
            except EdgecellsError as exc:
                failed.append({"file": str(f), "error": str(exc)})
                err.print(f"[yellow]skipped[/] {exc}")
            bar.advance(task)
    if not images:
        raise EdgecellsError("no readable image to fit the stain target on")
    target = StainTarget.fit(images, names=names)
    target.save(out_path)
    if as_json:
        print(json.dumps({**target.to_dict(), "out": str(out_path), "failed": failed}, indent=2))
    else:
        t = Table(title=f"stain target -> {out_path}")
        for col in ("", "L*", "a*", "b*"):
            t.add_column(col, justify="right")
        t.add_row("mean", *(f"{v:.2f}" for v in target.mean))
        t.add_row("std", *(f"{v:.2f}" for v in target.std))
        out.print(t)
        out.print(
            f"{target.n_images} images used, {target.n_pixels} stained pixels, "
            f"{len(failed)} unreadable"
        )
    if failed:
        raise typer.Exit(1)


def apply(
    input_path: Path = typer.Argument(..., help="An image or a folder of images."),
    target_path: Path = typer.Option(..., "--target", "-t", help="target.json from `stain fit`."),
    out_path: Path = typer.Option(..., "--out", "-o", help="Output image, or output folder."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Normalize an image or every image in a folder (tree mirrored under --out)."""
    from edgecells.edge.stain import ReinhardNormalizer, StainTarget

    norm = ReinhardNormalizer(StainTarget.load(target_path))
    single = input_path.is_file()
    files = _collect([input_path])
    summary: dict[str, object] = {"target": str(target_path), "out": str(out_path)}
    done, unchanged, failed = 0, [], []
    with progress(single, remaining=True) as bar:
        task = bar.add_task("normalizing", total=len(files))
        for f in files:
            dest = out_path if single else out_path / f.relative_to(input_path)
            try:
                res = norm.normalize(read_image(f))
                write_image(dest, res.image)
                done += 1
                if not res.applied:
                    unchanged.append({"file": str(f), "reason": res.reason})
            except EdgecellsError as exc:
                failed.append({"file": str(f), "error": str(exc)})
                err.print(f"[yellow]skipped[/] {exc}")
            bar.advance(task)
    summary.update({"n": len(files), "written": done, "unchanged": unchanged, "failed": failed})
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        out.print(
            f"{done}/{len(files)} images written to {out_path} "
            f"({len(unchanged)} left unchanged, {len(failed)} unreadable)"
        )
        for u in unchanged:
            out.print(f"  unchanged: {u['file']}: {u['reason']}")
    if failed:
        raise typer.Exit(1)


stain_app.command("fit")(fit)
stain_app.command("apply")(apply)


def register(app: typer.Typer, evaluate_app: typer.Typer) -> None:
    from edgecells.cli import _Group

    stain_app.info.cls = _Group
    app.add_typer(stain_app, name="stain")
