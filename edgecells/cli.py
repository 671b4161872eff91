"""The ``edgecells`` command line: thin wiring of the command modules."""

from __future__ import annotations

import importlib
from typing import Any

import typer
from typer.core import TyperGroup

from edgecells import __version__
from edgecells.edge.errors import EdgecellsError


class _Group(TyperGroup):
    """A command group that turns an EdgecellsError into one line on stderr and its exit code."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except EdgecellsError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None


app = typer.Typer(
    name="edgecells",
    cls=_Group,
    help="Blood-smear screening on the microscope: stain normalization, int8 conversion, "
    "an edge runtime with measured latency.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
evaluate_app = typer.Typer(
    cls=_Group,
    help="Score a classifier, the cell detector or the screening rule.",
    no_args_is_help=True,
)
app.add_typer(evaluate_app, name="evaluate")

# One module per area; each defines register(app, evaluate_app). Add a module here to add
# its commands. Command modules import heavy libraries inside the command functions only.
COMMAND_MODULES = [
    "edgecells.commands.stain",
    "edgecells.commands.screen",
    "edgecells.commands.convert",
    "edgecells.commands.doctor",
    "edgecells.commands.scale",
    "edgecells.commands.train",
    "edgecells.commands.classify",
    "edgecells.commands.adapt",
]


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"edgecells {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version."
    ),
) -> None:
    """edgecells command line."""


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app, evaluate_app)


def main() -> None:
    """Console-script entry point."""
    app()
