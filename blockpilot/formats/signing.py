"""Signed bundles: an Ed25519 signature over the exact bytes of a bundle's ``manifest.json``, kept beside it in
``manifest.sig``. The manifest lists every other file's size and sha256, so a trusted signature over it covers
every byte of the bundle: a changed file fails its hash, a changed manifest (a planted file whose hash was added,
an edited precision map) fails the signature, a manifest re-signed by another key names a key nobody trusts.

Keys are PEM files, as OpenSSL writes them: the private key PKCS#8 (unencrypted; keep it 0600, off the car),
the public key SubjectPublicKeyInfo. A key's id is the sha256 (hex) of its 32 raw public-key bytes. The
``cryptography`` package is imported only when a key is used, so unsigned bundles need nothing more.

``manifest.sig`` is JSON: ``format``, ``format_version``, ``algorithm`` ("ed25519"), ``key_id``,
``manifest_sha256`` (to say "the manifest changed" rather than "bad signature") and ``signature`` (base64).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic_io import atomic_write, make_dirs
from ..errors import BlockpilotError
from .bundle import MANIFEST, BundleError

SIGNATURE = "manifest.sig"
SIGNATURE_FORMAT = "blockpilot-signature"
SIGNATURE_VERSION = 1
ALGORITHM = "ed25519"
KEY_NAME = "blockpilot-signing"  # keygen writes <name>.key (private, 0600) and <name>.pub
log = logging.getLogger(__name__)


class KeyFileError(BlockpilotError, ValueError):
    """A key file that cannot be used (missing, not PEM, not Ed25519, the wrong half); the message names it."""


class SigningUnavailableError(BlockpilotError, ImportError):
    """A key was given but the ``cryptography`` package is not installed."""


class SignatureError(BundleError):
    """A bundle refused by its signature; the subclasses say why, the message names the file and key id."""


class UnsignedBundleError(SignatureError):
    """Trusted keys were given and the bundle has no ``manifest.sig``."""


class UntrustedKeyError(SignatureError):
    """The bundle is signed by a key that is not among the trusted keys."""


class ManifestChangedError(SignatureError):
    """The signature by a trusted key does not verify: the manifest (or the signature) changed after signing."""


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives import serialization
    except ImportError as exc:
        raise SigningUnavailableError("signed bundles need the cryptography package: pip install cryptography "
                                      "(blockpilot[export] installs it)") from exc
    return serialization


def _ed25519() -> Any:
    _crypto()
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return ed25519


def _raw_public(public_key: Any) -> bytes:
    s = _crypto()
    return bytes(public_key.public_bytes(s.Encoding.Raw, s.PublicFormat.Raw))


def key_id(public_key: Any) -> str:
    """The id of an Ed25519 public key: sha256 (hex) of its 32 raw bytes."""
    return hashlib.sha256(_raw_public(public_key)).hexdigest()


@dataclass(frozen=True)
class SigningKey:
    """A loaded private key, the file it came from and its public key's id."""

    path: Path
    key: Any  # Ed25519PrivateKey
    key_id: str


@dataclass(frozen=True)
class TrustedKeys:
    """Public keys a bundle may be signed by, by key id (with the file each came from, for messages)."""

    keys: Mapping[str, Any]
    paths: Mapping[str, Path]

    def __bool__(self) -> bool:
        return bool(self.keys)

    def describe(self) -> str:
        return ", ".join(f"{kid[:16]} ({self.paths[kid]})" for kid in self.keys) or "none"

    @classmethod
    def of(cls, signer: SigningKey) -> TrustedKeys:
        """The public half of ``signer`` as the one trusted key."""
        return cls({signer.key_id: signer.key.public_key()}, {signer.key_id: signer.path})


