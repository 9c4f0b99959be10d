"""RankingServicer: proto -> Ranker -> proto."""

from __future__ import annotations

import time

import grpc
import numpy as np

from protos.recsys.v1 import ranking_pb2, ranking_pb2_grpc
from ranking_svc.core import Candidates, Ranker
from recsys_common.errors import InvalidRequest
from recsys_common.grpc_server import map_errors
from recsys_common.snapshot import SnapshotHolder

MAX_BATCH = 256
MAX_BATCH_CANDIDATES = 50_000


class RankingServicer(ranking_pb2_grpc.RankingServicer):
    def __init__(self, holder: SnapshotHolder[Ranker], fault_delay_ms: int = 0) -> None:
        self.holder = holder
        self.fault_delay_s = fault_delay_ms / 1000

    @map_errors
    def Rank(self, request: ranking_pb2.RankRequest, context: grpc.ServicerContext) -> ranking_pb2.RankResponse:
        if self.fault_delay_s:
            time.sleep(self.fault_delay_s)
        return self._rank(request)

    @map_errors
    def BatchRank(
        self, request: ranking_pb2.BatchRankRequest, context: grpc.ServicerContext
    ) -> ranking_pb2.BatchRankResponse:
        if not 1 <= len(request.requests) <= MAX_BATCH:
            raise InvalidRequest("requests", f"must hold 1..{MAX_BATCH} rankings, got {len(request.requests)}")
        total = sum(len(r.item_ids) for r in request.requests)
        if total > MAX_BATCH_CANDIDATES:
            raise InvalidRequest("requests", f"must hold at most {MAX_BATCH_CANDIDATES} item ids in all, got {total}")
        if self.fault_delay_s:
            time.sleep(self.fault_delay_s)
        replies = []
        for n, one in enumerate(request.requests):
            try:
                replies.append(self._rank(one))
            except InvalidRequest as err:
                raise InvalidRequest(f"requests[{n}].{err.field}", str(err).partition(": ")[2]) from err
        return ranking_pb2.BatchRankResponse(responses=replies)

    def _rank(self, request: ranking_pb2.RankRequest) -> ranking_pb2.RankResponse:
        ranker = self.holder.get(request.bundle_version)  # one snapshot for the whole request
        candidates = Candidates(
            list(request.item_ids), np.asarray(request.source_bits, dtype=np.uint32), list(request.source_names)
        )
        user_vector = None
        if request.user_vector:
            if not request.bundle_version:
                # A vector from another bundle version would be a point in another space: ranked, but wrongly.
                raise InvalidRequest("user_vector", "needs bundle_version pinned to the version that computed it")
            user_vector = np.asarray(request.user_vector, dtype=np.float32)
        scores = ranker.rank(list(request.context.recent_item_ids), candidates, user_vector)
        return ranking_pb2.RankResponse(scores=scores.tolist(), bundle_version=ranker.version)
