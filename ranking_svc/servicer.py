"""RankingServicer: proto -> Ranker -> proto."""

from __future__ import annotations

import grpc

from protos.recsys.v1 import ranking_pb2, ranking_pb2_grpc
from ranking_svc.core import Candidate, Ranker
from recsys_common.grpc_server import map_errors


class RankingServicer(ranking_pb2_grpc.RankingServicer):
    def __init__(self, ranker: Ranker) -> None:
        self.ranker = ranker

    @map_errors
    def Rank(self, request: ranking_pb2.RankRequest, context: grpc.ServicerContext) -> ranking_pb2.RankResponse:
        ranker = self.ranker  # one snapshot for the whole request
        ranker.check_version(request.bundle_version)
        candidates = [Candidate(c.item_id, tuple(c.sources)) for c in request.candidates]
        scores = ranker.rank(tuple(request.context.recent_item_ids), candidates)
        return ranking_pb2.RankResponse(scores=scores.tolist(), bundle_version=ranker.version)
