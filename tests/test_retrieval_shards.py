"""Shards as real processes: the gateway's sharded client merges n exact shards into exactly the unsharded top-k."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from gateway.clients import ShardedRetrievalClient, retrieval_client
from protos.recsys.v1 import retrieval_pb2
from recsys_cli.stack import Stack
from tests.bundle_factory import make_bundle
from tests.test_retrieval_server import RetrievalProcess

N_ITEMS, DIM, SHARDS = 3000, 16, 3


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("shard-bundles")
    make_bundle(path, n_items=N_ITEMS, dim=DIM, seed=11)
    return path


@pytest.fixture(scope="module")
def processes(bundles: Path) -> Iterator[tuple[RetrievalProcess, list[RetrievalProcess]]]:
    whole = RetrievalProcess(bundles, poll_interval_s=0)
    shards = [RetrievalProcess(bundles, "--shard", f"{i}/{SHARDS}", poll_interval_s=0) for i in range(SHARDS)]
    yield whole, shards
    for p in [whole, *shards]:
        assert p.stop() == 0


def test_merged_shards_equal_the_unsharded_top_k(processes: tuple[RetrievalProcess, list[RetrievalProcess]]) -> None:
    whole, shards = processes
    single = retrieval_client(whole.address)
    sharded = retrieval_client(",".join(p.address for p in shards))
    assert isinstance(sharded, ShardedRetrievalClient)

    async def compare() -> None:  # the clients are asyncio (grpc.aio), bound to the loop they first run on
        assert await sharded.healthy(5)
        rng = np.random.default_rng(0)
        for n in range(20):
            history = [f"i{i:03d}" for i in rng.choice(np.arange(1, N_ITEMS + 1), size=n % 6 + 1)]
            exclude = [f"i{i:03d}" for i in rng.choice(np.arange(1, N_ITEMS + 1), size=n * 40)]
            k = [1, 10, 100, 999][n % 4]
            want = await single.search(history, k, exclude, "", 5)
            got = await sharded.search(history, k, exclude, "", 5)
            assert got.item_ids == want.item_ids
            assert got.scores == want.scores  # exactly, not approximately
            assert got.bundle_version == want.bundle_version
            assert not set(got.item_ids) & set(exclude)
        await single.close()
        await sharded.close()

    asyncio.run(compare())
    for p in shards:
        reply = p.stub.Search(retrieval_pb2.SearchRequest(k=50), timeout=5)
        i, n = (int(x) for x in reply.shard.split("/"))
        assert n == SHARDS and all((int(x.item_id[1:]) - 1) % SHARDS == i for x in reply.items)


def test_stack_serves_through_shards(tmp_path: Path) -> None:
    bundles = tmp_path / "bundles"
    make_bundle(bundles)
    with Stack(bundles, tmp_path / "state", http_port=0, grpc_port=0, shards=2) as stack:
        assert {"retrieval-0", "retrieval-1"} <= set(stack.ports)
        body = httpx.post(f"{stack.http_url}/v1/recommendations", json={"user_id": "u", "k": 10}, timeout=10).json()
        assert len(body["items"]) == 10 and not body["degraded"], body
        health = httpx.get(f"{stack.http_url}/healthz", timeout=10)
        assert health.status_code == 200 and health.json()["services"]["retrieval"] is True


def test_a_dead_shard_gives_partial_answers_within_budget_never_errors(tmp_path: Path) -> None:
    bundles = tmp_path / "bundles"
    make_bundle(bundles)
    stack = Stack(bundles, tmp_path / "state", http_port=0, grpc_port=0, shards=2)
    with stack, httpx.Client(base_url=stack.http_url, timeout=10) as client:
        outcomes = []
        for n in range(60):
            if n == 20:
                stack.procs["retrieval-1"].kill()
                stack.procs["retrieval-1"].wait()
            t = time.perf_counter()
            reply = client.post("/v1/recommendations", json={"user_id": "u", "k": 10, "timeout_ms": 100})
            outcomes.append((reply.status_code, (time.perf_counter() - t) * 1000, reply.json()))
    assert all(status == 200 for status, _, _ in outcomes)
    assert all(ms <= 100 + 15 for _, ms, _ in outcomes), max(ms for _, ms, _ in outcomes)
    assert all(len(body["items"]) == 10 for _, _, body in outcomes)
    before, after = outcomes[:20], outcomes[21:]
    assert not any(body["partial"] for _, _, body in before)
    for _, _, body in after:
        assert body["partial"] and body["missing"][0]["stage"] == "ann shard 1/2", body["missing"]
        assert "ann" in {s for item in body["items"] for s in item["sources"]}, "shard 0 still contributes"
