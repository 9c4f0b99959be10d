"""Signed bundles: an Ed25519 signature over the exact bytes of manifest.json, kept beside it as manifest.sig.

The manifest pins every other file of a bundle by sha256 and size (recsys_common.bundle), so one
signature over its bytes covers the whole bundle. open_bundle checks it right after reading the
manifest's bytes: before it parses them and before it opens any other file of the bundle.

manifest.sig is a small JSON object::

    {"format": 1, "algorithm": "ed25519", "key_id": "<16 hex>", "signature": "<base64 of 64 bytes>"}

key_id (the first 16 hex digits of sha256 over the raw 32-byte public key) only picks the trusted
key to try; it is not trusted itself. Usage::

    key = generate_key()                                        # the exporter's secret
    sig = sign_manifest(manifest_bytes, key)                    # written as manifest.sig at publish
    trust = BundleTrust(Path("bundle_public.pem"), required=True)
    trust.check("v1", manifest_bytes, sig)                      # -> key_id, or raises BundleMismatch
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from recsys_common.config import ConfigError
from recsys_common.errors import BundleMismatch

SIGNATURE = "manifest.sig"
SIGNATURE_FORMAT = 1
ALGORITHM = "ed25519"
# A signature file is about 150 bytes; anything much larger is not one (and is not read whole).
MAX_SIGNATURE_BYTES = 4096
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]+)-----.+?-----END \1-----", re.S)


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    pkcs8 = serialization.PrivateFormat.PKCS8
    return key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption())


def public_key_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_id(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def write_key_pair(private_file: Path, public_file: Path) -> str:
    """A new signing key: the private key to private_file (created 0600, never overwritten), its public key beside.

    Returns the key id. The public file may later hold several keys (rotation: append the new one).
    """
    key = generate_key()
    fd = os.open(private_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_key_pem(key))
    Path(public_file).write_bytes(public_key_pem(key))
    return key_id(key)


def load_private_key(path: Path, var: str = "signing key") -> Ed25519PrivateKey:
    """The exporter's signing key: an unencrypted PKCS#8 PEM Ed25519 private key."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"Config {var!r} has value '{path}'. Cannot read it ({exc.strerror}).") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(f"Config {var!r} has value '{path}'. Not a PEM private key without a passphrase.") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"Config {var!r} has value '{path}'. Not an Ed25519 key ({type(key).__name__}).")
    return key


