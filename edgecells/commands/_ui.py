"""What every command shares on the terminal: the two consoles and the progress bar."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

err = Console(stderr=True)  # progress, warnings, errors
out = Console()  # results (kept clean for --json)


def progress(disable: bool = False, *, remaining: bool = False, keep: bool = False) -> Progress:
    """A progress bar on stderr, so stdout stays clean for ``--json``.

    ``remaining`` adds an estimated time left; ``keep`` leaves the finished bar on screen
    (training's epochs) instead of clearing it."""
    cols: list[ProgressColumn] = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    ]
    if remaining:
        cols.append(TimeRemainingColumn())
    return Progress(*cols, console=err, disable=disable, transient=not keep)
