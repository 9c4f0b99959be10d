"""`recsys data fetch`: sha256 verification, unpacking and the cache, offline through file:// URLs."""

from __future__ import annotations

import hashlib
import re
import zipfile
from pathlib import Path

import pytest

from exporter import fetch as fetch_module
from exporter.data import load_dataset
from exporter.fetch import ARCHIVES, MARKER, Archive, FetchError, fetch
from recsys_cli.main import main

U_DATA = "1\t10\t5\t881250949\n2\t10\t3\t881250950\n2\t20\t4\t881250951\n"


def _zip(path: Path, members: dict[str, str]) -> tuple[str, str]:
    """Write a zip with members; return its file:// URL and sha256."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in members.items():
            zf.writestr(name, text)
    return path.as_uri(), hashlib.sha256(path.read_bytes()).hexdigest()


def test_fetch_verifies_unpacks_and_then_serves_from_the_cache(tmp_path: Path) -> None:
    url, sha = _zip(tmp_path / "ml-100k.zip", {"ml-100k/u.data": U_DATA, "ml-100k/README": "MovieLens"})
    cache = tmp_path / "cache"
    data_dir = fetch("movielens-100k", cache, url=url, sha256=sha)
    assert data_dir == cache / "ml-100k"
    assert (data_dir / "u.data").read_text() == U_DATA and (data_dir / MARKER).read_text().strip() == sha
    assert sorted(p.name for p in cache.iterdir()) == ["ml-100k"]  # no temp files left behind
    ds = load_dataset(data_dir)
    assert ds.user_ids.tolist() == ["1", "2", "2"] and ds.timestamps.tolist() == [881250949, 881250950, 881250951]

    (tmp_path / "ml-100k.zip").unlink()  # a cache hit must not download
    assert fetch("movielens-100k", cache, url=url, sha256=sha) == data_dir


def test_a_stale_copy_is_replaced(tmp_path: Path) -> None:
    url, sha = _zip(tmp_path / "ml-1m.zip", {"ml-1m/ratings.dat": "1::1193::5::978300760\n"})
    stale = tmp_path / "cache" / "ml-1m"
    stale.mkdir(parents=True)
    (stale / "ratings.dat").write_text("half a file")  # an interrupted earlier run: no marker
    data_dir = fetch("movielens-1m", tmp_path / "cache", url=url, sha256=sha)
    assert (data_dir / "ratings.dat").read_text() == "1::1193::5::978300760\n"


def test_sha256_mismatch_deletes_the_download(tmp_path: Path) -> None:
    url, sha = _zip(tmp_path / "ml-100k.zip", {"ml-100k/u.data": U_DATA})
    cache = tmp_path / "cache"
    wrong = "0" * 64
    with pytest.raises(FetchError, match=rf"ml-100k\.zip: sha256 {sha} does not match the pinned {wrong}; "):
        fetch("movielens-100k", cache, url=url, sha256=wrong)
    assert list(cache.iterdir()) == []


@pytest.mark.parametrize(
    ("members", "expected"),
    [
        ({"other/u.data": U_DATA}, r"the archive has no ml-100k/ folder"),
        ({"ml-100k/u.data": U_DATA, "ml-100k/../../evil": "x"}, r"refusing unsafe path 'ml-100k/\.\./\.\./evil'"),
    ],
)
def test_unexpected_archives_are_refused(tmp_path: Path, members: dict[str, str], expected: str) -> None:
    url, sha = _zip(tmp_path / "a.zip", members)
    with pytest.raises(FetchError, match=expected):
        fetch("movielens-100k", tmp_path / "cache", url=url, sha256=sha)
    assert list((tmp_path / "cache").iterdir()) == [] and not (tmp_path / "evil").exists()


def test_not_a_zip_and_unreachable_urls(tmp_path: Path) -> None:
    blob = tmp_path / "blob.zip"
    blob.write_bytes(b"not a zip")
    sha = hashlib.sha256(b"not a zip").hexdigest()
    with pytest.raises(FetchError, match=r"blob\.zip: not a zip archive"):
        fetch("movielens-100k", tmp_path / "cache", url=blob.as_uri(), sha256=sha)
    with pytest.raises(FetchError, match=r"missing\.zip: download failed"):
        fetch("movielens-100k", tmp_path / "cache", url=(tmp_path / "missing.zip").as_uri(), sha256=sha)
    with pytest.raises(FetchError, match=r"unknown data set 'movielens-20m'; known: movielens-100k, movielens-1m"):
        fetch("movielens-20m", tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_pinned_archives() -> None:
    assert set(ARCHIVES) == {"movielens-100k", "movielens-1m"}
    for archive in ARCHIVES.values():
        assert re.fullmatch(r"[0-9a-f]{64}", archive.sha256)
        assert archive.url == f"https://files.grouplens.org/datasets/movielens/{archive.folder}.zip"


def test_cli_prints_the_data_folder_or_the_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url, sha = _zip(tmp_path / "ml-1m.zip", {"ml-1m/ratings.dat": "1::1193::5::978300760\n"})
    monkeypatch.setitem(fetch_module.ARCHIVES, "movielens-1m", Archive(url, sha, "ml-1m"))
    with pytest.raises(SystemExit) as done:
        main(["data", "fetch", "movielens-1m", "--cache-dir", str(tmp_path / "cache")])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == str(tmp_path / "cache" / "ml-1m")

    monkeypatch.setitem(fetch_module.ARCHIVES, "movielens-100k", Archive(url, "f" * 64, "ml-100k"))
    with pytest.raises(SystemExit) as done:
        main(["data", "fetch", "movielens-100k", "--cache-dir", str(tmp_path / "cache")])
    assert done.value.code == 2 and f"does not match the pinned {'f' * 64}" in capsys.readouterr().err
