"""``edgecells adapt``: fine-tune a bundle on locally labelled cells (site adaptation)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgecells.edge.errors import EdgecellsError

err = Console(stderr=True)
out = Console()


def adapt(
    bundle: str | None = typer.Option(
        None, "--bundle", "-b", help="Parent bundle (default: the shipped reference bundle)."
    ),
    data: Path = typer.Option(
        ..., "--data", help="Labelled cells: DIR/<class>/*.png (from screen --export-crops)."
    ),
    out_dir: Path = typer.Option(..., "--out", "-o", help="New bundle folder to write."),
    epochs: int = typer.Option(8, "--epochs", help="Fine-tuning epochs."),
    replay_data: Path | None = typer.Option(
        None,
        "--replay-data",
        help="The parent's training data (e.g. ../shared/data/pbc): replay from its train "
        "split, forgetting gate on its test split. Default: the bundle's replay set.",
    ),
    source_model: Path | None = typer.Option(
        None,
        "--source-model",
        help="The parent's Keras model, for a bundle that does not carry it (hash-checked).",
    ),
    pixel_size: float | None = typer.Option(
        None,
        "--pixel-size",
        help="Pixel size (µm/px) of single-cell images in --data (as for edgecells classify "
        "--pixel-size): each is cut at the model's field around its centre. Crops from "
        "--export-crops need none. Omit: the image's centre square is used whole.",
    ),
    holdout: float = typer.Option(
        0.2, "--holdout", help="Share of local cells held out for the gate run."
    ),
    train_on_all: bool = typer.Option(
        True,
        "--train-on-all/--no-train-on-all",
        help="After the gate run (fine-tuned without the held-out cells, scored on them), "
        "fine-tune again on every local cell and ship that model.",
    ),
    min_per_class: int = typer.Option(
        3, "--min-per-class", help="Refuse a class folder with fewer labelled cells."
    ),
    max_drop: float = typer.Option(
        1.0, "--max-drop", help="Largest accuracy drop on the original data, points."
    ),
    interpolate: bool = typer.Option(
        True,
        "--interpolate/--no-interpolate",
        help="Pull the fine-tuned weights back toward the parent's (WiSE-FT) as far as "
        "needed to keep the original data's accuracy.",
    ),
    soup: int = typer.Option(
        1,
        "--soup",
        help="Fine-tune this many times (seeds SEED, SEED+1000, ...) and keep the mean of "
        "the weights (a model soup); N times the fine-tuning time.",
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    force: bool = typer.Option(False, "--force", help="Keep a bundle that fails the gate."),
    archive: bool = typer.Option(False, "--archive", help="Also write OUT.tar.gz."),
    threads: int | None = typer.Option(None, "--threads", help="Inference threads."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Adapt a bundle to this microscope: fine-tune on locally labelled cells with the
    original data in the mix, re-calibrate, convert to int8, gate, write a new bundle."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        from edgecells.convert import pipeline, writer
        from edgecells.convert.adapt import adapt_bundle
        from edgecells.training.adapt import AdaptConfig
    except ImportError as exc:
        raise EdgecellsError(f"adapt needs the training toolchain (TensorFlow): {exc}") from None

    if min_per_class < 2:
        raise EdgecellsError(f"--min-per-class must be >= 2, got {min_per_class}")
    cfg = AdaptConfig(
        epochs=epochs,
        holdout=holdout,
        train_on_all=train_on_all,
        seed=seed,
        soup=soup,
        min_per_class=min_per_class,
        interpolate=interpolate,
        select_drop_pp=max_drop,  # the gate's tolerance, on the selection split
    )
    with (
        pipeline.stdout_to_stderr(),
        Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
            disable=as_json,
            transient=True,
        ) as bar,
    ):
        task = bar.add_task("starting", total=None)

        def step(msg: str) -> None:
            bar.update(task, description=msg)

        result = adapt_bundle(
            bundle,
            data,
            out_dir,
            cfg,
            replay_data=replay_data,
            source_model=source_model,
            max_pbc_drop=max_drop,
            pixel_size_um=pixel_size,
            threads=threads,
            step=step,
            on_train_step=lambda k: bar.advance(task, k),
        )
    if archive and (result.passed or force):
        writer.archive(out_dir, out_dir.with_name(out_dir.name + ".tar.gz"))
    if as_json:
        d = result.to_dict()
        d["local_data"] = {k: v for k, v in d["local_data"].items() if k != "files"}
        print(json.dumps(d, indent=2))
    else:
        _print(result.to_dict())
    if not result.passed and not force:
        raise EdgecellsError(
            "adapted bundle failed the gate: "
            + "; ".join(result.failures)
            + f". It is in {out_dir}; use --force to keep it anyway.",
            exit_code=3,
        )


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


LITTLE_KEPT = 0.3  # at or below this interpolation weight, say so


def _interpolation_line(d: dict[str, Any]) -> str:
    """How much of the fine-tuning the new bundle keeps (WiSE-FT weight), with a warning
    when it is little: then the bundle is close to its parent, whatever the gate says."""
    ip = d["interpolation"]
    if ip.get("selected_on") is None:
        return "interpolation off: the fine-tuned weights are kept whole"
    a = float(ip["alpha"])
    line = (
        f"fine-tuning kept: alpha {a:g} (the largest within the gate's tolerance on "
        f"{ip['selected_on']})"
    )
    if 0 < a <= LITTLE_KEPT:
        line += (
            f"\n[yellow]warning:[/] only {a:.0%} of the fine-tuning is kept: every larger "
            "weight lost more accuracy on the original data; the new bundle is close to its "
            "parent (label more cells of the classes it gets wrong, or raise --max-drop)"
        )
    return line


def _print(d: dict[str, Any]) -> None:
    m = d["metrics"]
    t = Table(title=f"adapted bundle -> {d['bundle']}  ({m['format']})")
    for c in ("data", "n", "before", "after"):
        t.add_column(c, justify="left" if c == "data" else "right")
    local_gate = m.get("local_gate")
    if local_gate:  # two passes: the shipped model was trained on the held-out cells too
        b, a = local_gate["before"], local_gate["after"]
        label = "held-out local cells (float, fine-tuned without them)"
        t.add_row(label, str(a["n"]), _pct(b["accuracy"]), _pct(a["accuracy"]))
    else:
        b, a = m["before"]["local_holdout"], m["after"]["local_holdout"]
        t.add_row("held-out local cells", str(a["n"]), _pct(b["accuracy"]), _pct(a["accuracy"]))
    b, a = m["before"]["check"], m["after"]["check"]
    t.add_row(d["check_data"], str(a["n"]), _pct(b["accuracy"]), _pct(a["accuracy"]))
    out.print(t)
    ld = d["local_data"]
    out.print(
        "local cells: "
        + ", ".join(f"{c} {n}" for c, n in ld["counts"].items())
        + f" ({sum(ld['holdout_counts'].values())} held out for the gate"
        + ("; the bundle is trained on all" if local_gate else "")
        + f"); replay: {d['replay']['data']}"
    )
    out.print(_interpolation_line(d))
    gate = "[green]passed[/]" if d["passed"] else "[red]FAILED[/]: " + "; ".join(d["failures"])
    out.print(f"gate {gate}; {d['seconds']:.0f} s, peak memory {d['peak_rss_mb']:.0f} MiB")


def register(app: typer.Typer, evaluate_app: typer.Typer) -> None:
    app.command("adapt")(adapt)
