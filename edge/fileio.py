"""Small file helpers shared by the device and the host tools.

* :func:`atomic_write` (raises OSError) and :func:`write_bytes_atomic` /
  :func:`write_text_atomic` / :func:`write_json_atomic` (one-line EdgecellsError): the
  one atomic writer — a temporary file in the target's folder, ``fsync``, the mode a
  plain ``open()`` would give, rename — so a crash or power cut leaves either the old
  file or the new one, never half of one.
* :func:`user_cache_dir`: where edgecells may keep caches (``$EDGECELLS_CACHE``, else
  ``$XDG_CACHE_HOME/edgecells``, else ``~/.cache/edgecells``). The package never writes
  into its own install folder (a read-only system install must work, and files left
  there outlive ``pip uninstall``).
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from edgecells.edge.errors import EdgecellsError
from edgecells.edge.jsonsafe import dumps


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


def default_file_mode() -> int:
    """0666 less the process umask: what ``open()`` gives a new file (0644 under the usual
    umask 022). The atomic writer uses it, as ``mkstemp`` makes 0600 files."""
    old = os.umask(0o022)
    os.umask(old)
    return 0o666 & ~old


def disk_error(path: Path, exc: OSError) -> EdgecellsError:
    """A one-line error for a failed write; a full disk says so."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return EdgecellsError(f"{path}: disk full; rows written so far are kept", exit_code=3)
    return EdgecellsError(f"{path}: cannot write ({exc.strerror or exc})", exit_code=3)


def read_limited(path: Path, max_bytes: int, too_large: str) -> bytes:
    """The bytes of a small file, refused (EdgecellsError ``"{path}: {too_large}"``) above
    ``max_bytes``; a read error is one line too."""
    try:
        if path.stat().st_size > max_bytes:
            raise EdgecellsError(f"{path}: {too_large}")
        return path.read_bytes()
    except OSError as exc:
        raise EdgecellsError(f"{path}: cannot read ({exc.strerror or exc})") from None


def atomic_save(
    path: str | os.PathLike[str],
    write: Callable[[IO[bytes]], None],
    mode: int | None = None,
    fsync: bool = True,
) -> None:
    """Call ``write`` with a temporary file beside ``path`` (a unique name, so two
    processes writing the same file at once cannot clash), fsync it, give it ``mode``
    (default: :func:`default_file_mode`), then rename it over ``path``.

    The folder is created if needed. Raises OSError (full disk, no permission: the
    caller decides what a failed write means); the temporary file is removed."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode() if mode is None else mode)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike[str], data: bytes, mode: int | None = None) -> None:
    """:func:`atomic_save` of ``data``."""
    atomic_save(path, lambda f: f.write(data), mode)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, mode: int | None = None) -> None:
    """:func:`atomic_write`; an OSError becomes a one-line :class:`EdgecellsError`."""
    try:
        atomic_write(path, data, mode)
    except OSError as exc:
        raise disk_error(Path(path), exc) from None


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """:func:`write_bytes_atomic` for UTF-8 text."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike[str], data: Any, indent: int | None = 2) -> None:
    """:func:`write_bytes_atomic` for strict JSON (no NaN/Infinity: they become null;
    indented, newline-terminated)."""
    write_text_atomic(path, dumps(data, indent=indent) + "\n")
