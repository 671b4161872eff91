"""Signed bundles: Ed25519 signatures over ``manifest.json`` (which hashes every file).

Integrity is not authenticity: anyone who can write a bundle can rewrite its hashes. A
signature made with a private key the device does not hold closes that gap.

``signature.json`` (next to ``manifest.json``)::

    {
      "schema": "edgecells.signature/1",
      "algorithm": "ed25519",
      "key_id": "1f0c...",            # first 16 hex digits of SHA-256(raw public key)
      "public_key": "base64...",      # the signer's raw public key (32 bytes)
      "manifest_sha256": "...",       # SHA-256 of manifest.json, byte for byte
      "signature": "base64..."        # Ed25519 over PAYLOAD (below)
    }

    PAYLOAD = "edgecells.signature/1\\n<key_id>\\n<manifest_sha256>\\n" (UTF-8)

Trust: a device trusts the public keys (PEM, ``*.pub`` or ``*.pem``) found in the folders
or files named by ``$EDGECELLS_TRUSTED_KEYS`` (``os.pathsep``-separated) and by config
``[bundle] trusted_keys`` (default ``/etc/edgecells/trusted-keys``; that default may be
absent, a path given explicitly must exist). With at least one trusted key, a bundle is
refused unless it carries a valid signature by one of them. With none, an unsigned bundle
loads with a one-line warning (and a signed one is checked against its own embedded key,
which catches damage but proves nothing about who made it).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgecells.edge.bundle.manifest import MANIFEST_NAME, loads_strict, read_manifest_bytes
from edgecells.edge.errors import EdgecellsError
from edgecells.edge.fileio import read_limited

SIGNATURE_NAME = "signature.json"
SIG_SCHEMA = "edgecells.signature/1"
ALGORITHM = "ed25519"
ENV_TRUSTED_KEYS = "EDGECELLS_TRUSTED_KEYS"
DEFAULT_TRUSTED_KEYS = "/etc/edgecells/trusted-keys"
PRIVATE_KEY_NAME = "edgecells-signing.key"
PUBLIC_KEY_NAME = "edgecells-signing.pub"
MAX_SIGNATURE_BYTES = 64 << 10
MAX_KEY_BYTES = 64 << 10
KEY_SUFFIXES = (".pub", ".pem")


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise EdgecellsError(f"bundle signatures need the 'cryptography' package ({exc})") from None
    return serialization, ed25519


def _raw_public(pub: Any) -> bytes:
    serialization, _ = _crypto()
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id_of(pub: Any) -> str:
    """First 16 hex digits of the SHA-256 of the raw 32-byte public key."""
    return hashlib.sha256(_raw_public(pub)).hexdigest()[:16]


def payload(key_id: str, manifest_sha256: str) -> bytes:
    return f"{SIG_SCHEMA}\n{key_id}\n{manifest_sha256}\n".encode()


# --------------------------------------------------------------------------- keys


def _write_private(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def keygen(out_dir: str | os.PathLike[str]) -> tuple[Path, Path, str]:
    """A new Ed25519 key pair in ``out_dir``: the private key (PEM, mode 0600) and the
    public key (PEM, to install on devices). Never overwrites. Returns (private, public,
    key id)."""
    serialization, ed25519 = _crypto()
    out = Path(out_dir)
    priv_p, pub_p = out / PRIVATE_KEY_NAME, out / PUBLIC_KEY_NAME
    for p in (priv_p, pub_p):
        if p.exists() or p.is_symlink():
            raise EdgecellsError(
                f"{p}: exists; keygen never overwrites a key (choose another --out)"
            )
    try:
        if not out.exists():
            out.mkdir(parents=True)
            os.chmod(out, 0o700)  # the private key's folder: owner only
        key = ed25519.Ed25519PrivateKey.generate()
        priv = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        pub = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        _write_private(priv_p, priv, 0o600)
        _write_private(pub_p, pub, 0o644 & ~_umask())
    except OSError as exc:
        raise EdgecellsError(f"{out}: cannot write the keys ({exc.strerror or exc})") from None
    return priv_p, pub_p, key_id_of(key.public_key())


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


def _read_key_file(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise EdgecellsError(f"{path}: no such {what} file")
    return read_limited(path, MAX_KEY_BYTES, f"too large for a {what}")


def load_private_key(path: str | os.PathLike[str]) -> Any:
    serialization, ed25519 = _crypto()
    p = Path(path)
    data = _read_key_file(p, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise EdgecellsError(f"{p}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise EdgecellsError(f"{p}: not an Ed25519 private key (use edgecells bundle keygen)")
    return key


def load_public_key(path: str | os.PathLike[str]) -> Any:
    serialization, ed25519 = _crypto()
    p = Path(path)
    data = _read_key_file(p, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise EdgecellsError(f"{p}: not a PEM public key ({exc})") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise EdgecellsError(f"{p}: not an Ed25519 public key")
    return key


def trusted_key_paths(config_value: str | None = DEFAULT_TRUSTED_KEYS) -> list[Path]:
    """Where trusted keys are looked for: ``$EDGECELLS_TRUSTED_KEYS`` and the config value.

    The default config value may be absent; any path given explicitly must exist."""
    paths: list[Path] = []
    env = os.environ.get(ENV_TRUSTED_KEYS, "")
    for part in env.split(os.pathsep):
        if part.strip():
            p = Path(part.strip())
            if not p.exists():
                raise EdgecellsError(f"${ENV_TRUSTED_KEYS}: {p}: no such file or folder")
            paths.append(p)
    if config_value:
        p = Path(config_value)
        if p.exists():
            paths.append(p)
        elif config_value != DEFAULT_TRUSTED_KEYS:
            raise EdgecellsError(f"[bundle] trusted_keys: {p}: no such file or folder")
    return paths


def load_trusted_keys(paths: list[Path]) -> dict[str, tuple[Any, Path]]:
    """key id -> (public key, file) for every key file in ``paths`` (files or folders of
    ``*.pub``/``*.pem``). A file there that is not an Ed25519 public key is an error."""
    keys: dict[str, tuple[Any, Path]] = {}
    for p in paths:
        files = (
            sorted(f for f in p.iterdir() if f.is_file() and f.suffix in KEY_SUFFIXES)
            if p.is_dir()
            else [p]
        )
        for f in files:
            k = load_public_key(f)
            keys.setdefault(key_id_of(k), (k, f))
    return keys


# --------------------------------------------------------------------------- signing


def sign_bundle(root: str | os.PathLike[str], key_path: str | os.PathLike[str]) -> Path:
    """Verify the bundle folder (schema, every file's hash), then write its
    ``signature.json`` over ``manifest.json``. Returns the signature path."""
    from edgecells.edge.bundle import is_archive, load_bundle

    r = Path(root)
    if is_archive(r) or not r.is_dir():
        raise EdgecellsError(
            f"{r}: sign a bundle folder (then archive it: the archive carries the signature)"
        )
    key = load_private_key(key_path)
    b = load_bundle(r)  # never sign a bundle that does not verify
    kid = key_id_of(key.public_key())
    sig = key.sign(payload(kid, b.manifest_sha256))
    doc = {
        "schema": SIG_SCHEMA,
        "algorithm": ALGORITHM,
        "key_id": kid,
        "public_key": base64.b64encode(_raw_public(key.public_key())).decode(),
        "manifest_sha256": b.manifest_sha256,
        "signature": base64.b64encode(sig).decode(),
    }
    out = r / SIGNATURE_NAME
    try:
        fd, tmp = tempfile.mkstemp(prefix=".signature.", dir=r)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(doc, indent=2) + "\n")
            os.chmod(tmp, 0o644 & ~_umask())
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise EdgecellsError(f"{out}: cannot write ({exc.strerror or exc})") from None
    return out


# --------------------------------------------------------------------------- verifying


@dataclass
class SignatureCheck:
    """The outcome of a signature check that did not refuse the bundle."""

    # "verified" (trusted key), "unsigned", "untrusted-ok" (no keys here), "shipped" (the
    # package's own reference bundle, unsigned, on a device without trusted keys: it is as
    # authentic as the installed package itself, so no warning)
    status: str
    key_id: str = ""
    key_file: str = ""
    message: str = ""

    @property
    def warning(self) -> str | None:
        return None if self.status in ("verified", "shipped") else self.message

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _read_signature(root: Path) -> dict[str, Any] | None:
    p = root / SIGNATURE_NAME
    if p.is_symlink():
        raise EdgecellsError(f"{p}: is a symbolic link (refused)")
    if not p.exists():
        return None
    if not p.is_file():
        raise EdgecellsError(f"{p}: not a regular file (refused)")
    try:
        if p.stat().st_size > MAX_SIGNATURE_BYTES:
            raise EdgecellsError(f"{p}: too large for a signature file")
        doc = loads_strict(p.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise EdgecellsError(f"{p}: cannot read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise EdgecellsError(f"{p}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("schema") != SIG_SCHEMA:
        raise EdgecellsError(f"{p}: not an edgecells signature ({SIG_SCHEMA})")
    if doc.get("algorithm") != ALGORITHM:
        raise EdgecellsError(f"{p}: unsupported algorithm {doc.get('algorithm')!r}")
    for k in ("key_id", "public_key", "manifest_sha256", "signature"):
        if not isinstance(doc.get(k), str) or not doc[k]:
            raise EdgecellsError(f"{p}: missing or malformed {k!r}")
    return doc


def _b64(value: str, what: str, p: Path, size: int) -> bytes:
    try:
        raw = base64.b64decode(value, validate=True)
    except (ValueError, TypeError):
        raw = b""
    if len(raw) != size:
        raise EdgecellsError(f"{p}: malformed {what}")
    return raw


def check_signature(
    root: str | os.PathLike[str],
    trusted: dict[str, tuple[Any, Path]],
    manifest_sha256: str | None = None,
) -> SignatureCheck:
    """Check ``root/signature.json`` against ``root/manifest.json`` and the trusted keys.

    Raises EdgecellsError (one line, naming the bundle) when the bundle must be refused:
    a signature that does not match the manifest or does not verify, or — with trusted
    keys — no signature or one by an untrusted key. Otherwise returns the outcome (with a
    warning message when nothing was proved)."""
    _, ed25519 = _crypto()
    from cryptography.exceptions import InvalidSignature

    r = Path(root)
    sp = r / SIGNATURE_NAME
    if manifest_sha256 is None:
        manifest_sha256 = hashlib.sha256(read_manifest_bytes(r)).hexdigest()
    doc = _read_signature(r)
    if doc is None:
        if trusted:
            raise EdgecellsError(
                f"{r}: unsigned bundle refused (this device trusts {len(trusted)} signing "
                f"key(s); sign it with edgecells bundle sign)"
            )
        from edgecells.edge.resources import REFERENCE_BUNDLE_DIR

        if r.resolve() == REFERENCE_BUNDLE_DIR.resolve():
            return SignatureCheck(
                "shipped", message=f"{r}: the package's own reference bundle (not signed)"
            )
        return SignatureCheck(
            "unsigned",
            message=f"{r}: bundle is not signed (no trusted keys installed; authenticity "
            "not checked)",
        )
    if doc["manifest_sha256"] != manifest_sha256:
        raise EdgecellsError(
            f"{sp}: {MANIFEST_NAME} was changed after signing (SHA-256 mismatch); refused"
        )
    sig = _b64(doc["signature"], "signature", sp, 64)
    kid = doc["key_id"]
    msg = payload(kid, manifest_sha256)
    if trusted:
        if kid not in trusted:
            raise EdgecellsError(
                f"{sp}: signed by key {kid}, which this device does not trust; refused"
            )
        key, kfile = trusted[kid]
        try:
            key.verify(sig, msg)
        except InvalidSignature:
            raise EdgecellsError(
                f"{sp}: signature does not verify with trusted key {kid} (forged or "
                "damaged); refused"
            ) from None
        return SignatureCheck("verified", kid, str(kfile), f"signed by trusted key {kid}")
    embedded = ed25519.Ed25519PublicKey.from_public_bytes(
        _b64(doc["public_key"], "public_key", sp, 32)
    )
    if key_id_of(embedded) != kid:
        raise EdgecellsError(f"{sp}: key_id does not match the embedded public key; refused")
    try:
        embedded.verify(sig, msg)
    except InvalidSignature:
        raise EdgecellsError(
            f"{sp}: signature does not verify (forged or damaged); refused"
        ) from None
    return SignatureCheck(
        "untrusted-ok",
        kid,
        message=f"{r}: signed by key {kid}, but no trusted keys are installed here "
        "(authenticity not checked)",
    )


def check_bundle(bundle: Any, trusted_keys: str | None = DEFAULT_TRUSTED_KEYS) -> SignatureCheck:
    """The signature policy for a loaded bundle (``trusted_keys``: config ``[bundle]
    trusted_keys``); records the outcome in ``bundle.signature``."""
    trusted = load_trusted_keys(trusted_key_paths(trusted_keys))
    res = check_signature(bundle.root, trusted, bundle.manifest_sha256 or None)
    bundle.signature = res.to_dict()
    return res
