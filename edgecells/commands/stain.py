"""``edgecells stain fit`` and ``edgecells stain apply``."""

from __future__ import annotations

import errno
from pathlib import Path

import typer
from rich.table import Table

from edgecells.commands._ui import err, out, progress
from edgecells.edge import jsonsafe
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
    if out_path.is_dir():
        raise EdgecellsError(f"--out {out_path}: is a folder; give the target file name")
    target = StainTarget.fit(images, names=names)
    target.save(out_path)
    if as_json:
        doc = {**target.to_dict(), "out": str(out_path), "failed": failed}
        print(jsonsafe.dumps(doc, indent=2))
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


def _plan(input_path: Path, out_path: Path, files: list[Path]) -> list[tuple[Path, Path]]:
    """(source, destination) per image; refuses any plan that could overwrite an input or
    re-read its own outputs."""
    from edgecells.edge.imageio import IMAGE_SUFFIXES

    in_r = input_path.resolve()
    out_r = out_path.resolve()
    if input_path.is_file():
        if out_path.is_dir():
            raise EdgecellsError(
                f"--out {out_path}: is a folder; give an output image file name "
                f"(e.g. {out_path / input_path.name})"
            )
        if out_path.suffix.lower() not in IMAGE_SUFFIXES:
            raise EdgecellsError(
                f"--out {out_path}: not an image file name (use {', '.join(IMAGE_SUFFIXES)})"
            )
        if out_r == in_r or (out_path.exists() and out_path.samefile(input_path)):
            raise EdgecellsError(
                f"--out {out_path}: is the input image; stain apply never replaces its input "
                "(choose another file name)"
            )
        return [(input_path, out_path)]
    if out_path.exists() and not out_path.is_dir():
        raise EdgecellsError(f"--out {out_path}: is a file; give an output folder")
    if out_r == in_r or out_r.is_relative_to(in_r):
        raise EdgecellsError(
            f"--out {out_path}: lies inside the input folder {input_path} (the outputs would "
            "replace the raw images or be normalized again on the next run); choose a folder "
            "outside it"
        )
    inputs = {f.resolve() for f in files}
    plan = []
    for f in files:
        dest = out_path / f.relative_to(input_path)
        if dest.resolve() in inputs:
            raise EdgecellsError(f"{dest}: is an input image; stain apply never replaces its input")
        plan.append((f, dest))
    return plan


def apply(
    input_path: Path = typer.Argument(..., help="An image or a folder of images."),
    target_path: Path = typer.Option(..., "--target", "-t", help="target.json from `stain fit`."),
    out_path: Path = typer.Option(
        ..., "--out", "-o", help="Output image, or output folder (never the input)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Normalize an image or every image in a folder (tree mirrored under --out).

    The inputs are never replaced: --out may not be the input image, the input folder or
    a folder inside it."""
    from edgecells.edge.stain import ReinhardNormalizer, StainTarget

    norm = ReinhardNormalizer(StainTarget.load(target_path))
    if not input_path.exists():
        raise EdgecellsError(f"{input_path}: no such file or folder")
    single = input_path.is_file()
    files = _collect([input_path])
    plan = _plan(input_path, out_path, files)
    summary: dict[str, object] = {"target": str(target_path), "out": str(out_path)}
    done, unchanged, failed = 0, [], []
    with progress(single, remaining=True) as bar:
        task = bar.add_task("normalizing", total=len(files))
        for f, dest in plan:
            try:
                res = norm.normalize(read_image(f))
                write_image(dest, res.image)
                done += 1
                if not res.applied:
                    unchanged.append({"file": str(f), "reason": res.reason})
            except EdgecellsError as exc:
                failed.append({"file": str(f), "error": str(exc)})
                err.print(f"[yellow]skipped[/] {exc}")
            except OSError as exc:  # read-only or full destination: stop, one line
                full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
                raise EdgecellsError(
                    f"{dest}: {'disk full' if full else 'cannot write'} "
                    f"({exc.strerror or exc}); {done} of {len(files)} images written",
                    exit_code=3,
                ) from None
            bar.advance(task)
    summary.update({"n": len(files), "written": done, "unchanged": unchanged, "failed": failed})
    if as_json:
        print(jsonsafe.dumps(summary, indent=2))
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