def _read_pem(path: Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    if b"-----BEGIN" not in data:
        raise KeyFileError(f"{path}: not a PEM file (expected a {what}; make a pair with blockpilot keygen)")
    return data


def load_signing_key(path: str | Path) -> SigningKey:
    """The Ed25519 private key in the PKCS#8 PEM file ``path`` (unencrypted)."""
    path = Path(path)
    s, ed25519 = _crypto(), _ed25519()
    data = _read_pem(path, "PKCS#8 private key")
    try:
        key = s.load_pem_private_key(data, password=None)
    except TypeError:
        raise KeyFileError(f"{path}: an encrypted private key; blockpilot signs with an unencrypted PKCS#8 key "
                           "(keep it 0600 on the build machine)") from None
    except ValueError as exc:
        what = "a public key; --sign takes the private key (.key)" if b"PUBLIC KEY" in data else f"unreadable ({exc})"
        raise KeyFileError(f"{path}: {what}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise KeyFileError(f"{path}: a {type(key).__name__}; bundles are signed with Ed25519 keys (blockpilot keygen)")
    if path.stat().st_mode & 0o077:
        log.warning("%s: the private key is readable by other users (mode %o); chmod 600 it", path,
                    path.stat().st_mode & 0o777)
    return SigningKey(path, key, key_id(key.public_key()))


def load_trusted_keys(paths: Sequence[str | Path] | str | Path | TrustedKeys | None) -> TrustedKeys:
    """The Ed25519 public keys in the SubjectPublicKeyInfo PEM files ``paths`` (none: an empty set)."""
    if isinstance(paths, TrustedKeys):
        return paths
    given = [] if paths is None else [paths] if isinstance(paths, (str, Path)) else list(paths)
    files = [Path(p) for p in given if str(p).strip()]
    if not files:
        return TrustedKeys({}, {})
    s, ed25519 = _crypto(), _ed25519()
    keys: dict[str, Any] = {}
    where: dict[str, Path] = {}
    for path in files:
        data = _read_pem(path, "SubjectPublicKeyInfo public key")
        if b"PRIVATE KEY" in data:
            raise KeyFileError(f"{path}: a private key; trust the public key (.pub) and keep the private key off "
                               "the car")
        try:
            key = s.load_pem_public_key(data)
        except ValueError as exc:
            raise KeyFileError(f"{path}: unreadable public key ({exc})") from None
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise KeyFileError(f"{path}: a {type(key).__name__}; bundles are signed with Ed25519 keys")
        kid = key_id(key)
        keys[kid], where[kid] = key, path
    return TrustedKeys(keys, where)


def generate_key_pair(out_dir: str | Path, name: str = KEY_NAME) -> tuple[Path, Path, str]:
    """Write a new Ed25519 pair: ``<name>.key`` (PKCS#8 PEM, mode 0600) and ``<name>.pub`` (SubjectPublicKeyInfo
    PEM, 0644 less the umask) in ``out_dir`` (made 0700 if new); existing files are refused. Returns both paths and
    the key id."""
    s, ed25519 = _crypto(), _ed25519()
    if not name or "/" in name or name.startswith("."):
        raise KeyFileError(f"key name {name!r}: a plain file name without '/' or a leading '.'")
    private, public = Path(out_dir) / f"{name}.key", Path(out_dir) / f"{name}.pub"
    for path in (private, public):
        if path.exists():
            raise KeyFileError(f"{path}: exists already; choose another --name or --out (keys are never replaced)")
    make_dirs(out_dir, perms=0o700)
    key = ed25519.Ed25519PrivateKey.generate()
    atomic_write(private, key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption()), perms=0o600)
    atomic_write(public, key.public_key().public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo))
    return private, public, key_id(key.public_key())


def sign_manifest(bundle_dir: str | Path, signer: SigningKey) -> Path:
    """Sign the exact bytes of ``bundle_dir``'s manifest with ``signer``; writes ``manifest.sig`` atomically (an
    older signature is replaced) and checks it. Returns its path."""
    root = Path(bundle_dir)
    manifest = (root / MANIFEST).read_bytes()
    record = {"format": SIGNATURE_FORMAT, "format_version": SIGNATURE_VERSION, "algorithm": ALGORITHM,
              "key_id": signer.key_id, "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
              "signature": base64.b64encode(signer.key.sign(manifest)).decode("ascii")}
    atomic_write(root / SIGNATURE, json.dumps(record, indent=2) + "\n")
    check_signature(root, manifest, TrustedKeys.of(signer))
    return root / SIGNATURE


