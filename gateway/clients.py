"""Thin clients for the retrieval and ranking services: plain values in, plain values out, a timeout on every call."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.recsys.v1 import common_pb2, ranking_pb2, ranking_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc


@dataclass(frozen=True)
class Scored:
    item_ids: list[str]
    scores: list[float]
    bundle_version: str


def _healthy(channel: grpc.Channel, timeout_s: float) -> bool:
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
    except grpc.RpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


class RetrievalClient:
    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = grpc.insecure_channel(address)
        self.stub = retrieval_pb2_grpc.RetrievalStub(self.channel)

    def search_future(
        self, recent_item_ids: Sequence[str], k: int, exclude: Sequence[str], bundle_version: str, timeout_s: float
    ) -> grpc.Future:
        request = retrieval_pb2.SearchRequest(
            context=common_pb2.UserContext(recent_item_ids=recent_item_ids),
            k=k,
            exclude_item_ids=exclude,
            exclude_context=False,
            bundle_version=bundle_version,
        )
        return self.stub.Search.future(request, timeout=timeout_s)

    @staticmethod
    def result(future: grpc.Future) -> Scored:
        reply: retrieval_pb2.SearchResponse = future.result()
        return Scored([i.item_id for i in reply.items], [i.score for i in reply.items], reply.bundle_version)

    def healthy(self, timeout_s: float) -> bool:
        return _healthy(self.channel, timeout_s)

    def close(self) -> None:
        self.channel.close()


class RankingClient:
    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = grpc.insecure_channel(address)
        self.stub = ranking_pb2_grpc.RankingStub(self.channel)

    def rank(
        self,
        recent_item_ids: Sequence[str],
        candidates: Sequence[tuple[str, Sequence[str]]],
        bundle_version: str,
        timeout_s: float,
    ) -> list[float]:
        request = ranking_pb2.RankRequest(
            context=common_pb2.UserContext(recent_item_ids=recent_item_ids),
            candidates=[ranking_pb2.Candidate(item_id=i, sources=s) for i, s in candidates],
            bundle_version=bundle_version,
        )
        reply: ranking_pb2.RankResponse = self.stub.Rank(request, timeout=timeout_s)
        return list(reply.scores)

    def healthy(self, timeout_s: float) -> bool:
        return _healthy(self.channel, timeout_s)

    def close(self) -> None:
        self.channel.close()
