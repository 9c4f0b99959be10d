"""Signed bundles: Ed25519 over the manifest's exact bytes, checked before anything else is read; refusals in
production mode while the old bundle keeps serving (retrieval as a real process over mutual TLS)."""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from protos.recsys.v1 import retrieval_pb2, retrieval_pb2_grpc
from recsys_cli.main import main as recsys_main
from recsys_common.bundle import MANIFEST, BundleWriter, open_bundle, set_current
from recsys_common.config import ConfigError
from recsys_common.errors import BundleMismatch
from recsys_common.signing import (
    SIGNATURE,
    BundleTrust,
    generate_key,
    key_id,
    load_private_key,
    public_key_pem,
    sign_manifest,
    verify_manifest,
)
from recsys_common.snapshot import SnapshotHolder
from tests.bundle_factory import DIM, make_bundle
from tests.pki import CA, tls_env
from tests.test_retrieval_server import RetrievalProcess

KEY = generate_key()
OTHER = generate_key()


def sign_version(bundles: Path, version: str, key: object = KEY) -> None:
    folder = bundles / version
    (folder / SIGNATURE).write_bytes(sign_manifest((folder / MANIFEST).read_bytes(), key))  # type: ignore[arg-type]


def publish_signed(bundles: Path, key: object = KEY, **kw: object) -> str:
    """A tiny bundle signed before CURRENT names it (what `recsys export --signing-key` does in staging)."""
    version = make_bundle(bundles, make_current=False, **kw)  # type: ignore[arg-type]
    sign_version(bundles, version, key)
    set_current(bundles, version)
    return version


def trust_file(tmp_path: Path, *keys: object) -> Path:
    path = tmp_path / "bundle_public.pem"
    path.write_bytes(b"".join(public_key_pem(k) for k in keys))  # type: ignore[arg-type]
    return path


def change_manifest_byte(folder: Path) -> None:
    """Still a valid manifest that passes every other check: only the signature can notice."""
    raw = (folder / MANIFEST).read_bytes()
    assert b'"fingerprint": "test"' in raw
    (folder / MANIFEST).write_bytes(raw.replace(b'"fingerprint": "test"', b'"fingerprint": "tesT"'))


def forge_key_id(folder: Path) -> None:
    """A signature by OTHER that claims to be by KEY."""
    doc = json.loads(sign_manifest((folder / MANIFEST).read_bytes(), OTHER))
    doc["key_id"] = key_id(KEY)
    (folder / SIGNATURE).write_text(json.dumps(doc))


def _edit_signature(folder: Path, **fields: str) -> None:
    doc = json.loads((folder / SIGNATURE).read_text())
    (folder / SIGNATURE).write_text(json.dumps({**doc, **fields}))


# case -> (damage to a signed version, the refusal's words)
TAMPERING: dict[str, tuple[Callable[[Path], None], str]] = {
    "manifest byte changed": (change_manifest_byte, "does not match manifest.json"),
    "signed by another key": (lambda f: sign_version(f.parent, f.name, OTHER), "which is not trusted"),
    "key id forged": (forge_key_id, "does not match manifest.json"),
    "signature not JSON": (lambda f: (f / SIGNATURE).write_bytes(b"\x00garbage"), "is not valid JSON"),
    "signature truncated": (lambda f: _edit_signature(f, signature="AAAA"), "signature has 3 bytes, not 64"),
    "other algorithm": (lambda f: _edit_signature(f, algorithm="rsa"), "this code reads format 1, ed25519"),
    "signature file too big": (lambda f: (f / SIGNATURE).write_bytes(b" " * 5000), "larger than 4096 bytes"),
}


# -- publish and verify ----------------------------------------------------------------------------------
def test_publish_signs_exactly_the_manifest_bytes(tmp_path: Path) -> None:
    writer = BundleWriter(tmp_path)
    np.save(writer.staging / "popularity.npy", np.arange(5, dtype=np.float32))
    version = writer.publish({"data": {"n_items": 4}}, signing_key=KEY)
    folder = tmp_path / version
    assert sorted(p.name for p in folder.iterdir()) == [MANIFEST, SIGNATURE, "popularity.npy"]
    assert verify_manifest(version, (folder / MANIFEST).read_bytes(), (folder / SIGNATURE).read_bytes(), {
        key_id(KEY): KEY.public_key()
    }) == key_id(KEY)  # fmt: skip
    trust = BundleTrust(trust_file(tmp_path, KEY), required=True)
    bundle = open_bundle(tmp_path, trust=trust)
    assert bundle.version == version and bundle.signed_by == key_id(KEY)
    assert open_bundle(tmp_path).signed_by is None  # without a trust, signatures are not looked at
    with pytest.raises(ValueError, match="manifest.sig is written by publish"):
        staged = BundleWriter(tmp_path)
        (staged.staging / SIGNATURE).write_bytes(b"{}")
        staged.publish({})


