"""Signed certificates: the service's Ed25519 keys, the canonical form, signatures, seed secret.

- **Canonical form**: RFC 8785 (JSON Canonicalization Scheme, the ``rfc8785`` package) of the
  certificate without its ``signature`` field: keys sorted by UTF-16 code units, no
  whitespace, numbers in ECMAScript form, UTF-8. Integers must lie within +-(2^53 - 1) and
  floats must be finite (JCS refuses anything else).
- **signature**: base64 (RFC 4648, padded) of the Ed25519 signature (RFC 8032) of those bytes.
- **key_id**: the first 16 hex digits of the sha256 of the raw 32-byte public key.
- **Keys**: the private key is ``DMAE_SIGNING_KEY`` or ``DATA_DIR/signing/signing_key.pem``
  (PKCS#8 PEM, created at first use with mode 0600). Every public key ever used is kept as
  ``DATA_DIR/signing/public/<key_id>.pem``, so certificates signed before a rotation still
  verify; ``GET /keys`` publishes them all. :func:`rotate_signing_key` makes a new key.
- **Seed secret**: ``DMAE_SEED_SECRET_FILE`` or ``DATA_DIR/signing/seed_secret`` (32 random
  bytes as hex, 0600), the HMAC key of derived seeds (``domain.services.submissions.derive_seed``).

Nothing here needs a database: :func:`canonical_bytes`, :func:`verify_signature` and
:func:`load_public_keys` are what an offline verifier uses.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import secrets
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

if TYPE_CHECKING:
    from domain.config import Settings

log = logging.getLogger("dmae.signing")

ALGORITHM = "Ed25519"
CANONICALIZATION = "RFC 8785 (JCS) of the certificate without its signature field"
SIGNATURE_FIELD = "signature"
KEY_FILE = "signing_key.pem"
SEED_FILE = "seed_secret"
PUBLIC_DIR = "public"
KEY_ID_HEX = 16


class SigningError(ValueError):
    """A key or secret file that cannot be used; the message says which and why."""


# ---------------------------------------------------------------- canonical form, signatures


def canonical_bytes(certificate: Mapping[str, Any]) -> bytes:
    """The bytes a certificate's signature covers: RFC 8785 of every field but ``signature``.

    Raises ValueError for values JCS cannot represent (NaN, infinities, integers beyond
    2^53 - 1, non-string keys)."""
    body = {k: v for k, v in certificate.items() if k != SIGNATURE_FIELD}
    try:
        return rfc8785.dumps(body)
    except (rfc8785.CanonicalizationError, TypeError) as exc:
        raise ValueError(f"the certificate has no canonical JSON form: {exc}") from exc


def raw_public_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    """A short name of a public key: sha256 of its 32 raw bytes, first 16 hex digits."""
    return hashlib.sha256(raw_public_bytes(key)).hexdigest()[:KEY_ID_HEX]


def public_pem(key: Ed25519PublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


@dataclass(frozen=True)
class Signer:
    """A private key and its id; :meth:`sign` returns the signed copy of a certificate."""

    private_key: Ed25519PrivateKey
    key_id: str

    @classmethod
    def of(cls, private_key: Ed25519PrivateKey) -> Signer:
        return cls(private_key, key_id(private_key.public_key()))

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    def sign(self, certificate: Mapping[str, Any]) -> dict[str, Any]:
        """``certificate`` with ``key_id`` set and ``signature`` over all its other fields."""
        body = {k: v for k, v in certificate.items() if k != SIGNATURE_FIELD}
        body["key_id"] = self.key_id
        signature = self.private_key.sign(canonical_bytes(body))
        body[SIGNATURE_FIELD] = base64.b64encode(signature).decode("ascii")
        return body


def verify_signature(
    certificate: Mapping[str, Any], public_keys: Mapping[str, Ed25519PublicKey]
) -> str | None:
    """None when ``certificate``'s signature is valid under the key its ``key_id`` names among
    ``public_keys`` (key id -> key); otherwise the reason, as a sentence."""
    signature = certificate.get(SIGNATURE_FIELD)
    if not isinstance(signature, str) or not signature:
        return "the certificate is not signed (no signature field: made before signing?)"
    kid = certificate.get("key_id")
    if not isinstance(kid, str) or not kid:
        return "the certificate names no key_id"
    key = public_keys.get(kid)
    if key is None:
        known = ", ".join(sorted(public_keys)) or "none"
        return f"signed by key {kid}, which is not among the given public keys ({known})"
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        return "the signature is not base64"
    try:
        key.verify(raw, canonical_bytes(certificate))
    except InvalidSignature:
        return (
            f"the signature does not match the certificate's contents under key {kid}: "
            "it was altered after signing"
        )
    except ValueError as exc:
        return str(exc)
    return None


def load_public_keys(text: str | bytes) -> dict[str, Ed25519PublicKey]:
    """Public keys by key id from PEM text (one or more ``PUBLIC KEY`` blocks) or from the JSON
    that ``GET /keys`` answers. Raises ValueError when there is none or one is not Ed25519."""
    data = text.decode() if isinstance(text, bytes) else text
    pems: list[str] = []
    if data.lstrip().startswith("{"):
        try:
            listed = json.loads(data).get("keys", [])
            pems = [str(k["public_key_pem"]) for k in listed]
        except (ValueError, AttributeError, KeyError, TypeError) as exc:
            raise ValueError(f"not the JSON of GET /keys: {exc}") from exc
    else:
        end = "-----END PUBLIC KEY-----"
        pems = [block + end for block in data.split(end) if "-----BEGIN PUBLIC KEY-----" in block]
    keys: dict[str, Ed25519PublicKey] = {}
    for pem in pems:
        try:
            key = serialization.load_pem_public_key(pem.strip().encode())
        except ValueError as exc:
            raise ValueError(f"unreadable public key: {exc}") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"not an Ed25519 public key: {type(key).__name__}")
        keys[key_id(key)] = key
    if not keys:
        raise ValueError("no public key found (expected PEM 'PUBLIC KEY' blocks or GET /keys JSON)")
    return keys


# ---------------------------------------------------------------- key and secret files


def _write_new(path: Path, data: bytes, mode: int) -> bool:
    """Create ``path`` with ``data`` atomically unless it exists (a concurrent first start of
    the API and a worker keeps exactly one). True if this call created it."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        try:
            os.link(tmp, path)  # fails if it exists: never a half-written file under the name
        except FileExistsError:
            return False
        return True
    finally:
        os.unlink(tmp)


