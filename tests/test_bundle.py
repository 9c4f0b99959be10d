"""The bundle contract: publish is atomic and checksummed; a tampered bundle is refused with the file named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from recsys_common.bundle import BundleWriter, current_version, open_bundle, set_current
from recsys_common.errors import BundleMismatch, BundleUnavailable
from tests.bundle_factory import make_bundle


def test_publish_lists_every_file_with_its_checksum(tmp_path: Path) -> None:
    version = make_bundle(tmp_path)
    bundle = open_bundle(tmp_path)
    assert bundle.version == version == current_version(tmp_path)
    on_disk = {p.name for p in (tmp_path / version).iterdir()} - {"manifest.json"}
    assert set(bundle.manifest["files"]) == on_disk
    assert all(len(meta["sha256"]) == 64 for meta in bundle.manifest["files"].values())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".staging")]


def test_no_current_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(BundleUnavailable, match="CURRENT"):
        open_bundle(tmp_path)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.joinpath("item_emb.npy").write_bytes(b"x" * p.joinpath("item_emb.npy").stat().st_size), "sha256"),
        (lambda p: p.joinpath("items.json").write_text("{}"), "items.json has 2 bytes"),
        (lambda p: p.joinpath("ranker.onnx").unlink(), "ranker.onnx is listed in the manifest but missing"),
        (lambda p: p.joinpath("manifest.json").write_text("{"), "not valid JSON"),
    ],
)
def test_tampered_bundle_is_refused_naming_the_file(tmp_path: Path, damage, message: str) -> None:  # type: ignore[no-untyped-def]
    version = make_bundle(tmp_path)
    damage(tmp_path / version)
    with pytest.raises(BundleMismatch, match=message):
        open_bundle(tmp_path)


def test_manifest_version_must_match_directory(tmp_path: Path) -> None:
    version = make_bundle(tmp_path)
    shutil.copytree(tmp_path / version, tmp_path / "other")
    with pytest.raises(BundleMismatch, match="says version"):
        open_bundle(tmp_path, "other")


def test_set_current_swaps_pointer_and_refuses_broken_versions(tmp_path: Path) -> None:
    first = make_bundle(tmp_path)
    second = make_bundle(tmp_path, seed=1)
    assert current_version(tmp_path) == second
    set_current(tmp_path, first)
    assert current_version(tmp_path) == first
    (tmp_path / second / "items.json").write_text("[]")
    with pytest.raises(BundleMismatch):
        set_current(tmp_path, second)
    assert current_version(tmp_path) == first


def test_writer_rejects_staged_manifest_and_abort_cleans_up(tmp_path: Path) -> None:
    writer = BundleWriter(tmp_path)
    (writer.staging / "manifest.json").write_text(json.dumps({}))
    with pytest.raises(ValueError, match="written by publish"):
        writer.publish({})
    writer.abort()
    assert not writer.staging.exists()
