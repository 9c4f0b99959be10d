"""Thin clients for the retrieval and ranking services: plain values in, plain values out, a timeout on every call.

The clients are asyncio (grpc.aio): the gateway's core runs every request on one event loop, so a fan-out
costs no thread hand-offs. A channel belongs to the loop it was made on; each client makes its channel on
first use, so build clients anywhere and use them from one loop.

With credentials (recsys_common.tls.TLSFiles.channel_credentials) the channels speak mutual TLS: the gateway
presents its certificate and trusts only the configured CA for the services' certificates.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.batching import Coalescer
from gateway.hedging import Hedger
from protos.recsys.v1 import common_pb2, ranking_pb2, ranking_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc
from recsys_common.logs import outgoing_metadata

S = TypeVar("S")
Q = TypeVar("Q")
R = TypeVar("R")


@dataclass(frozen=True)
class Scored:
    item_ids: list[str]
    scores: list[float]
    bundle_version: str
    # Shards that did not answer, with the reason: the answer covers the other shards' items only.
    missing: tuple[tuple[str, str], ...] = ()
    # The query vector the search used (the user tower's output); ranking of the same version reuses it.
    query_vector: Sequence[float] = ()


class _Endpoint:
    """One service address; its grpc.aio channel is made on first use, on the loop that uses it."""

    def __init__(
        self,
        address: str,
        credentials: grpc.ChannelCredentials | None,
        options: Sequence[tuple[str, int]] = (),
    ) -> None:
        self.address = address
        self._credentials = credentials
        self._options = list(options)
        self._channel: grpc.aio.Channel | None = None
        self._stubs: dict[type, Any] = {}

    @property
    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(self.address, options=self._options)
            else:
                self._channel = grpc.aio.secure_channel(self.address, self._credentials, options=self._options)
        return self._channel

    def stub(self, stub_class: type[S]) -> S:
        """One stub per class and channel: a stub builds a multi-callable per method, too dear for every call."""
        stub = self._stubs.get(stub_class)
        if stub is None:
            stub = self._stubs[stub_class] = stub_class(self.channel)
        return cast(S, stub)

    async def healthy(self, timeout_s: float) -> bool:
        try:
            reply = await self.stub(health_pb2_grpc.HealthStub).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stubs.clear()


# Message limits on the client side too: requests are small, answers at most max_k items (retrieval_svc.config).
RETRIEVAL_CHANNEL_OPTIONS = [("grpc.max_send_message_length", 4 << 20), ("grpc.max_receive_message_length", 16 << 20)]


class RetrievalClient:
    """One retrieval server (or shard); searches are hedged after their observed p95 latency, and those made in
    one loop turn share a BatchSearch call (at most max_batch; 1: every search its own call)."""

    def __init__(
        self,
        address: str,
        hedger: Hedger | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        max_batch: int = 1,
        max_in_flight: int = 0,
    ) -> None:
        self.address = address
        self.endpoint = _Endpoint(address, credentials, RETRIEVAL_CHANNEL_OPTIONS)
        self.hedger = hedger or Hedger()
        # BatchSearch takes one pinned version per batch.
        self.calls = Coalescer(
            "search", self._search, self._batch_search, max_batch, key=_pinned_version, max_in_flight=max_in_flight
        )

    async def search(
        self, recent_item_ids: Sequence[str], k: int, exclude: Sequence[str], bundle_version: str, timeout_s: float
    ) -> Scored:
        request = retrieval_pb2.SearchRequest(
            context=common_pb2.UserContext(recent_item_ids=recent_item_ids),
            k=k,
            exclude_item_ids=exclude,
            exclude_context=False,
            bundle_version=bundle_version,
            columns=True,
        )
        reply = await _call(self.calls, request, timeout_s)
        if reply.items:  # a server from before SearchRequest.columns (mid-upgrade) answers in items
            ids, scores = [i.item_id for i in reply.items], [i.score for i in reply.items]
        else:
            ids, scores = list(reply.item_ids), list(reply.scores)
        return Scored(ids, scores, reply.bundle_version, query_vector=reply.query_vector)

    async def _search(self, request: retrieval_pb2.SearchRequest, timeout_s: float) -> retrieval_pb2.SearchResponse:
        metadata = outgoing_metadata()
        stub = self.endpoint.stub(retrieval_pb2_grpc.RetrievalStub)
        return await self.hedger.call(lambda t: stub.Search(request, timeout=t, metadata=metadata), timeout_s)

    async def _batch_search(
        self, requests: Sequence[retrieval_pb2.SearchRequest], timeout_s: float
    ) -> Sequence[retrieval_pb2.SearchResponse]:
        metadata = outgoing_metadata()  # the first request's id: the batch's log lines carry that one
        stub = self.endpoint.stub(retrieval_pb2_grpc.RetrievalStub)
        batch = retrieval_pb2.BatchSearchRequest(requests=requests)
        reply = await self.hedger.call(lambda t: stub.BatchSearch(batch, timeout=t, metadata=metadata), timeout_s)
        return reply.responses

    async def healthy(self, timeout_s: float) -> bool:
        return await self.endpoint.healthy(timeout_s)

    async def close(self) -> None:
        await self.endpoint.close()


async def _call(calls: Coalescer[Q, R], request: Q, timeout_s: float) -> R:
    """The request's answer through the coalescer; its own deadline passing is DEADLINE_EXCEEDED, as for a call."""
    try:
        return await calls.call(request, timeout_s)
    except TimeoutError:  # the batch it shares lives longer than this request's budget
        raise grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, details="Deadline Exceeded") from None


