"""Shared fixtures: a tiny hand-built bundle, free ports, and the real-data location."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from protos.recsys.v1 import ranking_pb2_grpc
from ranking_svc.core import Ranker
from ranking_svc.servicer import RankingServicer
from recsys_common.grpc_server import create_server
from recsys_common.snapshot import SnapshotHolder
from tests.bundle_factory import make_bundle

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_bundles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundles directory with one published tiny bundle (see bundle_factory)."""
    path = tmp_path_factory.mktemp("tiny-bundles")
    make_bundle(path)
    return path


@pytest.fixture(scope="module")
def ranking_stub(tiny_bundles: Path) -> Iterator[ranking_pb2_grpc.RankingStub]:
    """The ranking servicer over the tiny bundle (at most 50 candidates), served on a loopback port."""
    holder = SnapshotHolder(tiny_bundles, lambda b: Ranker(b, max_candidates=50), poll_interval_s=0, name="ranking")
    holder.load_current(raise_errors=True)
    servicer = RankingServicer(holder)
    register = [lambda s: ranking_pb2_grpc.add_RankingServicer_to_server(servicer, s)]
    server, port, _ = create_server(register, "127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield ranking_pb2_grpc.RankingStub(channel)
    server.stop(0)


def ml100k_dir() -> Path:
    """MovieLens 100K from ../shared/data (or RECSYS_ML100K). Under CI a missing copy fails, never skips."""
    path = Path(os.environ.get("RECSYS_ML100K", ROOT.parent / "shared" / "data" / "ml-100k"))
    if not (path / "u.data").exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"MovieLens 100K is required under CI and was not found at {path}")
        pytest.skip(f"MovieLens 100K not found at {path} (set RECSYS_ML100K)")
    return path
