"""Small file helpers shared by the device and the host tools.

* :func:`write_bytes_atomic` / :func:`write_text_atomic` / :func:`write_json_atomic`:
  the one atomic writer — a temporary file in the target's folder, ``fsync``, rename —
  so a crash or power cut leaves either the old file or the new one, never half of one.
* :func:`user_cache_dir`: where edgecells may keep caches (``$EDGECELLS_CACHE``, else
  ``$XDG_CACHE_HOME/edgecells``, else ``~/.cache/edgecells``). The package never writes
  into its own install folder (a read-only system install must work, and files left
  there outlive ``pip uninstall``).
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from edgecells.edge.errors import EdgecellsError


def user_cache_dir(*parts: str) -> Path:
    """The user's edgecells cache folder (not created), joined with ``parts``."""
    env = os.environ.get("EDGECELLS_CACHE")
    if env:
        root = Path(env)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = Path(base) / "edgecells"
    return root.joinpath(*parts)


def writable_dir(path: Path) -> bool:
    """Create ``path`` if needed and check that a file can be written in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
        return True
    except OSError:
        return False


def disk_error(path: Path, exc: OSError) -> EdgecellsError:
    """A one-line error for a failed write; a full disk says so."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return EdgecellsError(f"{path}: disk full; rows written so far are kept", exit_code=3)
    return EdgecellsError(f"{path}: cannot write ({exc.strerror or exc})", exit_code=3)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename over ``path``.

    The folder is created if needed. An OSError (full disk, no permission) becomes a
    one-line :class:`EdgecellsError`; the temporary file is removed."""
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if mode is not None:
                os.chmod(tmp, mode)
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise disk_error(p, exc) from None


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """:func:`write_bytes_atomic` for UTF-8 text."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike[str], data: Any, indent: int | None = 2) -> None:
    """:func:`write_bytes_atomic` for JSON (indented, newline-terminated)."""
    write_text_atomic(path, json.dumps(data, indent=indent) + "\n")