def _pinned_version(request: retrieval_pb2.SearchRequest | ranking_pb2.RankRequest) -> str:
    return request.bundle_version


class ShardMismatch(RuntimeError):
    """Retrieval shards answered from different bundle versions (only possible mid-swap, without a pinned version)."""


class ShardedRetrievalClient:
    """The retrieval service split over n shards (`python -m retrieval_svc --shard i/n`), seen as one.

    Same interface as RetrievalClient. Every shard is asked for the top k of its own items in parallel
    (each call hedged on its own); the merge keeps the k best by score, so over exact shards the answer
    equals the unsharded top-k (ids and scores). A failed or late shard is named in `missing` and the
    answer covers the others (the gateway flags it partial); only when every shard fails does it raise.
    """

    def __init__(
        self,
        addresses: Sequence[str],
        credentials: grpc.ChannelCredentials | None = None,
        max_batch: int = 1,
        max_in_flight: int = 0,
    ) -> None:
        if not addresses:
            raise ValueError("ShardedRetrievalClient needs at least one address")
        self.shards = [RetrievalClient(a, None, credentials, max_batch, max_in_flight) for a in addresses]
        self.address = ",".join(addresses)

    async def search(
        self, recent_item_ids: Sequence[str], k: int, exclude: Sequence[str], bundle_version: str, timeout_s: float
    ) -> Scored:
        calls = [
            asyncio.wait_for(s.search(recent_item_ids, k, exclude, bundle_version, timeout_s), timeout_s + 0.05)
            for s in self.shards
        ]
        answers = await asyncio.gather(*calls, return_exceptions=True)
        parts: list[Scored] = []
        missing: list[tuple[str, str]] = []
        errors: list[BaseException] = []
        for n, answer in enumerate(answers):
            if isinstance(answer, Scored):
                parts.append(answer)
                continue
            if not isinstance(answer, Exception):  # cancellation of this request: not a shard's fault
                raise answer
            errors.append(answer)  # a shard down or late: the others still answer
            if isinstance(answer, grpc.aio.AioRpcError):
                reason = f"{answer.code().name.lower()}: {answer.details()}"
            else:
                reason = repr(answer)
            missing.append((f"shard {n}/{len(self.shards)}", reason))
        if not parts:
            raise errors[0]
        versions = {p.bundle_version for p in parts}
        if len(versions) > 1:
            raise ShardMismatch(f"retrieval shards answered from different bundle versions: {sorted(versions)}")
        # Ties broken by item id, as each retrieval server does, so the merge equals the unsharded answer.
        merged = sorted(
            ((score, item_id) for p in parts for item_id, score in zip(p.item_ids, p.scores, strict=True)),
            key=lambda pair: (-pair[0], pair[1]),
        )[:k]
        # Every shard runs the same user tower on the same context: any shard's query vector will do.
        ids, scores = [i for _, i in merged], [s for s, _ in merged]
        return Scored(ids, scores, parts[0].bundle_version, tuple(missing), parts[0].query_vector)

    async def healthy(self, timeout_s: float) -> bool:
        return all(await asyncio.gather(*(s.healthy(timeout_s) for s in self.shards)))

    async def close(self) -> None:
        for s in self.shards:
            await s.close()


