"""``edgecells train`` and ``edgecells evaluate classifier``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from edgecells.commands._ui import err, out, progress
from edgecells.edge import jsonsafe
from edgecells.edge.errors import EdgecellsError


def _quiet_tf() -> None:
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _report_skipped(skipped: list[tuple[str, str]]) -> None:
    for path, reason in skipped[:20]:
        err.print(f"[yellow]skipped[/] {path}: {reason}")
    if len(skipped) > 20:
        err.print(f"[yellow]skipped[/] ... and {len(skipped) - 20} more (see metrics.json)")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def train_cmd(
    data: Path = typer.Option(
        ..., "--data", help="Folder with splits.csv, or one folder of images per class."
    ),
    out_path: Path = typer.Option(..., "--out", "-o", help="Model file to write (.keras)."),
    size: int = typer.Option(64, "--size", min=32, max=224, help="Square input size, px."),
    epochs: int = typer.Option(24, "--epochs", min=1, help="Training epochs."),
    seed: int = typer.Option(0, "--seed", help="Random seed (split, init, augmentation)."),
    batch: int = typer.Option(128, "--batch", min=1, help="Batch size."),
    no_stain: bool = typer.Option(
        False, "--no-stain", help="Train without stain normalization (for comparison)."
    ),
    mapping: str = typer.Option(
        "pbc8", "--mapping", help="Class mapping: preset name (pbc8, marrow22) or JSON file."
    ),
    cache: Path | None = typer.Option(
        None, "--cache", help="Cache folder for preprocessed arrays (default ~/.cache/edgecells)."
    ),
    max_steps: int | None = typer.Option(
        None, "--max-steps", min=1, help="Cap steps per epoch (quick trials)."
    ),
    extra_data: list[Path] = typer.Option(
        [],
        "--extra-data",
        help="Another microscope's labelled cells (repeatable): a crop folder with splits.csv "
        "or VOC frames with wbc_subtypes.csv; its train split is mixed in, its val split "
        "helps choose the best epoch.",
    ),
    no_colour: bool = typer.Option(
        False, "--no-colour", help="No stain/colour/optics augmentation (for comparison)."
    ),
    pixel_size: float = typer.Option(
        0.3125,
        "--pixel-size",
        min=0.01,
        max=5.0,
        help="The model's input pixel size, µm/px (field = size x pixel size).",
    ),
    variants: int = typer.Option(
        4, "--variants", min=1, max=32, help="Augmented variants per training cell."
    ),
    augment: list[str] = typer.Option(
        [],
        "--augment",
        help="Override a pre-normalization augmentation range, KEY=VALUE (repeatable), e.g. "
        "blur_p=0.6 blur_sigma=1.5 scale=0.25 (fields of training.augment.ColourAugment).",
    ),
    init: Path | None = typer.Option(
        None, "--init", help="Start from this .keras model's weights (same architecture)."
    ),
    learning_rate: float = typer.Option(
        3e-3, "--lr", min=1e-6, max=1.0, help="Peak learning rate."
    ),
    select: str = typer.Option(
        "mean",
        "--select",
        help="Best epoch by 'mean' val accuracy over the data sets (each counts alike) or "
        "'pooled' over all their val cells (each cell counts alike).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
) -> None:
    """Train the cell classifier from scratch; best epoch (mean or pooled val accuracy over
    the data sets) kept."""
    _quiet_tf()
    from edgecells.edge.mappings import load_mapping
    from edgecells.training.augment import ColourAugment, parse_overrides
    from edgecells.training.train import TrainConfig, TrainProgress, train

    if augment and no_colour:
        raise EdgecellsError("--augment and --no-colour contradict each other")
    colour = parse_overrides(augment) if augment else ColourAugment(enabled=not no_colour)

    cfg = TrainConfig(
        size=size,
        epochs=epochs,
        batch=batch,
        seed=seed,
        stain=not no_stain,
        mapping=mapping,
        max_steps=max_steps,
        pixel_size_um=pixel_size,
        variants=variants,
        init=str(init) if init else None,
        learning_rate=learning_rate,
        colour=colour,
        select=select,
    )
    cmap = load_mapping(mapping)
    with progress(remaining=True, keep=True) as bar:

        class _P(TrainProgress):
            def stage(self, name: str, total: int | None) -> Any:
                task = bar.add_task(name, total=total)
                return lambda n: bar.advance(task, n)

            def epoch_end(self, epoch: int, logs: dict[str, float], best: bool) -> None:
                bar.console.print(
                    f"epoch {epoch}/{epochs}: loss {logs.get('loss', float('nan')):.4f} "
                    f"acc {logs.get('accuracy', float('nan')):.4f} "
                    f"val_acc {logs.get('val_accuracy', float('nan')):.4f} "
                    + " ".join(
                        f"{k[8:]} {v:.4f}" for k, v in logs.items() if k.startswith("val_acc_")
                    )
                    + (" [green]best, saved[/]" if best else "")
                )

        result = train(
            data,
            out_path,
            cfg,
            cache_dir=cache,
            progress=_P(),
            mapping=cmap,
            extra_data=list(extra_data),
        )
    _report_skipped(result.skipped)
    m = result.metrics
    if as_json:
        print(jsonsafe.dumps(m, indent=2))
        return
    t = Table(title=f"{out_path} (best epoch {m['best_epoch']}, {m['seconds']:.0f} s)")
    t.add_column("split")
    for col in ("n", "accuracy", "balanced acc", "AUC abnormal", "sens", "spec"):
        t.add_column(col, justify="right")
    for split in ("val", "test"):
        if split in m:
            r = m[split]
            t.add_row(
                split,
                str(r["n"]),
                *(
                    _fmt(r[k])
                    for k in (
                        "accuracy",
                        "balanced_accuracy",
                        "auc_abnormal",
                        "sensitivity_abnormal",
                        "specificity_abnormal",
                    )
                ),
            )
    out.print(t)
    s = m["summary"]
    out.print(
        f"{s['params']} parameters, {s['flops'] / 1e6:.1f} MFLOPs/image, operating point "
        f"{m['operating_point']:.4f} ({m['operating_point_rule']})"
    )


def evaluate_classifier_cmd(
    model: Path = typer.Argument(..., help="A .keras model, or a bundle folder/archive."),
    data: Path = typer.Option(..., "--data", help="Labelled data folder (as for train)."),
    split: str = typer.Option("test", "--split", help="train, val, test or all."),
    operating_point: float | None = typer.Option(
        None, "--operating-point", help="Abnormal-probability threshold (default: the model's)."
    ),
    backend: str = typer.Option("auto", "--backend", help="Bundle backend (auto, litert, ...)."),
    precision: str = typer.Option("int8", "--precision", help="Bundle model precision."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split for class-folder data."),
    cache: Path | None = typer.Option(None, "--cache", help="Cache folder."),
    plot: Path | None = typer.Option(None, "--plot", help="Write confusion matrix + ROC PNG."),
    pixel_size: float | None = typer.Option(
        None,
        "--pixel-size",
        help="The images' pixel size, µm/px (default: the data set's measured value for "
        "pbc, lisc, ...). Each image is cut at the model's field and resampled.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
) -> None:
    """Accuracy, balanced accuracy, abnormal AUC/sensitivity/specificity, per class."""
    _quiet_tf()
    from edgecells.training.evaluate import evaluate_classifier, plot_evaluation

    with progress(as_json, remaining=True, keep=True) as bar:
        task = bar.add_task(f"preprocess {split}", total=None)
        ev = evaluate_classifier(
            model,
            data,
            split=split,
            operating_point=operating_point,
            backend=backend,
            precision=precision,
            cache_dir=cache,
            progress=lambda n: bar.advance(task, n),
            seed=seed,
            pixel_size_um=pixel_size,
        )
    _report_skipped(ev.skipped)
    if plot is not None:
        plot_evaluation(ev, plot)
    m = ev.metrics.to_dict()
    if as_json:
        print(jsonsafe.dumps(m, indent=2))
        return
    t = Table(title=f"{model} on {data} [{split}], n={m['n']}")
    t.add_column("class")
    for col in ("precision", "recall", "f1", "support"):
        t.add_column(col, justify="right")
    for c, r in m["per_class"].items():
        name = c + (" (abnormal)" if c in m["abnormal_classes"] else "")
        t.add_row(name, _fmt(r["precision"]), _fmt(r["recall"]), _fmt(r["f1"]), str(r["support"]))
    out.print(t)
    s = Table(show_header=False)
    s.add_column("metric")
    s.add_column("value", justify="right")
    for k in ("accuracy", "balanced_accuracy", "auc_abnormal"):
        s.add_row(k, _fmt(m[k]))
    s.add_row(f"sensitivity_abnormal @ {m['operating_point']:.4f}", _fmt(m["sensitivity_abnormal"]))
    s.add_row(f"specificity_abnormal @ {m['operating_point']:.4f}", _fmt(m["specificity_abnormal"]))
    s.add_row("ms_per_image", f"{m['ms_per_image']:.3f}")
    out.print(s)
    if plot is not None:
        out.print(f"plot written to {plot}")


def evaluate_openset_cmd(
    data: Path = typer.Option(..., "--data", help="PBC folder with splits.csv."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for the runs (reused if present)."),
    exclude: str = typer.Option(
        "basophil,monocyte,ig,erythroblast", "--exclude", help="Classes to leave out, one run each."
    ),
    epochs: int = typer.Option(5, "--epochs", help="Training epochs per run."),
    size: int = typer.Option(64, "--size", help="Input size."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    target_unidentified: float = typer.Option(
        0.02, "--target-unidentified", help="Share of known val cells left unidentified."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Leave-one-class-out open-set test: train without each class, fit the temperature
    and OOD threshold on the validation split, report how the left-out cells come out
    on the test split (AUROC per score, unidentified/abnormal shares, simulated slides)."""
    _quiet_tf()
    from edgecells.training.openset import analyse_loco, run_loco

    classes = [c.strip() for c in exclude.split(",") if c.strip()]
    if not classes or epochs < 1:
        raise EdgecellsError("--exclude needs at least one class and --epochs >= 1")
    files = run_loco(
        data,
        out_dir,
        classes,
        epochs,
        size,
        seed,
        log=lambda m: err.print(m) if not as_json else None,
    )
    res = analyse_loco(files, target_unidentified)
    (out_dir / "openset.json").write_text(jsonsafe.dumps(res, indent=2) + "\n", encoding="utf-8")
    if as_json:
        typer.echo(jsonsafe.dumps(res, indent=2))
        return
    t = Table(title=f"Leave-one-class-out ({epochs} epochs each), PBC test split")
    for c in ("left out", "AUROC msp", "energy", "mahalanobis", "knn", "unidentified",
              "unid. or abnormal", "known unid.", "10% slides REVIEW/POS (200)"):  # fmt: skip
        t.add_column(c, justify="right")
    for r in res["classes"]:
        a = r["auroc"]
        t.add_row(
            r["left_out"],
            f"{a['msp']:.3f}",
            f"{a['energy']:.3f}",
            f"{a['mahalanobis']:.3f}",
            f"{a['knn']:.3f}" if "knn" in a else "-",
            f"{r['left_out_unidentified']:.1%}",
            f"{r['left_out_unidentified_or_abnormal']:.1%}",
            f"{r['known_unidentified']:.1%}",
            f"{r['slides']['200']['review_or_positive']:.1%}",
        )
    out.print(t)
    out.print(f"mean AUROC: {res['mean_auroc']}; written to {out_dir / 'openset.json'}")


def register(app: typer.Typer, evaluate_app: typer.Typer) -> None:
    app.command("train")(train_cmd)
    evaluate_app.command("classifier")(evaluate_classifier_cmd)
    evaluate_app.command("openset")(evaluate_openset_cmd)