@pytest.mark.parametrize("case", TAMPERING)
def test_tampered_signatures_are_refused_in_both_modes(tmp_path: Path, case: str) -> None:
    damage, message = TAMPERING[case]
    version = publish_signed(tmp_path)
    damage(tmp_path / version)
    for required in (True, False):
        with pytest.raises(BundleMismatch, match=message):
            open_bundle(tmp_path, trust=BundleTrust(trust_file(tmp_path, KEY), required=required))
    # Every tampering is invisible to the other checks: only the signature refuses it.
    assert open_bundle(tmp_path).version == version


def test_unsigned_bundles_are_refused_only_when_a_signature_is_required(tmp_path: Path) -> None:
    version = make_bundle(tmp_path)
    with pytest.raises(BundleMismatch, match="manifest.sig is missing; production mode serves only signed bundles"):
        open_bundle(tmp_path, trust=BundleTrust(trust_file(tmp_path, KEY), required=True))
    dev = open_bundle(tmp_path, trust=BundleTrust(trust_file(tmp_path, KEY), required=False))
    assert dev.version == version and dev.signed_by is None


def test_the_signature_is_checked_before_any_other_file_is_opened(tmp_path: Path) -> None:
    version = publish_signed(tmp_path)
    folder = (tmp_path / version).resolve()
    opened: list[str] = []
    watching = [False]

    def audit(event: str, args: tuple[object, ...]) -> None:
        if watching[0] and event == "open" and isinstance(args[0], str | Path) and str(args[0]).startswith(str(folder)):
            opened.append(Path(args[0]).name)

    sys.addaudithook(audit)  # cannot be removed; it records only while watching
    trust = BundleTrust(trust_file(tmp_path, KEY), required=True)
    watching[0] = True
    try:
        open_bundle(tmp_path, trust=trust)
        assert opened[:2] == [MANIFEST, SIGNATURE] and len(opened) > 2
        change_manifest_byte(tmp_path / version)
        opened.clear()
        with pytest.raises(BundleMismatch, match="does not match"):
            open_bundle(tmp_path, trust=trust)
    finally:
        watching[0] = False
    assert opened == [MANIFEST, SIGNATURE]  # refused: no artifact was ever opened


def test_keys_rotate_by_appending_to_the_public_key_file(tmp_path: Path) -> None:
    keys = trust_file(tmp_path, KEY)
    holder: SnapshotHolder[str] = SnapshotHolder(
        tmp_path, lambda b: b.version, poll_interval_s=0, trust=BundleTrust(keys, required=True)
    )
    first = publish_signed(tmp_path)
    assert holder.load_current() and holder.get() == first
    second = publish_signed(tmp_path, OTHER, seed=1)
    assert not holder.load_current(raise_errors=False) and "not trusted" in holder.refused[second]
    keys.write_bytes(public_key_pem(KEY) + public_key_pem(OTHER))  # trust the new key (re-read on change) ...
    third = publish_signed(tmp_path, OTHER, seed=2)
    assert holder.load_current(raise_errors=False) and holder.get() == third  # ... and its bundles are served
    keys.write_bytes(public_key_pem(OTHER))  # then retire the old key
    fourth = publish_signed(tmp_path, KEY, seed=3)
    assert not holder.load_current(raise_errors=False) and "not trusted" in holder.refused[fourth]
    assert holder.get() == third


def test_key_files_are_checked_naming_the_setting(tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = tmp_path / "rsa.pem"
    pem.write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(ConfigError, match="'--signing-key' has value .*Not an Ed25519 key"):
        load_private_key(pem, "--signing-key")
    pub = tmp_path / "rsa_public.pem"
    pub.write_bytes(rsa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1))
    with pytest.raises(ConfigError, match="RECSYS_RANKING_BUNDLE_PUBLIC_KEY_FILE.*block 1 is not an Ed25519 public"):
        BundleTrust.from_config("production", pub, "RECSYS_RANKING_BUNDLE_PUBLIC_KEY_FILE")
    pub.write_bytes(public_key_pem(KEY) + b"-----BEGIN PUBLIC KEY-----\nZZZZ\n-----END PUBLIC KEY-----\n")
    with pytest.raises(ConfigError, match="PEM block 2 is not a public key"):
        BundleTrust(pub, required=True)
    (tmp_path / "empty.pem").write_text("")
    with pytest.raises(ConfigError, match="holds no PEM public key"):
        BundleTrust(tmp_path / "empty.pem", required=False)
    with pytest.raises(ConfigError, match="'RECSYS_GATEWAY_BUNDLE_PUBLIC_KEY_FILE' is not set"):
        BundleTrust.from_config("production", None, "RECSYS_GATEWAY_BUNDLE_PUBLIC_KEY_FILE")
    assert BundleTrust.from_config("dev", None, "X") is None