def retrieval_client(
    addresses: str | Sequence[str],
    credentials: grpc.ChannelCredentials | None = None,
    max_batch: int = 1,
    max_in_flight: int = 0,
) -> RetrievalClient | ShardedRetrievalClient:
    """One client for "host:port", a sharded one for "host:port,host:port,..." (shard i at position i)."""
    if isinstance(addresses, str):
        addresses = [a.strip() for a in addresses.split(",") if a.strip()]
    if len(addresses) == 1:
        return RetrievalClient(addresses[0], None, credentials, max_batch, max_in_flight)
    return ShardedRetrievalClient(addresses, credentials, max_batch, max_in_flight)


class RankingClient:
    """The ranking server; rankings asked in one loop turn share a BatchRank call (at most max_batch)."""

    def __init__(
        self,
        address: str,
        credentials: grpc.ChannelCredentials | None = None,
        max_batch: int = 1,
        max_in_flight: int = 0,
    ) -> None:
        self.address = address
        self.endpoint = _Endpoint(address, credentials)
        self.calls = Coalescer(
            "rank", self._rank, self._batch_rank, max_batch, key=_pinned_version, max_in_flight=max_in_flight
        )

    async def rank(
        self,
        recent_item_ids: Sequence[str],
        item_ids: Sequence[str],
        source_bits: Sequence[int],
        source_names: Sequence[str],
        bundle_version: str,
        timeout_s: float,
        user_vector: Sequence[float] = (),
    ) -> list[float]:
        """Scores aligned with item_ids; bit j of source_bits[i] says source_names[j] proposed item_ids[i].

        user_vector: retrieval's query vector for the same context and (pinned) bundle version, if known.
        """
        request = ranking_pb2.RankRequest(
            context=common_pb2.UserContext(recent_item_ids=recent_item_ids),
            item_ids=item_ids,
            source_bits=source_bits,
            source_names=source_names,
            bundle_version=bundle_version,
            user_vector=user_vector,
        )
        reply = await _call(self.calls, request, timeout_s)
        return list(reply.scores)

    async def _rank(self, request: ranking_pb2.RankRequest, timeout_s: float) -> ranking_pb2.RankResponse:
        stub = self.endpoint.stub(ranking_pb2_grpc.RankingStub)
        reply: ranking_pb2.RankResponse = await stub.Rank(request, timeout=timeout_s, metadata=outgoing_metadata())
        return reply

    async def _batch_rank(
        self, requests: Sequence[ranking_pb2.RankRequest], timeout_s: float
    ) -> Sequence[ranking_pb2.RankResponse]:
        stub = self.endpoint.stub(ranking_pb2_grpc.RankingStub)
        batch = ranking_pb2.BatchRankRequest(requests=requests)
        reply = await stub.BatchRank(batch, timeout=timeout_s, metadata=outgoing_metadata())
        return reply.responses

    async def healthy(self, timeout_s: float) -> bool:
        return await self.endpoint.healthy(timeout_s)

    async def close(self) -> None:
        await self.endpoint.close()
