"""Hedged retrieval calls against a real gRPC server that is slow on every 20th call."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from gateway.clients import RetrievalClient
from gateway.hedging import Hedger
from protos.recsys.v1 import common_pb2, retrieval_pb2, retrieval_pb2_grpc
from recsys_common.grpc_server import create_server

SLOW_S = 0.3


class SometimesSlow(retrieval_pb2_grpc.RetrievalServicer):
    """Answers at once, except every 20th call, which takes SLOW_S (a GC pause, a noisy neighbour)."""

    def __init__(self) -> None:
        self.counter = itertools.count()
        self.lock = threading.Lock()

    def Search(
        self, request: retrieval_pb2.SearchRequest, context: grpc.ServicerContext
    ) -> retrieval_pb2.SearchResponse:
        with self.lock:
            n = next(self.counter)
        if n % 20 == 19:
            time.sleep(SLOW_S)
        return retrieval_pb2.SearchResponse(items=[common_pb2.ScoredItem(item_id="i1", score=1.0)], bundle_version="v1")


@pytest.fixture
def address() -> Iterator[str]:
    servicer = SometimesSlow()
    server, port, _ = create_server(
        [lambda s: retrieval_pb2_grpc.add_RetrievalServicer_to_server(servicer, s)], "127.0.0.1:0"
    )
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


async def latencies(client: RetrievalClient, n: int) -> np.ndarray:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        assert (await client.search(["i1"], 10, [], "", 2.0)).item_ids == ["i1"]
        out.append(time.perf_counter() - t)
    return np.asarray(out)


def test_hedging_cuts_the_tail_within_its_budget(address: str) -> None:
    plain = RetrievalClient(address, Hedger(max_extra_ratio=0.0))  # never hedges: the baseline, same server
    hedged = RetrievalClient(address, Hedger())

    async def run() -> tuple[np.ndarray, np.ndarray, float]:
        await latencies(hedged, 100)  # learn the latency distribution
        base = await latencies(plain, 400)
        calls_before, hedged_before = hedged.hedger.calls, hedged.hedger.hedged
        with_hedging = await latencies(hedged, 400)
        extra = (hedged.hedger.hedged - hedged_before) / (hedged.hedger.calls - calls_before)
        await plain.close()
        await hedged.close()
        return base, with_hedging, extra

    base, with_hedging, extra = asyncio.run(run())
    assert np.percentile(base, 99) >= SLOW_S  # the slow calls are there
    assert np.percentile(with_hedging, 99) < SLOW_S / 2, np.percentile(with_hedging, 99)
    assert extra <= 0.06, f"{extra:.3f} extra calls"