def test_recsys_keys_new_bundle_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        recsys_main(["keys", "new-bundle-key", "--out", str(tmp_path / "keys")])
    assert done.value.code in (0, None)
    private, public = tmp_path / "keys" / "bundle_signing.pem", tmp_path / "keys" / "bundle_public.pem"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = load_private_key(private)
    assert key_id(key) in capsys.readouterr().out
    assert list(BundleTrust(public, required=True).keys()) == [key_id(key)]
    with pytest.raises(SystemExit) as again:
        recsys_main(["keys", "new-bundle-key", "--out", str(tmp_path / "keys")])
    assert again.value.code == 2 and "not overwriting" in capsys.readouterr().err
    assert load_private_key(private).private_bytes_raw() == key.private_bytes_raw()


def test_export_refuses_a_bad_signing_key_before_training(tmp_path: Path) -> None:
    from exporter.config import ExportConfig
    from exporter.pipeline import run_export

    bad = tmp_path / "key.pem"
    bad.write_text("not a key")
    with pytest.raises(ConfigError, match="'--signing-key' has value .*Not a PEM private key"):
        run_export(ExportConfig(), tmp_path / "no-data", tmp_path / "bundles", progress=False, signing_key=bad)
    assert not (tmp_path / "bundles").exists()


# -- production mode, as a real process ---------------------------------------------------------------------
def test_production_refuses_unsigned_and_tampered_bundles_and_keeps_serving_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundles = tmp_path / "bundles"
    ca = CA(tmp_path / "pki", "internal")
    server, client = ca.issue("retrieval"), ca.issue("gateway")
    env = {
        **tls_env("RECSYS_RETRIEVAL_", server, ca),
        "RECSYS_RETRIEVAL_MODE": "production",
        "RECSYS_RETRIEVAL_BUNDLE_PUBLIC_KEY_FILE": str(trust_file(tmp_path, KEY)),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    good = publish_signed(bundles)
    proc = RetrievalProcess(bundles, poll_interval_s=0.05)
    pem = (ca.cert_file.read_bytes(), client.key_file.read_bytes(), client.cert_file.read_bytes())
    channel = grpc.secure_channel(proc.address, grpc.ssl_channel_credentials(*pem))
    stub = retrieval_pb2_grpc.RetrievalStub(channel)

    def served() -> str:
        request = retrieval_pb2.SearchRequest(vector=retrieval_pb2.Vector(values=np.eye(DIM)[0].tolist()), k=3)
        reply = stub.Search(request, timeout=5)
        assert len(reply.items) == 3
        return reply.bundle_version

    try:
        assert served() == good
        bad_versions = {}
        unsigned = make_bundle(bundles, seed=1)
        bad_versions[unsigned] = "manifest.sig is missing"
        proc.wait_log(f"refused bundle {unsigned}", timeout_s=30)
        assert served() == good, "unsigned"
        for n, case in enumerate(("manifest byte changed", "signed by another key", "key id forged"), 2):
            damage, message = TAMPERING[case]
            version = make_bundle(bundles, seed=n, make_current=False)
            sign_version(bundles, version)
            damage(bundles / version)
            os.replace(_pointer(bundles, version), bundles / "CURRENT")  # publish without verifying
            bad_versions[version] = message
            proc.wait_log(f"refused bundle {version}", timeout_s=30)
            assert served() == good, case
        for version, message in bad_versions.items():
            assert message in proc.log(), (version, message)
        fresh = publish_signed(bundles, seed=9)
        proc.wait_log(f"now serving bundle {fresh}", timeout_s=30)
        assert served() == fresh
    finally:
        channel.close()
        code = proc.stop()
    assert code == 0


def _pointer(bundles: Path, version: str) -> Path:
    tmp = bundles / ".CURRENT.test"
    tmp.write_text(version + "\n")
    return tmp
