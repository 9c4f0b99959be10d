"""RetrievalServicer: proto -> Retriever -> proto."""

from __future__ import annotations

import grpc
import numpy as np

from protos.recsys.v1 import common_pb2, retrieval_pb2, retrieval_pb2_grpc
from recsys_common.errors import InvalidRequest
from recsys_common.grpc_server import map_errors
from retrieval_svc.core import Query, Retriever, SearchResult


def from_proto(req: retrieval_pb2.SearchRequest) -> Query:
    vector = None
    if req.WhichOneof("query") == "vector":
        vector = np.asarray(req.vector.values, dtype=np.float32)
    return Query(
        k=req.k,
        recent_item_ids=tuple(req.context.recent_item_ids),
        vector=vector,
        exclude_item_ids=tuple(req.exclude_item_ids),
        exclude_context=req.exclude_context,
    )


def to_proto(result: SearchResult) -> retrieval_pb2.SearchResponse:
    return retrieval_pb2.SearchResponse(
        items=[
            common_pb2.ScoredItem(item_id=item_id, score=float(score), sources=["ann"])
            for item_id, score in zip(result.item_ids, result.scores, strict=True)
        ],
        bundle_version=result.bundle_version,
    )


class RetrievalServicer(retrieval_pb2_grpc.RetrievalServicer):
    def __init__(self, retriever: Retriever, max_batch: int) -> None:
        self.retriever = retriever
        self.max_batch = max_batch

    @map_errors
    def Search(
        self, request: retrieval_pb2.SearchRequest, context: grpc.ServicerContext
    ) -> retrieval_pb2.SearchResponse:
        retriever = self.retriever  # one snapshot for the whole request
        retriever.check_version(request.bundle_version)
        (result,) = retriever.search([from_proto(request)])
        return to_proto(result)

    @map_errors
    def BatchSearch(
        self, request: retrieval_pb2.BatchSearchRequest, context: grpc.ServicerContext
    ) -> retrieval_pb2.BatchSearchResponse:
        if not 1 <= len(request.requests) <= self.max_batch:
            raise InvalidRequest("requests", f"must hold 1..{self.max_batch} searches, got {len(request.requests)}")
        retriever = self.retriever
        for req in request.requests:
            retriever.check_version(req.bundle_version)
        results = retriever.search([from_proto(r) for r in request.requests])
        return retrieval_pb2.BatchSearchResponse(responses=[to_proto(r) for r in results])
