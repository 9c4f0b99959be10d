"""Writing, verifying and resolving bundles: the on-disk contract (see docs/bundle.md).

A bundle is an immutable directory ``BUNDLES_DIR/<version>/`` whose ``manifest.json`` lists
every other file with its sha256. ``BUNDLES_DIR/CURRENT`` names the published version and is
swapped atomically, so a reader sees either the old or the new version, never a mix. A signed bundle
also holds ``manifest.sig``, an Ed25519 signature over the manifest's exact bytes (recsys_common.signing).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from recsys_common.errors import BundleMismatch, BundleUnavailable
from recsys_common.onnx_external import NotAModel, external_references
from recsys_common.signing import MAX_SIGNATURE_BYTES, SIGNATURE, BundleTrust, sign_manifest

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CURRENT = "CURRENT"
_STAGING_PREFIX = ".staging-"
# A manifest (with its evaluation report) is tens of KiB; a bigger file is refused before it is parsed.
MAX_MANIFEST_BYTES = 64 << 20


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

    def publish(
        self,
        manifest: dict[str, Any],
        make_current: bool = True,
        keep: int | None = None,
        signing_key: Ed25519PrivateKey | None = None,
    ) -> str:
        """Seal staging as the new version, point CURRENT at it, then keep only the newest ``keep`` versions.

        With a signing_key, manifest.sig (a signature over the manifest's exact bytes) is written in staging,
        so the version appears signed or not at all. Retention never removes the new version, CURRENT, or the
        version CURRENT named before (a service may still be serving it while it swaps).
        """
        try:
            previous = current_version(self.bundles_dir)
        except (BundleUnavailable, BundleMismatch):
            previous = None
        files = {}
        for path in sorted(self._staging.iterdir()):
            if path.name in (MANIFEST, SIGNATURE):
                raise ValueError(f"{path.name} is written by publish(); do not stage it")
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
        manifest_bytes = json.dumps(full, indent=2, sort_keys=True).encode()
        _write_durably(self._staging / MANIFEST, manifest_bytes)
        if signing_key is not None:
            _write_durably(self._staging / SIGNATURE, sign_manifest(manifest_bytes, signing_key))
        _fsync_dir(self._staging)
        final = self.bundles_dir / self.version
        os.rename(self._staging, final)
        _fsync_dir(self.bundles_dir)
        if make_current:
            set_current(self.bundles_dir, self.version)
        if keep is not None:
            prune_versions(self.bundles_dir, keep, protect={self.version, *([previous] if previous else [])})
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


def list_versions(bundles_dir: Path) -> list[str]:
    """Published versions in BUNDLES_DIR, oldest first: by the manifest's created_at (whole seconds), then by
    the manifest file's mtime (versions published within one second), then by name.

    A version is a directory with a manifest.json whose name does not start with "." (staging, temp files).
    """
    found = []
    for path in Path(bundles_dir).iterdir():
        if path.name.startswith(".") or not path.is_dir() or not (path / MANIFEST).is_file():
            continue
        try:
            created = str(json.loads((path / MANIFEST).read_text()).get("created_at", ""))
        except (json.JSONDecodeError, OSError, AttributeError):
            created = ""
        found.append((created, (path / MANIFEST).stat().st_mtime_ns, path.name))
    return [name for *_, name in sorted(found)]


def prune_versions(bundles_dir: Path, keep: int, protect: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Delete all but the newest ``keep`` versions; CURRENT and ``protect`` are never deleted. Returns the removed."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    bundles_dir = Path(bundles_dir)
    with contextlib.suppress(BundleUnavailable, BundleMismatch):
        protect = {*protect, current_version(bundles_dir)}
    versions = list_versions(bundles_dir)
    removed = [v for v in versions[: max(len(versions) - keep, 0)] if v not in protect]
    for version in removed:
        # Rename first (atomic), so a reader never sees a half-deleted version directory.
        doomed = bundles_dir / f".deleting-{version}-{secrets.token_hex(4)}"
        os.rename(bundles_dir / version, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return removed


def rollback(bundles_dir: Path) -> tuple[str, str]:
    """Point CURRENT at the newest kept version older than it; returns (from_version, to_version).

    Raises BundleUnavailable when there is no older version, BundleMismatch when it fails verification.
    """
    bundles_dir = Path(bundles_dir)
    current = current_version(bundles_dir)
    versions = list_versions(bundles_dir)
    if current not in versions:
        raise BundleUnavailable(f"CURRENT names {current}, which is not a published version in {bundles_dir}")
    older = versions[: versions.index(current)]
    if not older:
        raise BundleUnavailable(f"no version older than CURRENT ({current}) is kept in {bundles_dir}: cannot roll back")
    set_current(bundles_dir, older[-1])
    return current, older[-1]


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
    # The id of the trusted key whose signature was verified; None when unsigned or not checked.
    signed_by: str | None = None

    def file(self, name: str) -> Path:
        if name not in self.manifest["files"]:
            raise BundleMismatch(f"bundle {self.version} has no file {name!r}")
        return self.path / name


def _check_name(version: str, name: object) -> str:
    """A manifest file name must be a plain file name inside the bundle directory."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise BundleMismatch(f"bundle {version}: file {name!r} is a path that leaves the bundle directory")
    if name in (MANIFEST, SIGNATURE):
        raise BundleMismatch(f"bundle {version}: file {name} must not be listed in the manifest")
    return name


def _check_layout(version: str, path: Path, files: dict[str, Any]) -> None:
    """Every listed file is a regular file inside the directory, nothing else is there."""
    root = path.resolve()
    for name, meta in files.items():
        _check_name(version, name)
        file = path / name
        if file.is_symlink() and not file.resolve().is_relative_to(root):
            raise BundleMismatch(
                f"bundle {version}: file {name} is a link to {file.resolve()}, a path that leaves the bundle directory"
            )
        if not file.is_file():
            raise BundleMismatch(f"bundle {version}: file {name} is listed in the manifest but missing")
        if not (isinstance(meta, dict) and isinstance(meta.get("bytes"), int) and isinstance(meta.get("sha256"), str)):
            raise BundleMismatch(f"bundle {version}: file {name} has no bytes/sha256 in the manifest")
        size = file.stat().st_size
        if size != meta["bytes"]:
            raise BundleMismatch(f"bundle {version}: file {name} has {size} bytes, the manifest says {meta['bytes']}")
    extra = sorted(p.name for p in path.iterdir() if p.name not in (MANIFEST, SIGNATURE) and p.name not in files)
    if extra:
        raise BundleMismatch(f"bundle {version}: file {extra[0]} is not listed in the manifest (extra files: {extra})")


def _npy_shape(file: Path) -> tuple[int, ...]:
    """The shape in a .npy header, read without loading the array."""
    with file.open("rb") as f:
        major, _ = np.lib.format.read_magic(f)
        if major == 1:
            shape, _, _ = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, _ = np.lib.format.read_array_header_2_0(f)
    return tuple(int(s) for s in shape)


def _faiss_header(file: Path) -> tuple[int, int]:
    """(d, ntotal) from a FAISS index file: every index type starts fourcc, int32 d, int64 ntotal."""
    with file.open("rb") as f:
        head = f.read(16)
    if len(head) < 16:
        raise ValueError("shorter than a FAISS index header")
    return int(np.frombuffer(head, "<i4", 1, 4)[0]), int(np.frombuffer(head, "<i8", 1, 8)[0])


def _section(version: str, parent: dict[str, Any], key: str, prefix: str = "") -> dict[str, Any]:
    """parent[key] as a dict ({} when absent); BundleMismatch when it is something else."""
    value = parent.get(key, {})
    if not isinstance(value, dict):
        raise BundleMismatch(f"bundle {version}: {MANIFEST} {prefix}{key} is {type(value).__name__}, not an object")
    return value


def _check_models(version: str, path: Path, files: dict[str, Any]) -> None:
    """ONNX models keep their data inside themselves, or in a file the manifest pins (onnx_external)."""
    for name in files:
        if not name.endswith(".onnx"):
            continue
        try:
            refs = external_references((path / name).read_bytes())
        except NotAModel as exc:
            raise BundleMismatch(f"bundle {version}: file {name} is {exc}") from None
        for where, location in refs:
            if location not in files or location == name or _is_path(location):
                raise BundleMismatch(
                    f"bundle {version}: file {name} {where} keeps its data in {location!r}, which is not a file "
                    "listed in the manifest (external data must stay inside the bundle)"
                )


def _is_path(name: str) -> bool:
    return "/" in name or "\\" in name or name in (".", "..")


def _check_dimensions(version: str, path: Path, manifest: dict[str, Any]) -> None:
    """The arrays and the index agree with the manifest's embedding dimension and item count (headers only)."""
    files = manifest.get("files", {})
    dim = _section(version, manifest, "embedding").get("dim")
    if dim is None:
        return
    if not isinstance(dim, int) or dim <= 0:
        raise BundleMismatch(f"bundle {version}: {MANIFEST} embedding.dim is {dim!r}, not a positive integer")
    if "item_emb.npy" in files:
        try:
            shape = _npy_shape(path / "item_emb.npy")
        except ValueError as exc:
            raise BundleMismatch(f"bundle {version}: file item_emb.npy is not a .npy array ({exc})") from None
        if len(shape) != 2 or shape[1] != dim:
            raise BundleMismatch(
                f"bundle {version}: file item_emb.npy has shape {shape}, the manifest says dimension {dim}"
            )
    if "items.faiss" in files:
        try:
            d, ntotal = _faiss_header(path / "items.faiss")
        except ValueError as exc:
            raise BundleMismatch(f"bundle {version}: file items.faiss is not a FAISS index ({exc})") from None
        if d != dim:
            raise BundleMismatch(f"bundle {version}: file items.faiss has dimension {d}, the manifest says {dim}")
        want = _section(version, manifest, "index").get("ntotal")
        if want is not None and ntotal != want:
            raise BundleMismatch(
                f"bundle {version}: file items.faiss holds {ntotal} vectors, the manifest index.ntotal says {want}"
            )
    tower = _section(version, _section(version, manifest, "models"), "user_tower", "models.")
    outputs = tower.get("outputs") or []
    for out in outputs if isinstance(outputs, list) else []:
        shape = out.get("shape") if isinstance(out, dict) else None
        if isinstance(shape, list) and shape and isinstance(shape[-1], int) and shape[-1] != dim:
            raise BundleMismatch(
                f"bundle {version}: file {tower.get('file', 'user_tower.onnx')} outputs {out.get('name')} of "
                f"dimension {shape[-1]}, the manifest says {dim}"
            )


def _read_capped(path: Path, limit: int) -> bytes:
    with path.open("rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise BundleMismatch(f"{path.name} is larger than {limit} bytes")
    return data


def _read_signature(version: str, path: Path) -> bytes | None:
    try:
        return _read_capped(path / SIGNATURE, MAX_SIGNATURE_BYTES)
    except FileNotFoundError:
        return None
    except BundleMismatch as exc:
        raise BundleMismatch(f"bundle {version}: file {exc}") from None
    except OSError as exc:
        raise BundleMismatch(f"bundle {version}: cannot read {SIGNATURE} ({exc.strerror})") from None


def open_bundle(bundles_dir: Path, version: str | None = None, trust: BundleTrust | None = None) -> Bundle:
    """Resolve (CURRENT when version is None) and verify a bundle; raise with the file and the reason.

    With trust, manifest.sig is checked against the manifest's bytes before they are parsed and before any
    other file of the bundle is opened (recsys_common.signing.BundleTrust says when a signature is required).
    Only RecsysError subclasses leave this function, whatever is on disk.
    """
    bundles_dir = Path(bundles_dir)
    version = version or current_version(bundles_dir)
    if not version or "/" in version or "\\" in version or "\x00" in version or version.startswith("."):
        raise BundleMismatch(f"bundle {version!r}: not a version name (a path that leaves the bundles directory)")
    path = bundles_dir / version
    manifest_path = path / MANIFEST
    try:
        manifest_bytes = _read_capped(manifest_path, MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise BundleUnavailable(f"bundle {version}: {manifest_path} does not exist") from None
    except BundleMismatch as exc:
        raise BundleMismatch(f"bundle {version}: {exc}") from None
    except (OSError, ValueError) as exc:
        raise BundleMismatch(f"bundle {version}: cannot read {MANIFEST} ({exc})") from None
    signed_by = trust.check(version, manifest_bytes, _read_signature(version, path)) if trust is not None else None
    try:
        manifest = json.loads(manifest_bytes)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BundleMismatch(f"bundle {version}: {MANIFEST} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise BundleMismatch(f"bundle {version}: {MANIFEST} is {type(manifest).__name__}, not a JSON object")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleMismatch(
            f"bundle {version}: {MANIFEST} format_version is {manifest.get('format_version')!r}, "
            f"this code reads {FORMAT_VERSION}"
        )
    if manifest.get("version") != version:
        raise BundleMismatch(f"bundle {version}: {MANIFEST} says version {manifest.get('version')!r}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise BundleMismatch(f"bundle {version}: {MANIFEST} has no files table")
    # Cheap structural checks first (names, extra files, sizes), then checksums, then headers and model
    # references: a bundle is refused before any of its artifacts is loaded.
    try:
        _check_layout(version, path, files)
        for name, meta in files.items():
            digest = sha256_file(path / name)
            if digest != meta["sha256"]:
                raise BundleMismatch(
                    f"bundle {version}: file {name} has sha256 {digest}, the manifest says {meta['sha256']}"
                )
        _check_dimensions(version, path, manifest)
        _check_models(version, path, files)
    except (OSError, ValueError) as exc:  # e.g. a name too long for the filesystem, or not encodable
        raise BundleMismatch(f"bundle {version}: cannot check its files ({type(exc).__name__}: {exc})") from None
    return Bundle(version=version, path=path, manifest=manifest, signed_by=signed_by)