def read_signature(bundle_dir: str | Path) -> dict[str, Any] | None:
    """The bundle's signature record (not checked), ``None`` when it has no ``manifest.sig``."""
    path = Path(bundle_dir) / SIGNATURE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SignatureError(f"{path}: not a readable signature ({exc})") from None
    if not (isinstance(record, dict) and record.get("format") == SIGNATURE_FORMAT
            and record.get("algorithm") == ALGORITHM
            and all(isinstance(record.get(k), str) for k in ("key_id", "manifest_sha256", "signature"))):
        raise SignatureError(f"{path}: not a {SIGNATURE_FORMAT} record with an {ALGORITHM} key_id, manifest_sha256 "
                             "and signature")
    if record.get("format_version") != SIGNATURE_VERSION:
        raise SignatureError(f"{path}: signature format version {record.get('format_version')!r}; this blockpilot "
                             f"reads version {SIGNATURE_VERSION}")
    return record


def check_signature(bundle_dir: str | Path, manifest: bytes, trusted: TrustedKeys) -> str:
    """Check that ``manifest`` (the exact bytes read from the bundle's ``manifest.json``) carries a valid signature
    by one of ``trusted``; returns its key id. Raises :class:`UnsignedBundleError`, :class:`UntrustedKeyError` or
    :class:`ManifestChangedError` (or :class:`SignatureError` for an unreadable ``manifest.sig``)."""
    root = Path(bundle_dir)
    record = read_signature(root)
    if record is None:
        raise UnsignedBundleError(f"{root / SIGNATURE}: missing; the bundle is unsigned and only bundles signed by "
                                  f"a trusted key are accepted (trusted: {trusted.describe()})")
    kid = record["key_id"]
    if kid not in trusted.keys:
        raise UntrustedKeyError(f"{root / SIGNATURE}: signed by key {kid}, which is not a trusted key (trusted: "
                                f"{trusted.describe()})")
    try:
        signature = base64.b64decode(record["signature"], validate=True)
        trusted.keys[kid].verify(signature, manifest)
    except Exception as exc:  # InvalidSignature, or a malformed signature
        digest = hashlib.sha256(manifest).hexdigest()
        if digest != record["manifest_sha256"]:
            raise ManifestChangedError(f"{root / MANIFEST}: changed after it was signed by key {kid} (sha256 "
                                       f"{digest[:16]}, signed {record['manifest_sha256'][:16]})") from None
        raise ManifestChangedError(f"{root / SIGNATURE}: the signature by key {kid} does not verify over "
                                   f"{MANIFEST} ({type(exc).__name__}); the signature or the manifest was "
                                   "altered") from None
    return str(kid)


_WARNED: set[Path] = set()


def warn_unchecked(bundle_dir: str | Path) -> None:
    """Log a warning (once per bundle and process) when a signed bundle is loaded without trusted keys."""
    if (where := Path(bundle_dir).resolve()) in _WARNED:
        return
    _WARNED.add(where)
    try:
        record = read_signature(bundle_dir)
    except SignatureError as exc:
        log.warning("%s; no trusted keys were given, so the signature is not checked", exc)
        return
    if record is not None:
        log.warning("%s: signed by key %s, but no trusted keys were given: the signature is not checked (pass "
                    "--trusted-key, or the node's trusted_keys)", Path(bundle_dir), record["key_id"])


def describe_signature(bundle_dir: str | Path) -> str:
    """One line for ``blockpilot inspect``: who signed the bundle (not checked here), or unsigned."""
    record = read_signature(bundle_dir)
    return "none (unsigned)" if record is None else \
        f"{record['algorithm']} by key {record['key_id']} (checked by plan / eval / verify --trusted-key)"
