"""RetrievalServicer: proto -> Retriever -> proto."""

from __future__ import annotations

import threading

import grpc
import numpy as np

from protos.recsys.v1 import retrieval_pb2, retrieval_pb2_grpc
from recsys_common.errors import InvalidRequest
from recsys_common.grpc_server import map_errors
from recsys_common.snapshot import SnapshotHolder
from retrieval_svc.core import Query, Retriever, SearchResult

SOURCES = ("ann",)


def from_proto(req: retrieval_pb2.SearchRequest, where: str = "") -> Query:
    vector = None
    if req.WhichOneof("query") == "vector":
        if not req.vector.values:
            raise InvalidRequest(f"{where}vector", "must not be empty when vector is set")
        vector = np.asarray(req.vector.values, dtype=np.float32)
    return Query(
        k=req.k,
        recent_item_ids=tuple(req.context.recent_item_ids),
        vector=vector,
        exclude_item_ids=tuple(req.exclude_item_ids),
        exclude_context=req.exclude_context,
    )


def to_proto(result: SearchResult, shard: str, columns: bool = False) -> retrieval_pb2.SearchResponse:
    """The answer as one ScoredItem per item, or with columns as the item_ids and scores columns."""
    reply = retrieval_pb2.SearchResponse(bundle_version=result.bundle_version, shard=shard, method=result.method)
    if result.query_vector is not None:
        reply.query_vector.extend(result.query_vector.tolist())
    if columns:  # 0.01 ms at k=100, against 0.15 ms for the items and their serialization
        reply.item_ids.extend(result.item_ids)
        reply.scores.extend(result.scores.tolist())
        return reply
    add = reply.items.add  # 2.4x faster than building ScoredItem objects and passing a list (0.12 vs 0.29 ms at k=100)
    for item_id, score in zip(result.item_ids, result.scores.tolist(), strict=True):
        add(item_id=item_id, score=score, sources=SOURCES)
    return reply


class RuntimeUnavailable:
    """The process-wide set of item ids marked unavailable through SetUnavailable; survives bundle swaps."""

    def __init__(self) -> None:
        self.ids: frozenset[str] = frozenset()
        self.lock = threading.Lock()

    def apply(self, retriever: Retriever) -> Retriever:
        """SnapshotHolder.finalize: a freshly loaded snapshot gets the current runtime set."""
        return retriever.with_unavailable(self.ids) if self.ids else retriever


class RetrievalServicer(retrieval_pb2_grpc.RetrievalServicer):
    def __init__(
        self,
        holder: SnapshotHolder[Retriever],
        max_batch: int,
        max_batch_items: int = 200_000,
        runtime: RuntimeUnavailable | None = None,
    ) -> None:
        self.holder = holder
        self.max_batch = max_batch
        self.max_batch_items = max_batch_items
        self.runtime = runtime or RuntimeUnavailable()

    @map_errors
    def Search(
        self, request: retrieval_pb2.SearchRequest, context: grpc.ServicerContext
    ) -> retrieval_pb2.SearchResponse:
        retriever = self.holder.get(request.bundle_version)  # one snapshot for the whole request
        (result,) = retriever.search([from_proto(request)])
        return to_proto(result, str(retriever.shard), request.columns)

    @map_errors
    def BatchSearch(
        self, request: retrieval_pb2.BatchSearchRequest, context: grpc.ServicerContext
    ) -> retrieval_pb2.BatchSearchResponse:
        if not 1 <= len(request.requests) <= self.max_batch:
            raise InvalidRequest("requests", f"must hold 1..{self.max_batch} searches, got {len(request.requests)}")
        total = sum(max(0, r.k) for r in request.requests)
        if total > self.max_batch_items:
            raise InvalidRequest("requests", f"the sum of k must be at most {self.max_batch_items}, got {total}")
        versions = {r.bundle_version for r in request.requests if r.bundle_version}
        if len(versions) > 1:
            raise InvalidRequest("requests", f"must all pin the same bundle_version, got {sorted(versions)}")
        retriever = self.holder.get(versions.pop() if versions else "")
        queries = [from_proto(r, f"requests[{i}].") for i, r in enumerate(request.requests)]
        results = retriever.search(queries)
        shard = str(retriever.shard)
        replies = [to_proto(r, shard, q.columns) for r, q in zip(results, request.requests, strict=True)]
        return retrieval_pb2.BatchSearchResponse(responses=replies)

    @map_errors
    def SetUnavailable(
        self, request: retrieval_pb2.SetUnavailableRequest, context: grpc.ServicerContext
    ) -> retrieval_pb2.SetUnavailableResponse:
        for field in ("add_item_ids", "remove_item_ids"):
            for n, item_id in enumerate(getattr(request, field)):
                if not item_id or len(item_id) > 256:
                    raise InvalidRequest(f"{field}[{n}]", "must be a non-empty id of at most 256 characters")
        with self.runtime.lock:
            ids = set() if request.clear else set(self.runtime.ids)
            ids |= set(request.add_item_ids)
            ids -= set(request.remove_item_ids)
            self.runtime.ids = frozenset(ids)
            retriever = self.holder.update(lambda r: r.with_unavailable(self.runtime.ids))
        return retrieval_pb2.SetUnavailableResponse(
            runtime_unavailable=len(self.runtime.ids),
            unavailable_in_shard=retriever.filter.n_unavailable,
            bundle_version=retriever.version,
        )
