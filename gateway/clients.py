"""Thin clients for the retrieval and ranking services: plain values in, plain values out, a timeout on every call.

With credentials (recsys_common.tls.TLSFiles.channel_credentials) the channels speak mutual TLS: the gateway
presents its certificate and trusts only the configured CA for the services' certificates.
"""

from __future__ import annotations

import contextvars
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.hedging import Hedger
from protos.recsys.v1 import common_pb2, ranking_pb2, ranking_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc
from recsys_common.logs import outgoing_metadata


@dataclass(frozen=True)
class Scored:
    item_ids: list[str]
    scores: list[float]
    bundle_version: str
    # Shards that did not answer, with the reason: the answer covers the other shards' items only.
    missing: tuple[tuple[str, str], ...] = ()


def _channel(
    address: str, credentials: grpc.ChannelCredentials | None, options: Sequence[tuple[str, int]] = ()
) -> grpc.Channel:
    if credentials is None:
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(address, credentials, options=list(options))


def _healthy(channel: grpc.Channel, timeout_s: float) -> bool:
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
    except grpc.RpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


# Message limits on the client side too: requests are small, answers at most max_k items (retrieval_svc.config).
RETRIEVAL_CHANNEL_OPTIONS = [("grpc.max_send_message_length", 4 << 20), ("grpc.max_receive_message_length", 16 << 20)]


class RetrievalClient:
    """One retrieval server (or shard); searches are hedged after their observed p95 latency."""

    def __init__(
        self, address: str, hedger: Hedger | None = None, credentials: grpc.ChannelCredentials | None = None
    ) -> None:
        self.address = address
        self.channel = _channel(address, credentials, RETRIEVAL_CHANNEL_OPTIONS)
        self.stub = retrieval_pb2_grpc.RetrievalStub(self.channel)
        self.hedger = hedger or Hedger()

    def search(
        self, recent_item_ids: Sequence[str], k: int, exclude: Sequence[str], bundle_version: str, timeout_s: float
    ) -> Scored:
        request = retrieval_pb2.SearchRequest(
            context=common_pb2.UserContext(recent_item_ids=recent_item_ids),
            k=k,
            exclude_item_ids=exclude,
            exclude_context=False,
            bundle_version=bundle_version,
        )
        metadata = outgoing_metadata()
        reply = self.hedger.call(lambda t: self.stub.Search.future(request, timeout=t, metadata=metadata), timeout_s)
        assert isinstance(reply, retrieval_pb2.SearchResponse)
        return Scored([i.item_id for i in reply.items], [i.score for i in reply.items], reply.bundle_version)

    def healthy(self, timeout_s: float) -> bool:
        return _healthy(self.channel, timeout_s)

    def close(self) -> None:
        self.channel.close()


class ShardMismatch(RuntimeError):
    """Retrieval shards answered from different bundle versions (only possible mid-swap, without a pinned version)."""


class ShardedRetrievalClient:
    """The retrieval service split over n shards (`python -m retrieval_svc --shard i/n`), seen as one.

    Same interface as RetrievalClient. Every shard is asked for the top k of its own items in parallel
    (each call hedged on its own); the merge keeps the k best by score, so over exact shards the answer
    equals the unsharded top-k (ids and scores). A failed or late shard is named in `missing` and the
    answer covers the others (the gateway flags it partial); only when every shard fails does it raise.
    """

    def __init__(self, addresses: Sequence[str], credentials: grpc.ChannelCredentials | None = None) -> None:
        if not addresses:
            raise ValueError("ShardedRetrievalClient needs at least one address")
        self.shards = [RetrievalClient(a, credentials=credentials) for a in addresses]
        self.address = ",".join(addresses)
        self._pool = ThreadPoolExecutor(max_workers=4 * len(self.shards), thread_name_prefix="shards")

    def search(
        self, recent_item_ids: Sequence[str], k: int, exclude: Sequence[str], bundle_version: str, timeout_s: float
    ) -> Scored:
        calls = [
            self._pool.submit(
                contextvars.copy_context().run, s.search, recent_item_ids, k, exclude, bundle_version, timeout_s
            )
            for s in self.shards
        ]
        parts: list[Scored] = []
        missing: list[tuple[str, str]] = []
        errors: list[BaseException] = []
        for n, call in enumerate(calls):
            try:
                parts.append(call.result(timeout=timeout_s + 0.05))
            except Exception as exc:  # a shard down or late: the others still answer
                errors.append(exc)
                reason = f"{exc.code().name.lower()}: {exc.details()}" if isinstance(exc, grpc.Call) else repr(exc)
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
        return Scored([i for _, i in merged], [s for s, _ in merged], parts[0].bundle_version, tuple(missing))

    def healthy(self, timeout_s: float) -> bool:
        return all(s.healthy(timeout_s) for s in self.shards)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for s in self.shards:
            s.close()


def retrieval_client(
    addresses: str | Sequence[str], credentials: grpc.ChannelCredentials | None = None
) -> RetrievalClient | ShardedRetrievalClient:
    """One client for "host:port", a sharded one for "host:port,host:port,..." (shard i at position i)."""
    if isinstance(addresses, str):
        addresses = [a.strip() for a in addresses.split(",") if a.strip()]
    if len(addresses) == 1:
        return RetrievalClient(addresses[0], credentials=credentials)
    return ShardedRetrievalClient(addresses, credentials)


class RankingClient:
    def __init__(self, address: str, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.address = address
        self.channel = _channel(address, credentials)
        self.stub = ranking_pb2_grpc.RankingStub(self.channel)

    def rank(
        self,
        recent_item_ids: Sequence[str],
        item_ids: Sequence[str],
        source_bits: Sequence[int],
        source_names: Sequence[str],
        bundle_version: str,
        timeout_s: float,
    ) -> list[float]:
        """Scores aligned with item_ids; bit j of source_bits[i] says source_names[j] proposed item_ids[i]."""
        request = ranking_pb2.RankRequest(
            context=common_pb2.UserContext(recent_item_ids=recent_item_ids),
            item_ids=item_ids,
            source_bits=source_bits,
            source_names=source_names,
            bundle_version=bundle_version,
        )
        reply: ranking_pb2.RankResponse = self.stub.Rank(request, timeout=timeout_s, metadata=outgoing_metadata())
        return list(reply.scores)

    def healthy(self, timeout_s: float) -> bool:
        return _healthy(self.channel, timeout_s)

    def close(self) -> None:
        self.channel.close()
