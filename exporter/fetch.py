"""`recsys data fetch`: download a public data set into a local cache, checked against a pinned sha256.

The archive is streamed to a temporary file beside the cache, hashed on the way, and unpacked only when
the hash matches; a mismatch deletes the download. A marker file holding the archive's sha256 makes the
next call a cache hit without touching the network.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CACHE_DIR = Path("~/.cache/recsys")
MARKER = ".sha256"
CHUNK_BYTES = 1 << 20


class FetchError(RuntimeError):
    """A download failed, did not match its pinned sha256, or is not the expected archive."""


@dataclass(frozen=True)
class Archive:
    """A zip on the web and what it must hash to; folder is the data directory inside it."""

    url: str
    sha256: str
    folder: str


# Pinned sha256 of the GroupLens archives. Provenance: tensorflow/datasets
# tensorflow_datasets/url_checksums/movielens.txt (ml-100k.zip 4,924,029 bytes, ml-1m.zip 5,917,549 bytes),
# the same values pinned independently by several other public projects; one of those also pins the
# sha256 of ml-100k's u.data, which matches ../shared/data/ml-100k/u.data. Not downloaded here (no network).
ARCHIVES = {
    "movielens-100k": Archive(
        "https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229",
        "ml-100k",
    ),
    "movielens-1m": Archive(
        "https://files.grouplens.org/datasets/movielens/ml-1m.zip",
        "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
        "ml-1m",
    ),
}


def fetch(
    name: str,
    cache_dir: Path | None = None,
    *,
    url: str | None = None,
    sha256: str | None = None,
    timeout_s: float = 60.0,
) -> Path:
    """Download data set `name` into cache_dir (default ~/.cache/recsys) and return its data directory.

    url and sha256 override the pinned archive (tests use a file:// URL). A cached copy whose marker
    records the expected sha256 is returned without downloading.
    """
    if name not in ARCHIVES:
        raise FetchError(f"unknown data set {name!r}; known: {', '.join(sorted(ARCHIVES))}")
    pinned = ARCHIVES[name]
    archive = Archive(url or pinned.url, (sha256 or pinned.sha256).lower(), pinned.folder)
    cache = (cache_dir or DEFAULT_CACHE_DIR).expanduser()
    target = cache / archive.folder
    marker = target / MARKER
    if marker.is_file() and marker.read_text().strip() == archive.sha256:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    download = _download(archive, cache, timeout_s)
    try:
        _unpack(download, archive, cache, target)
    finally:
        download.unlink(missing_ok=True)
    return target


def _download(archive: Archive, cache: Path, timeout_s: float) -> Path:
    """Stream the archive into a temp file in cache and check its sha256; a mismatch deletes it."""
    digest = hashlib.sha256()
    fd, name = tempfile.mkstemp(prefix=f".{archive.folder}-", suffix=".zip.part", dir=cache)
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(archive.url, timeout=timeout_s) as response:
            while chunk := response.read(CHUNK_BYTES):
                digest.update(chunk)
                out.write(chunk)
    except (urllib.error.URLError, OSError) as exc:
        path.unlink(missing_ok=True)
        raise FetchError(f"{archive.url}: download failed ({exc})") from exc
    if digest.hexdigest() != archive.sha256:
        path.unlink(missing_ok=True)
        raise FetchError(
            f"{archive.url}: sha256 {digest.hexdigest()} does not match the pinned {archive.sha256}; "
            "the download was deleted (corrupt transfer, or the file changed upstream)"
        )
    return path


def _unpack(download: Path, archive: Archive, cache: Path, target: Path) -> None:
    """Extract archive.folder/ from the zip into a temp dir, then move it to target and write the marker."""
    staging = Path(tempfile.mkdtemp(prefix=f".{archive.folder}-", dir=cache))
    try:
        try:
            with zipfile.ZipFile(download) as zf:
                names = zf.namelist()
                unsafe = [n for n in names if n.startswith(("/", "\\")) or ".." in Path(n).parts]
                if unsafe:
                    raise FetchError(f"{archive.url}: refusing unsafe path {unsafe[0]!r} in the archive")
                if not any(n.startswith(f"{archive.folder}/") for n in names):
                    raise FetchError(f"{archive.url}: the archive has no {archive.folder}/ folder")
                zf.extractall(staging)
        except zipfile.BadZipFile as exc:
            raise FetchError(f"{archive.url}: not a zip archive ({exc})") from None
        (staging / archive.folder / MARKER).write_text(archive.sha256 + "\n")
        if target.exists():  # a stale or partial copy from an earlier version or an interrupted run
            shutil.rmtree(target)
        os.replace(staging / archive.folder, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
