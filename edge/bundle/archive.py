"""Bundle archives (``.tar.gz``/``.tgz``/``.zip``): safe extraction and the extraction cache."""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

from edgecells.edge.bundle.manifest import MANIFEST_NAME
from edgecells.edge.bundle.verify import sha256_file
from edgecells.edge.errors import EdgecellsError

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".zip")

# Safe-extraction limits (a bundle is a few MB; the reference bundle well under 20 MB).
MAX_ARCHIVE_TOTAL_BYTES = 1 << 30  # 1 GiB uncompressed in all
MAX_ARCHIVE_MEMBERS = 256
_COPY_CHUNK = 1 << 20


def is_archive(path: str | os.PathLike[str]) -> bool:
    name = str(path).lower()
    return any(name.endswith(s) for s in ARCHIVE_SUFFIXES)


# --------------------------------------------------------------------------- archives


def _check_member_name(name: str, archive: Path) -> PurePosixPath:
    if not name or "\x00" in name or "\\" in name:
        raise EdgecellsError(f"{archive}: archive member {name!r} has an invalid name")
    p = PurePosixPath(name)
    if p.is_absolute() or name.startswith("/") or (p.parts and ":" in p.parts[0]):
        raise EdgecellsError(f"{archive}: archive member {name!r} has an absolute path")
    if ".." in p.parts:
        raise EdgecellsError(f"{archive}: archive member {name!r} escapes the bundle (..)")
    return p


def _copy_limited(src: Any, dst: Path, budget: list[int], archive: Path, name: str) -> None:
    """Copy a member stream, counting real bytes against the remaining budget."""
    with open(dst, "wb") as out:
        while chunk := src.read(_COPY_CHUNK):
            budget[0] -= len(chunk)
            if budget[0] < 0:
                raise EdgecellsError(
                    f"{archive}: archive too large when extracted (at {name!r}; limit "
                    f"{MAX_ARCHIVE_TOTAL_BYTES} bytes)"
                )
            out.write(chunk)


def extract_archive(
    archive: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    max_bytes: int = MAX_ARCHIVE_TOTAL_BYTES,
    max_members: int = MAX_ARCHIVE_MEMBERS,
) -> Path:
    """Safely extract a ``.tar.gz``/``.tgz``/``.zip`` bundle archive into ``dest``.

    Refused (EdgecellsError naming the archive and member): absolute paths, ``..``
    components, symbolic or hard links, devices/FIFOs, more than ``max_members``
    members, more than ``max_bytes`` uncompressed bytes (counted while copying, so a
    lying header does not help). Only regular files and folders are written. Returns
    ``dest``.
    """
    src = Path(archive)
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    budget = [int(max_bytes)]
    name_l = src.name.lower()
    try:
        if name_l.endswith(".zip"):
            with zipfile.ZipFile(src) as zf:
                infos = zf.infolist()
                if len(infos) > max_members:
                    raise EdgecellsError(f"{src}: archive has too many members ({len(infos)})")
                if sum(i.file_size for i in infos) > max_bytes:
                    raise EdgecellsError(
                        f"{src}: archive too large when extracted (limit {max_bytes} bytes)"
                    )
                for info in infos:
                    rel = _check_member_name(info.filename.rstrip("/") or ".", src)
                    mode = (info.external_attr >> 16) & 0xFFFF
                    if mode and stat.S_ISLNK(mode):
                        raise EdgecellsError(
                            f"{src}: archive member {info.filename!r} is a link (not allowed)"
                        )
                    if mode and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                        raise EdgecellsError(
                            f"{src}: archive member {info.filename!r} is not a regular file"
                        )
                    target = out.joinpath(*rel.parts)
                    if info.is_dir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as stream:
                        _copy_limited(stream, target, budget, src, info.filename)
        elif name_l.endswith((".tar.gz", ".tgz")):
            with tarfile.open(src, mode="r:gz") as tf:
                count = 0
                for member in tf:
                    count += 1
                    if count > max_members:
                        raise EdgecellsError(f"{src}: archive has too many members")
                    rel = _check_member_name(member.name.rstrip("/") or ".", src)
                    if member.issym() or member.islnk():
                        raise EdgecellsError(
                            f"{src}: archive member {member.name!r} is a link (not allowed)"
                        )
                    if member.isdir():
                        out.joinpath(*rel.parts).mkdir(parents=True, exist_ok=True)
                        continue
                    if not member.isfile():
                        raise EdgecellsError(
                            f"{src}: archive member {member.name!r} is not a regular file"
                        )
                    if member.size > budget[0]:
                        raise EdgecellsError(
                            f"{src}: archive too large when extracted (at {member.name!r}; "
                            f"limit {max_bytes} bytes)"
                        )
                    target = out.joinpath(*rel.parts)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    stream = tf.extractfile(member)
                    if stream is None:
                        raise EdgecellsError(f"{src}: cannot read archive member {member.name!r}")
                    with stream:
                        _copy_limited(stream, target, budget, src, member.name)
        else:
            raise EdgecellsError(
                f"{src}: not a bundle archive (expected {', '.join(ARCHIVE_SUFFIXES)})"
            )
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise EdgecellsError(f"{src}: corrupt or unreadable archive ({exc})") from None
    # Defence in depth: nothing written may resolve outside dest.
    root = out.resolve()
    for p in out.rglob("*"):
        if p.is_symlink() or not p.resolve().is_relative_to(root):
            raise EdgecellsError(f"{src}: archive member {p.name!r} escapes the bundle")
    return out


def _cache_dir() -> Path:
    base = os.environ.get("EDGECELLS_CACHE") or os.environ.get("XDG_CACHE_HOME")
    root = Path(base) if base else Path.home() / ".cache"
    if not os.environ.get("EDGECELLS_CACHE"):
        root = root / "edgecells"
    return root / "bundles"


def extract_cached(archive: Path, extract_to: Path | None) -> Path:
    if not archive.is_file():
        raise EdgecellsError(f"{archive}: no such bundle archive")
    if extract_to is not None:
        dest = Path(extract_to)
        if dest.exists() and any(dest.iterdir()):
            raise EdgecellsError(f"{dest}: extraction folder exists and is not empty")
        return extract_archive(archive, dest)
    digest = sha256_file(archive)
    cache = _cache_dir()
    final = cache / digest[:32]
    if final.is_dir():
        return final  # contents are re-verified against the manifest by the caller
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=cache))
    try:
        extract_archive(archive, tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def bundle_root_in(folder: Path, archive: Path) -> Path:
    """manifest.json at the top of the archive, or inside its single top folder."""
    if (folder / MANIFEST_NAME).is_file():
        return folder
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / MANIFEST_NAME).is_file():
        return entries[0]
    raise EdgecellsError(f"{archive}: archive holds no {MANIFEST_NAME}")