def load_public_keys(path: Path, var: str = "bundle public key") -> dict[str, Ed25519PublicKey]:
    """Every Ed25519 public key in a PEM file (several blocks = several trusted keys), by key id."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"Config {var!r} has value '{path}'. Cannot read it ({exc.strerror}).") from None
    keys: dict[str, Ed25519PublicKey] = {}
    for n, block in enumerate(_PEM_BLOCK.finditer(data), 1):
        try:
            key = serialization.load_pem_public_key(block.group(0))
        except (ValueError, UnsupportedAlgorithm):
            raise ConfigError(f"Config {var!r} has value '{path}'. PEM block {n} is not a public key.") from None
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(f"Config {var!r} has value '{path}'. PEM block {n} is not an Ed25519 public key.")
        keys[key_id(key)] = key
    if not keys:
        raise ConfigError(f"Config {var!r} has value '{path}'. It holds no PEM public key.")
    return keys


def sign_manifest(manifest_bytes: bytes, key: Ed25519PrivateKey) -> bytes:
    """The manifest.sig content for exactly these manifest bytes."""
    signature = base64.b64encode(key.sign(manifest_bytes)).decode()
    doc = {"format": SIGNATURE_FORMAT, "algorithm": ALGORITHM, "key_id": key_id(key), "signature": signature}
    return (json.dumps(doc, sort_keys=True) + "\n").encode()


def _parse_signature(version: str, sig_bytes: bytes) -> tuple[str, bytes]:
    """(key_id, 64 signature bytes) from manifest.sig; BundleMismatch naming what is wrong."""
    try:
        doc = json.loads(sig_bytes)
    except (ValueError, RecursionError):
        raise BundleMismatch(f"bundle {version}: file {SIGNATURE} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise BundleMismatch(f"bundle {version}: file {SIGNATURE} is not a JSON object")
    if doc.get("format") != SIGNATURE_FORMAT or doc.get("algorithm") != ALGORITHM:
        raise BundleMismatch(
            f"bundle {version}: file {SIGNATURE} has format {doc.get('format')!r} / algorithm "
            f"{doc.get('algorithm')!r}; this code reads format {SIGNATURE_FORMAT}, {ALGORITHM}"
        )
    kid, sig = doc.get("key_id"), doc.get("signature")
    if not isinstance(kid, str) or not isinstance(sig, str):
        raise BundleMismatch(f"bundle {version}: file {SIGNATURE} has no key_id/signature strings")
    try:
        raw = base64.b64decode(sig, validate=True)
    except (binascii.Error, ValueError):
        raise BundleMismatch(f"bundle {version}: file {SIGNATURE} signature is not base64") from None
    if len(raw) != 64:
        raise BundleMismatch(f"bundle {version}: file {SIGNATURE} signature has {len(raw)} bytes, not 64")
    return kid, raw


def verify_manifest(
    version: str, manifest_bytes: bytes, sig_bytes: bytes, keys: dict[str, Ed25519PublicKey]
) -> str:
    """The id of the trusted key whose signature over manifest_bytes is in sig_bytes; else BundleMismatch."""
    kid, raw = _parse_signature(version, sig_bytes)
    key = keys.get(kid)
    if key is None:
        raise BundleMismatch(
            f"bundle {version}: {SIGNATURE} is signed by key {kid[:16]!r}, which is not trusted "
            f"(trusted: {', '.join(sorted(keys))})"
        )
    try:
        key.verify(raw, manifest_bytes)
    except InvalidSignature:
        raise BundleMismatch(
            f"bundle {version}: {SIGNATURE} does not match manifest.json (key {kid}): the manifest was changed "
            "after signing, or the signature was made for another manifest"
        ) from None
    return kid


@dataclass
class BundleTrust:
    """Which bundles a service accepts: the trusted public keys, and whether a signature is required.

    required (production mode): a bundle without manifest.sig is refused. Not required (dev mode with a
    key configured): a bundle with manifest.sig is verified and refused when it does not verify; one
    without is accepted. The key file is re-read when it changes, so a new key can be trusted (appended)
    before the exporter starts signing with it, without restarting the service.
    """

    public_key_file: Path
    required: bool
    # The setting's name, for error messages (e.g. RECSYS_RANKING_BUNDLE_PUBLIC_KEY_FILE).
    var: str = "bundle public key"
    _keys: dict[str, Ed25519PublicKey] = field(default_factory=dict, init=False, repr=False)
    _stamp: tuple[int, int] | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self.keys()  # a bad key file is a startup error, not a refusal of every bundle later

    @classmethod
    def from_config(cls, mode: str, public_key_file: Path | None, var: str) -> BundleTrust | None:
        """None in dev mode without a key (bundles are not checked); production mode requires the key."""
        if public_key_file is None:
            if mode == "production":
                raise ConfigError(f"Config {var!r} is not set. Production mode serves only signed bundles.")
            return None
        return cls(Path(public_key_file), required=mode == "production", var=var)

    def keys(self) -> dict[str, Ed25519PublicKey]:
        try:
            st = self.public_key_file.stat()
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        with self._lock:
            if stamp is None or stamp != self._stamp:
                self._keys = load_public_keys(self.public_key_file, self.var)
                self._stamp = stamp
            return self._keys

    def check(self, version: str, manifest_bytes: bytes, sig_bytes: bytes | None) -> str | None:
        """The signing key's id (None: unsigned and not required); BundleMismatch when refused."""
        if sig_bytes is None:
            if self.required:
                raise BundleMismatch(
                    f"bundle {version}: file {SIGNATURE} is missing; production mode serves only signed bundles"
                )
            return None
        try:
            keys = self.keys()
        except ConfigError as exc:  # the key file broke after startup: refuse new bundles, keep the old one
            raise BundleMismatch(f"bundle {version}: cannot verify {SIGNATURE}: {exc}") from None
        return verify_manifest(version, manifest_bytes, sig_bytes, keys)
