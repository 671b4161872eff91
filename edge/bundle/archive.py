"""Bundle archives (``.tar.gz``/``.tgz``/``.zip``): safe extraction and the extraction cache."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import stat
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

from edgecells.edge.bundle.manifest import MANIFEST_NAME
from edgecells.edge.bundle.verify import sha256_file
from edgecells.edge.errors import EdgecellsError

log = logging.getLogger("edgecells.bundle")

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
                    # Unix mode in the high 16 bits; zips made without it (Windows tools,
                    # ZipFile.writestr) have no file-type bits: a plain file or folder.
                    mode = (info.external_attr >> 16) & 0xFFFF
                    ftype = stat.S_IFMT(mode)
                    if ftype and stat.S_ISLNK(mode):
                        raise EdgecellsError(
                            f"{src}: archive member {info.filename!r} is a link (not allowed)"
                        )
                    if ftype and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
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


# The extraction cache: archives are extracted once per content (keyed by the archive's
# SHA-256) and reused. Bounded: at most CACHE_MAX_ENTRIES extractions and CACHE_MAX_BYTES
# in all (oldest use evicted first; an archive larger than the cache is refused there);
# ``$EDGECELLS_CACHE_MAX_MB`` changes the size. A cached folder is never trusted for
# being there: its manifest.json and signature.json must equal the archive's own (read
# again on every load), and load_bundle re-hashes every file against that manifest.
CACHE_MAX_ENTRIES = 4
CACHE_MAX_BYTES = 512 << 20
_META_FILES = (MANIFEST_NAME, "signature.json")
_META_MAX_BYTES = 4 << 20


def _cache_dir() -> Path:
    base = os.environ.get("EDGECELLS_CACHE") or os.environ.get("XDG_CACHE_HOME")
    root = Path(base) if base else Path.home() / ".cache"
    if not os.environ.get("EDGECELLS_CACHE"):
        root = root / "edgecells"
    return root / "bundles"


def cache_max_bytes() -> int:
    env = os.environ.get("EDGECELLS_CACHE_MAX_MB", "").strip()
    if not env:
        return CACHE_MAX_BYTES
    try:
        mb = float(env)
    except ValueError:
        mb = -1.0
    if not 1 <= mb <= 1 << 20:
        raise EdgecellsError(f"$EDGECELLS_CACHE_MAX_MB: expected megabytes 1..1048576, got {env!r}")
    return int(mb * (1 << 20))


def _tree_bytes(p: Path) -> int:
    total = 0
    for f in p.rglob("*"):
        try:
            if f.is_file() and not f.is_symlink():
                total += f.stat().st_size
        except OSError:
            pass
    return total


def prune_cache(cache: Path, keep: Path | None = None, max_bytes: int | None = None) -> None:
    """Evict the least recently used extractions until the cache holds at most
    :data:`CACHE_MAX_ENTRIES` folders and ``max_bytes`` bytes; ``keep`` is never evicted.
    Stale temporary folders of interrupted extractions go too."""
    limit = cache_max_bytes() if max_bytes is None else max_bytes
    try:
        entries = [p for p in cache.iterdir() if p.is_dir() and not p.is_symlink()]
    except OSError:
        return
    now = time.time()
    live = []
    for p in entries:
        if p.name.startswith(".extract-"):
            try:
                if now - p.stat().st_mtime > 3600:
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass
            continue
        try:
            live.append((p.stat().st_mtime, p, _tree_bytes(p)))
        except OSError:
            continue
    live.sort(key=lambda t: t[0])  # oldest use first
    total = sum(t[2] for t in live)
    count = len(live)
    for _, p, size in live:
        if count <= CACHE_MAX_ENTRIES and total <= limit:
            break
        if keep is not None and p == keep:
            continue
        shutil.rmtree(p, ignore_errors=True)
        count -= 1
        total -= size


def _archive_meta(archive: Path) -> dict[str, bytes]:
    """manifest.json and signature.json as the archive holds them (at its top or in its
    single top folder), read without extracting anything else."""
    found: dict[str, bytes] = {}

    def want(name: str) -> str | None:
        parts = PurePosixPath(name).parts
        if len(parts) in (1, 2) and parts[-1] in _META_FILES:
            return "/".join(parts)
        return None

    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    key = want(info.filename)
                    if key and not info.is_dir() and info.file_size <= _META_MAX_BYTES:
                        with zf.open(info) as f:
                            found[key] = f.read(_META_MAX_BYTES + 1)
        else:
            with tarfile.open(archive, mode="r:gz") as tf:
                for m in tf:
                    key = want(m.name)
                    if key and m.isfile() and m.size <= _META_MAX_BYTES:
                        stream = tf.extractfile(m)
                        if stream is not None:
                            found[key] = stream.read(_META_MAX_BYTES + 1)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise EdgecellsError(f"{archive}: corrupt or unreadable archive ({exc})") from None
    return found


def _cache_matches(folder: Path, meta: dict[str, bytes]) -> bool:
    """The cached folder's manifest.json/signature.json equal the archive's byte for byte;
    none is a link, and none that the archive lacks has appeared."""
    manifests = [k for k in meta if PurePosixPath(k).name == MANIFEST_NAME]
    if not manifests:
        return False
    try:
        for rel, data in meta.items():
            p = folder / rel
            if p.is_symlink() or not p.is_file() or p.read_bytes() != data:
                return False
        for rel in manifests:
            for name in _META_FILES:
                extra = str(PurePosixPath(rel).parent / name)
                extra = extra[2:] if extra.startswith("./") else extra
                q = folder / extra
                if extra not in meta and (q.exists() or q.is_symlink()):
                    return False
    except OSError:
        return False
    return True


_TEMP_DIRS: list[str] = []


def _remove_temp_dirs() -> None:
    for d in _TEMP_DIRS:
        shutil.rmtree(d, ignore_errors=True)


def _extract_to_temp(archive: Path, why: str) -> Path:
    """Fallback when the cache folder cannot be written: a private temporary folder
    removed when the process exits."""
    log.warning("bundle cache unusable (%s); extracting %s to a temporary folder", why, archive)
    try:
        tmp = tempfile.mkdtemp(prefix="edgecells-bundle-")
    except OSError as exc:
        raise EdgecellsError(
            f"{archive}: cannot extract: the bundle cache is not writable ({why}) and no "
            f"temporary folder could be made ({exc.strerror or exc}); set EDGECELLS_CACHE to "
            "a writable folder"
        ) from None
    if not _TEMP_DIRS:
        atexit.register(_remove_temp_dirs)
    _TEMP_DIRS.append(tmp)
    try:
        return extract_archive(archive, Path(tmp) / "bundle", max_bytes=cache_max_bytes())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def extract_cached(archive: Path, extract_to: Path | None) -> Path:
    if not archive.is_file():
        raise EdgecellsError(f"{archive}: no such bundle archive")
    if extract_to is not None:
        dest = Path(extract_to)
        if dest.exists() and any(dest.iterdir()):
            raise EdgecellsError(f"{dest}: extraction folder exists and is not empty")
        return extract_archive(archive, dest)
    try:
        digest = sha256_file(archive)
    except OSError as exc:
        raise EdgecellsError(f"{archive}: cannot read ({exc.strerror or exc})") from None
    limit = cache_max_bytes()
    cache = _cache_dir()
    final = cache / digest[:32]
    if final.is_dir() and not final.is_symlink():
        if _cache_matches(final, _archive_meta(archive)):
            try:
                os.utime(final)  # most recently used
            except OSError:
                pass
            return final  # every file is re-hashed against this manifest by load_bundle
        log.warning("cached extraction %s differs from %s: extracting again", final, archive)
        try:
            shutil.rmtree(final)
        except OSError as exc:
            return _extract_to_temp(archive, f"cannot replace {final}: {exc.strerror or exc}")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=cache))
    except OSError as exc:
        return _extract_to_temp(archive, f"{cache}: {exc.strerror or exc}")
    try:
        try:
            extract_archive(archive, tmp, max_bytes=limit)
        except EdgecellsError as exc:
            if "too large" in str(exc):
                raise EdgecellsError(
                    f"{exc} (the bundle cache holds at most {limit >> 20} MB: raise "
                    "EDGECELLS_CACHE_MAX_MB or unpack the bundle to a folder)"
                ) from None
            raise
        try:
            os.replace(tmp, final)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_cache(cache, keep=final, max_bytes=limit)
    return final


def bundle_root_in(folder: Path, archive: Path) -> Path:
    """manifest.json at the top of the archive, or inside its single top folder."""
    if (folder / MANIFEST_NAME).is_file():
        return folder
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / MANIFEST_NAME).is_file():
        return entries[0]
    raise EdgecellsError(f"{archive}: archive holds no {MANIFEST_NAME}")
