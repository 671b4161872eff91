"""User-facing errors: one line, no traceback, a non-zero exit."""

from __future__ import annotations


class EdgecellsError(Exception):
    """An error caused by the user's input or environment (bad file, wrong shape,
    tampered bundle, missing camera...).

    The CLI prints ``error: <message>`` on one line and exits with ``exit_code``.
    Messages name the file and what is wrong.
    """

    exit_code: int = 2

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
