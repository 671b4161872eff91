"""``edgecells doctor``: the device self-check (see edge/doctor.py)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

STYLE = {"OK": "green", "WARN": "yellow", "FAIL": "bold red"}


def doctor(
    config: Path | None = typer.Option(None, "--config", "-c", help="config.toml to check."),
    bundle: str | None = typer.Option(None, "--bundle", "-b", help="Bundle (default: config's)."),
    source: str | None = typer.Option(None, "--source", "-s", help="Source (default: config's)."),
    backend: str | None = typer.Option(None, "--backend", help="Backend (default: config's)."),
    only: str | None = typer.Option(
        None, "--only", help="Comma list: backends,config,bundle,camera,disk,system."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Check this device: runtimes, camera, bundle (with a test inference), disk, Pi health.

    Every line is OK, WARN or FAIL with what to do; the exit status is 1 if any FAIL.
    """
    from edgecells.edge.doctor import report_json, run_doctor

    groups = [g.strip() for g in only.split(",") if g.strip()] if only else None
    report = run_doctor(config, bundle, source, backend, groups)
    if as_json:
        typer.echo(report_json(report))
    else:
        table = Table(title="edgecells doctor", show_lines=False)
        table.add_column("check")
        table.add_column("status")
        table.add_column("found")
        table.add_column("what to do")
        for c in report.checks:
            table.add_row(c.name, f"[{STYLE[c.status]}]{c.status}[/]", c.detail, c.fix)
        console = Console()
        console.print(table)
        console.print(f"[{STYLE[report.worst]}]{report.worst}[/]")
    if not report.ok:
        raise typer.Exit(1)


def register(app: typer.Typer, evaluate_app: typer.Typer) -> None:
    app.command("doctor")(doctor)
