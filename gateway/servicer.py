"""GatewayServicer: the gRPC twin of the REST API, over the same Recommender.

It is a grpc.aio servicer served on the core's own event loop (gateway/server.py), as REST is: a request
reaches the core without a hand-off between threads, and blocking store writes go to the core's executor.
"""

from __future__ import annotations

import asyncio

import grpc.aio

from gateway.core import Recommender, RecommendRequest, check_event_count
from gateway.store import Event
from protos.recsys.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from recsys_common.grpc_server import map_errors

Context = grpc.aio.ServicerContext
# The largest request the gRPC front door reads (REST: 256 KiB). A batch of MAX_EVENTS events with every id at
# MAX_ID_LEN is 853,000 bytes and decodes in ~0.3 ms; the event loop never decodes more than that.
MAX_MESSAGE_BYTES = 1 << 20


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, recommender: Recommender) -> None:
        self.recommender = recommender

    @map_errors
    async def Recommend(  # type: ignore[override]
        self, request: gateway_pb2.RecommendRequest, context: Context[gateway_pb2.RecommendRequest, object]
    ) -> gateway_pb2.RecommendResponse:
        # Admission on the loop, as for REST: a refused request never waits at all.
        with self.recommender.admission.slot():
            rec = await self.recommender.recommend_async(
                RecommendRequest(
                    user_id=request.user_id,
                    k=request.k or 10,
                    exclude_seen=request.exclude_seen if request.HasField("exclude_seen") else True,
                    exclude_item_ids=tuple(request.exclude_item_ids),
                    timeout_ms=request.timeout_ms or None,
                    debug=request.debug,
                    max_per_genre=request.max_per_genre or None,
                ),
                grpc_remaining_s=context.time_remaining(),
            )
        return gateway_pb2.RecommendResponse(
            items=[
                common_pb2.ScoredItem(item_id=i.item_id, score=i.score, sources=i.sources, stage_scores=i.stage_scores)
                for i in rec.items
            ],
            bundle_version=rec.bundle_version,
            partial=rec.partial,
            missing=[gateway_pb2.StageIssue(stage=s, reason=r) for s, r in rec.missing],
            degraded=rec.degraded,
            timings_ms=rec.timings_ms,
        )

    @map_errors
    async def Track(  # type: ignore[override]
        self, request: gateway_pb2.TrackRequest, context: Context[gateway_pb2.TrackRequest, object]
    ) -> gateway_pb2.TrackResponse:
        check_event_count(len(request.events))  # before any per-event work: an oversized batch costs the loop nothing
        return gateway_pb2.TrackResponse(accepted=await asyncio.to_thread(self._track, request))

    def _track(self, request: gateway_pb2.TrackRequest) -> int:
        """In a worker thread, with the store write: the conversion too stays off the event loop."""
        events = [Event(e.user_id, e.item_id, e.timestamp, e.event_id, e.type) for e in request.events]
        return self.recommender.track(events)

    @map_errors
    async def ForgetUser(  # type: ignore[override]
        self, request: gateway_pb2.ForgetUserRequest, context: Context[gateway_pb2.ForgetUserRequest, object]
    ) -> gateway_pb2.ForgetUserResponse:
        erased = await asyncio.to_thread(self.recommender.forget, request.user_id)
        return gateway_pb2.ForgetUserResponse(erased=erased)
