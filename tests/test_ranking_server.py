"""The ranking service over gRPC: BatchRank answers each request as Rank would, and names what is wrong."""

from __future__ import annotations

import grpc
import pytest

from protos.recsys.v1 import common_pb2, ranking_pb2, ranking_pb2_grpc


def rank_request(history: list[str], items: list[str], **kw: object) -> ranking_pb2.RankRequest:
    return ranking_pb2.RankRequest(context=common_pb2.UserContext(recent_item_ids=history), item_ids=items, **kw)  # type: ignore[arg-type]


REQUESTS = [
    rank_request(["i001", "i003"], ["i002", "i005", "i007"], source_bits=[1, 3, 2], source_names=["ann", "covisit"]),
    rank_request([], ["i010", "i011"]),
    rank_request(["i020"], ["i021", "unknown", "i022", "i023"]),
]


def test_batch_rank_answers_each_request_as_rank_does(ranking_stub: ranking_pb2_grpc.RankingStub) -> None:
    batch = ranking_stub.BatchRank(ranking_pb2.BatchRankRequest(requests=REQUESTS), timeout=5)
    singles = [ranking_stub.Rank(r, timeout=5) for r in REQUESTS]
    assert list(batch.responses) == singles
    assert [len(r.scores) for r in batch.responses] == [3, 2, 4]


@pytest.mark.parametrize(
    ("requests", "field"),
    [
        ([], "requests"),
        ([REQUESTS[0]] * 257, "requests"),
        ([REQUESTS[0], rank_request(["i001"], [])], "requests[1].item_ids"),
        ([REQUESTS[1], REQUESTS[0], rank_request(["i001"], ["i002"], source_bits=[4])], "requests[2].source_bits"),
    ],
)
def test_invalid_batches_are_invalid_argument_naming_the_field(
    ranking_stub: ranking_pb2_grpc.RankingStub, requests: list[ranking_pb2.RankRequest], field: str
) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        ranking_stub.BatchRank(ranking_pb2.BatchRankRequest(requests=requests), timeout=5)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (refused.value.details() or "").startswith(f"{field}: ")
