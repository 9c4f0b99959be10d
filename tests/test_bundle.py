"""The bundle contract: publish is atomic and checksummed; a tampered bundle is refused with the file named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from recsys_common.bundle import BundleWriter, current_version, open_bundle, set_current, sha256_file
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


def _rewrite_manifest(bundle_dir: Path, change) -> None:  # type: ignore[no-untyped-def]
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    change(manifest)
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest))


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def _wrong_dim(bundle_dir: Path) -> None:
    # A consistent-looking bundle whose embeddings are 4-dimensional while the manifest says 8.
    np.save(bundle_dir / "item_emb.npy", np.zeros((41, 4), np.float32))
    size, digest = (bundle_dir / "item_emb.npy").stat().st_size, sha256_file(bundle_dir / "item_emb.npy")
    _rewrite_manifest(bundle_dir, lambda m: m["files"].update({"item_emb.npy": {"sha256": digest, "bytes": size}}))


def _escape(bundle_dir: Path) -> None:
    outside = bundle_dir.parent / "secret.txt"
    outside.write_text("x")
    _rewrite_manifest(
        bundle_dir, lambda m: m["files"].update({"../secret.txt": {"sha256": sha256_file(outside), "bytes": 1}})
    )


def _symlink_out(bundle_dir: Path) -> None:
    outside = bundle_dir.parent / "elsewhere.json"
    outside.write_bytes((bundle_dir / "items.json").read_bytes())
    (bundle_dir / "items.json").unlink()
    (bundle_dir / "items.json").symlink_to(outside)


# Every damage the retrieval service must refuse before loading (tests/test_hot_swap.py reuses this table).
DAMAGES = {
    "flipped byte": (lambda p: _flip_byte(p / "items.faiss"), "file items.faiss has sha256"),
    "truncated file": (lambda p: _truncate(p / "user_tower.onnx"), "file user_tower.onnx has"),
    "missing file": (lambda p: (p / "item_emb.npy").unlink(), "file item_emb.npy is listed in the manifest but"),
    "extra file": (lambda p: (p / "notes.txt").write_text("hi"), "file notes.txt is not listed in the manifest"),
    "extra directory": (lambda p: (p / "sub").mkdir(), "file sub is not listed in the manifest"),
    "wrong dimension": (_wrong_dim, "file item_emb.npy has shape (41, 4), the manifest says dimension 8"),
    "path leaving the bundle": (_escape, "'../secret.txt' is a path that leaves the bundle directory"),
    "symlink leaving the bundle": (_symlink_out, "file items.json is a link to"),
}


@pytest.mark.parametrize("case", sorted(DAMAGES))
def test_damaged_bundle_is_refused_naming_file_and_reason(tmp_path: Path, case: str) -> None:
    damage, message = DAMAGES[case]
    version = make_bundle(tmp_path)
    damage(tmp_path / version)
    with pytest.raises(BundleMismatch) as err:
        open_bundle(tmp_path)
    assert message in str(err.value)


def test_index_header_must_match_the_manifest(tmp_path: Path) -> None:
    version = make_bundle(tmp_path)
    _rewrite_manifest(tmp_path / version, lambda m: m["index"].update({"ntotal": 39}))
    with pytest.raises(BundleMismatch, match="items.faiss holds 40 vectors, the manifest index.ntotal says 39"):
        open_bundle(tmp_path)
    _rewrite_manifest(tmp_path / version, lambda m: m.update({"embedding": {"dim": 16, "metric": "inner_product"}}))
    with pytest.raises(BundleMismatch, match="item_emb.npy has shape"):
        open_bundle(tmp_path)


def test_current_naming_a_path_is_refused(tmp_path: Path) -> None:
    make_bundle(tmp_path)
    with pytest.raises(BundleMismatch, match="not a version name"):
        open_bundle(tmp_path, "../elsewhere")
