"""Writing, verifying and resolving bundles: the on-disk contract (see docs/bundle.md).

A bundle is an immutable directory ``BUNDLES_DIR/<version>/`` whose ``manifest.json`` lists
every other file with its sha256. ``BUNDLES_DIR/CURRENT`` names the published version and is
swapped atomically, so a reader sees either the old or the new version, never a mix.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recsys_common.errors import BundleMismatch, BundleUnavailable

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CURRENT = "CURRENT"
_STAGING_PREFIX = ".staging-"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def new_version(now: dt.datetime | None = None) -> str:
    """A sortable, unique version name: UTC time plus a random suffix."""
    now = now or dt.datetime.now(dt.UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class BundleWriter:
    """Stages a bundle's files and publishes them as one immutable version.

    Usage::

        writer = BundleWriter(bundles_dir)
        np.save(writer.staging / "item_emb.npy", item_emb)
        version = writer.publish({"embedding": {"dim": 64, "metric": "inner_product"}, ...})
    """

    def __init__(self, bundles_dir: Path, version: str | None = None) -> None:
        self.bundles_dir = Path(bundles_dir)
        self.version = version or new_version()
        self.bundles_dir.mkdir(parents=True, exist_ok=True)
        if (self.bundles_dir / self.version).exists():
            raise FileExistsError(f"bundle version {self.version} already exists in {self.bundles_dir}")
        # Staging lives inside bundles_dir so the final rename stays on one filesystem.
        self._staging = self.bundles_dir / f"{_STAGING_PREFIX}{self.version}"
        self._staging.mkdir()

    @property
    def staging(self) -> Path:
        return self._staging

    def publish(self, manifest: dict[str, Any], make_current: bool = True) -> str:
        files = {}
        for path in sorted(self._staging.iterdir()):
            if path.name == MANIFEST:
                raise ValueError(f"{MANIFEST} is written by publish(); do not stage it")
            if not path.is_file():
                raise ValueError(f"bundles are flat: {path.name} is not a regular file")
            with path.open("rb") as f:
                os.fsync(f.fileno())
            files[path.name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        full = {
            "format_version": FORMAT_VERSION,
            "version": self.version,
            "created_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            **{k: v for k, v in manifest.items() if k not in ("files", "version", "format_version")},
            "files": files,
        }
        _write_durably(self._staging / MANIFEST, json.dumps(full, indent=2, sort_keys=True).encode())
        _fsync_dir(self._staging)
        final = self.bundles_dir / self.version
        os.rename(self._staging, final)
        _fsync_dir(self.bundles_dir)
        if make_current:
            set_current(self.bundles_dir, self.version)
        return self.version

    def abort(self) -> None:
        shutil.rmtree(self._staging, ignore_errors=True)


def set_current(bundles_dir: Path, version: str) -> None:
    """Point CURRENT at an existing, verified version (atomic: write a temp file, then os.replace)."""
    bundles_dir = Path(bundles_dir)
    open_bundle(bundles_dir, version)
    tmp = bundles_dir / f".{CURRENT}.{secrets.token_hex(4)}"
    _write_durably(tmp, (version + "\n").encode())
    os.replace(tmp, bundles_dir / CURRENT)
    _fsync_dir(bundles_dir)


def current_version(bundles_dir: Path) -> str:
    pointer = Path(bundles_dir) / CURRENT
    try:
        version = pointer.read_text().strip()
    except FileNotFoundError:
        raise BundleUnavailable(f"no published bundle: {pointer} does not exist (run `recsys export`)") from None
    if not version or "/" in version or version.startswith("."):
        raise BundleMismatch(f"{pointer} holds an invalid version name: {version!r}")
    return version


@dataclass(frozen=True)
class Bundle:
    """A verified, read-only bundle: every file listed in the manifest matched its checksum."""

    version: str
    path: Path
    manifest: dict[str, Any] = field(repr=False)

    def file(self, name: str) -> Path:
        if name not in self.manifest["files"]:
            raise BundleMismatch(f"bundle {self.version} has no file {name!r}")
        return self.path / name


def open_bundle(bundles_dir: Path, version: str | None = None) -> Bundle:
    """Resolve (CURRENT when version is None) and verify a bundle; raise with the file and the reason."""
    bundles_dir = Path(bundles_dir)
    version = version or current_version(bundles_dir)
    path = bundles_dir / version
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise BundleUnavailable(f"bundle {version}: {manifest_path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise BundleMismatch(f"bundle {version}: {MANIFEST} is not valid JSON ({exc})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleMismatch(
            f"bundle {version}: {MANIFEST} format_version is {manifest.get('format_version')!r}, "
            f"this code reads {FORMAT_VERSION}"
        )
    if manifest.get("version") != version:
        raise BundleMismatch(f"bundle {version}: {MANIFEST} says version {manifest.get('version')!r}")
    for name, meta in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise BundleMismatch(f"bundle {version}: file {name} is listed in the manifest but missing")
        size = file.stat().st_size
        if size != meta["bytes"]:
            raise BundleMismatch(f"bundle {version}: file {name} has {size} bytes, the manifest says {meta['bytes']}")
        digest = sha256_file(file)
        if digest != meta["sha256"]:
            raise BundleMismatch(
                f"bundle {version}: file {name} has sha256 {digest}, the manifest says {meta['sha256']}"
            )
    return Bundle(version=version, path=path, manifest=manifest)