def _private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def key_path(settings: Settings) -> Path:
    return Path(settings.signing_key) if settings.signing_key else settings.signing_dir / KEY_FILE


def public_dir(settings: Settings) -> Path:
    return settings.signing_dir / PUBLIC_DIR


def _read_private(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
        key = serialization.load_pem_private_key(data, password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SigningError(f"cannot read the signing key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"the signing key {path} is not an Ed25519 key ({type(key).__name__})")
    if path.stat().st_mode & 0o077:
        log.warning("the signing key %s is readable by other users: chmod 600 it", path)
    return key


def _publish(settings: Settings, signer: Signer) -> None:
    """Keep the public key under public/ (kept across rotations, listed by GET /keys)."""
    pem = public_pem(signer.public_key).encode()
    _write_new(public_dir(settings) / f"{signer.key_id}.pem", pem, 0o644)


_lock = threading.Lock()
_signers: dict[Path, tuple[tuple[int, int, int], Signer]] = {}


def signer(settings: Settings) -> Signer:
    """The service's current signing key, created at the default location on first use.

    Cached per process and re-read when the file changes (after a rotation, a worker signs with
    the new key from its next certificate). Raises :class:`SigningError` when a key given by
    ``DMAE_SIGNING_KEY`` is missing or unusable."""
    path = key_path(settings)
    with _lock:
        if not path.exists():
            if settings.signing_key:
                raise SigningError(f"DMAE_SIGNING_KEY names {path}, which does not exist")
            _write_new(path, _private_pem(Ed25519PrivateKey.generate()), 0o600)
        st = path.stat()
        stamp = (st.st_mtime_ns, st.st_ino, st.st_size)
        cached = _signers.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        current = Signer.of(_read_private(path))
        _publish(settings, current)
        _signers[path] = (stamp, current)
        return current


@dataclass(frozen=True)
class PublishedKey:
    key_id: str
    public_key: Ed25519PublicKey
    current: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "algorithm": ALGORITHM,
            "public_key_pem": public_pem(self.public_key),
            "public_key": base64.b64encode(raw_public_bytes(self.public_key)).decode("ascii"),
            "current": self.current,
        }


def published_keys(settings: Settings) -> list[PublishedKey]:
    """Every public key this service has signed with: the current one first, then the others
    by key id."""
    current = signer(settings)
    found = {current.key_id: current.public_key}
    for path in sorted(public_dir(settings).glob("*.pem")):
        try:
            found.update(load_public_keys(path.read_text()))
        except (OSError, ValueError) as exc:
            log.warning("skipping unreadable public key %s: %s", path, exc)
    order = [current.key_id, *sorted(k for k in found if k != current.key_id)]
    return [PublishedKey(k, found[k], k == current.key_id) for k in order]


def rotate_signing_key(settings: Settings) -> tuple[str, str]:
    """Replace the generated signing key by a new one; the old public key stays published.
    Returns (old key id, new key id). The old private key is deleted (overwritten by the
    atomic replace). A key given by ``DMAE_SIGNING_KEY`` is the operator's: refused."""
    if settings.signing_key:
        raise SigningError(
            f"DMAE_SIGNING_KEY names the key ({settings.signing_key}): to rotate, replace that "
            "file with a new Ed25519 PEM key; the old public key stays published under "
            f"{public_dir(settings)}"
        )
    old = signer(settings)  # creates the first key if there is none, and publishes it
    path = key_path(settings)
    fresh = Signer.of(Ed25519PrivateKey.generate())
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, _private_pem(fresh.private_key))
        os.fsync(fd)
        os.close(fd)
        _publish(settings, fresh)  # published before it signs anything
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return old.key_id, signer(settings).key_id


_seed_secrets: dict[Path, bytes] = {}  # path -> secret, as first read by this process


def seed_secret(settings: Settings) -> bytes:
    """The HMAC key of derived seeds, created at the default location on first use.

    Read once per process and path (every submission needs it; a stat and a read of the file
    cost about 0.35 ms of CPU per submission under load): a replaced file takes effect when
    the process restarts, and one whose secret changes would make identical requests new runs.

    Raises :class:`SigningError` when a file given by ``DMAE_SEED_SECRET_FILE`` is missing,
    unreadable or empty."""
    given = settings.seed_secret_file
    path = Path(given) if given else settings.signing_dir / SEED_FILE
    known = _seed_secrets.get(path)
    if known is not None:
        return known
    if not path.exists():
        if given:
            raise SigningError(f"DMAE_SEED_SECRET_FILE names {path}, which does not exist")
        _write_new(path, secrets.token_hex(32).encode() + b"\n", 0o600)
    try:
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise SigningError(f"cannot read the seed secret {path}: {exc}") from exc
    if len(secret) < 16:
        raise SigningError(f"the seed secret {path} is shorter than 16 bytes")
    _seed_secrets[path] = secret
    return secret
