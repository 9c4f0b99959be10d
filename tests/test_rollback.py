"""Rebuild retention and rollback: the newest N versions are kept, `recsys rollback` re-points CURRENT."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from recsys_cli.main import main
from recsys_common.bundle import (
    CURRENT,
    BundleWriter,
    current_version,
    list_versions,
    open_bundle,
    prune_versions,
    rollback,
)
from recsys_common.errors import BundleMismatch, BundleUnavailable
from tests.bundle_factory import make_bundle


def _dirs(bundles: Path) -> set[str]:
    return {p.name for p in bundles.iterdir()}


def _run(*argv: str) -> int:
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    return int(exc.value.code)


def test_versions_are_listed_oldest_first_and_staging_is_not_a_version(tmp_path: Path) -> None:
    made = [make_bundle(tmp_path, seed=s) for s in range(3)]
    BundleWriter(tmp_path)  # an export in progress: a .staging- directory
    assert list_versions(tmp_path) == made
    assert current_version(tmp_path) == made[-1]


def test_publish_keeps_the_newest_n_versions(tmp_path: Path) -> None:
    made = [make_bundle(tmp_path, seed=s) for s in range(3)]
    writer = BundleWriter(tmp_path)
    (writer.staging / "x.npy").write_bytes(b"not really an array, but a file")
    newest = writer.publish({"note": "fourth"}, keep=2)
    assert list_versions(tmp_path) == [made[-1], newest]  # the version CURRENT named before is kept
    assert current_version(tmp_path) == newest
    assert not [n for n in _dirs(tmp_path) if n.startswith(".")]  # nothing half-deleted or staged is left
    for version in (made[-1], newest):
        open_bundle(tmp_path, version)


def test_pruning_never_removes_current_or_the_previous_one(tmp_path: Path) -> None:
    made = [make_bundle(tmp_path, seed=s) for s in range(4)]
    (tmp_path / CURRENT).write_text(made[0] + "\n")  # rolled back to the oldest
    removed = prune_versions(tmp_path, keep=1, protect={made[1]})
    assert removed == [made[2]]  # made[3] is the newest (kept), made[0] CURRENT, made[1] protected
    assert list_versions(tmp_path) == [made[0], made[1], made[3]]
    with pytest.raises(ValueError, match="keep must be >= 1, got 0"):
        prune_versions(tmp_path, keep=0)


def test_rollback_walks_back_through_kept_versions(tmp_path: Path) -> None:
    made = [make_bundle(tmp_path, seed=s) for s in range(3)]
    assert rollback(tmp_path) == (made[2], made[1])
    assert current_version(tmp_path) == made[1]
    assert _run("rollback", "--bundles", str(tmp_path)) == 0
    assert current_version(tmp_path) == made[0]
    assert open_bundle(tmp_path).version == made[0]


def test_rollback_with_no_older_version_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    only = make_bundle(tmp_path)
    with pytest.raises(BundleUnavailable, match=f"no version older than CURRENT \\({only}\\)"):
        rollback(tmp_path)
    assert _run("rollback", "--bundles", str(tmp_path)) == 2
    assert "cannot roll back" in capsys.readouterr().err
    assert current_version(tmp_path) == only


def test_rollback_without_any_bundle_names_the_missing_pointer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run("rollback", "--bundles", str(tmp_path)) == 2
    assert f"{tmp_path / CURRENT} does not exist" in capsys.readouterr().err


def test_rollback_refuses_a_corrupt_previous_version(tmp_path: Path) -> None:
    made = [make_bundle(tmp_path, seed=s) for s in range(2)]
    emb = tmp_path / made[0] / "item_emb.npy"
    os.chmod(emb, 0o644)
    emb.write_bytes(emb.read_bytes()[:-4] + b"\x00\x00\x80\x7f")  # same size, other bytes
    with pytest.raises(BundleMismatch, match=f"bundle {made[0]}: file item_emb.npy has sha256"):
        rollback(tmp_path)
    assert current_version(tmp_path) == made[1]


def test_versions_with_the_same_second_keep_publish_order(tmp_path: Path) -> None:
    made = [make_bundle(tmp_path, seed=s) for s in range(3)]
    for version in made:  # one created_at for all: the order comes from the manifests' mtimes
        path = tmp_path / version / "manifest.json"
        manifest = json.loads(path.read_text())
        manifest["created_at"] = "2026-01-01T00:00:00Z"
        stat = path.stat()
        os.chmod(path, 0o644)
        path.write_text(json.dumps(manifest))
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert list_versions(tmp_path) == made
