"""Retrieval returns the query vector it searched with; ranking takes it instead of running the user tower again."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from protos.recsys.v1 import common_pb2, ranking_pb2, ranking_pb2_grpc, retrieval_pb2
from ranking_svc.core import Candidates, Ranker
from recsys_common.bundle import open_bundle
from recsys_common.errors import InvalidRequest
from retrieval_svc.core import Query, Retriever
from retrieval_svc.servicer import to_proto

HISTORY = ["i001", "i003", "i004"]
CANDIDATES = Candidates.of([(f"i{i:03d}", ("ann",)) for i in (2, 5, 7, 10, 12)])


@pytest.fixture(scope="module")
def retriever(tiny_bundles: Path) -> Retriever:
    return Retriever(open_bundle(tiny_bundles))


@pytest.fixture(scope="module")
def ranker(tiny_bundles: Path) -> Ranker:
    return Ranker(open_bundle(tiny_bundles), max_candidates=50)


def test_search_reports_the_user_towers_vector(retriever: Retriever) -> None:
    (result,) = retriever.search([Query(k=5, recent_item_ids=HISTORY)])
    expected = retriever.user_vectors([HISTORY])[0]
    assert result.query_vector is not None
    np.testing.assert_array_equal(result.query_vector, expected)
    reply = retrieval_pb2.SearchResponse.FromString(to_proto(result, "0/1").SerializeToString())
    np.testing.assert_array_equal(np.asarray(reply.query_vector, dtype=np.float32), expected)


def test_ranking_with_retrievals_vector_equals_ranking_without(retriever: Retriever, ranker: Ranker) -> None:
    (result,) = retriever.search([Query(k=5, recent_item_ids=HISTORY)])
    assert result.query_vector is not None
    given = ranker.rank(HISTORY, CANDIDATES, result.query_vector)
    computed = ranker.rank(HISTORY, CANDIDATES)
    np.testing.assert_allclose(given, computed, rtol=1e-6, atol=1e-7)
    # And the vector is really used: another user's vector gives other scores.
    other = retriever.user_vectors([["i020", "i030"]])[0]
    assert not np.allclose(ranker.rank(HISTORY, CANDIDATES, other), computed)


def test_a_bad_vector_is_refused(ranker: Ranker) -> None:
    dim = ranker.tables.item_emb.shape[1]
    with pytest.raises(InvalidRequest, match=f"must hold {dim} values"):
        ranker.rank(HISTORY, CANDIDATES, np.zeros(dim + 1, np.float32))
    with pytest.raises(InvalidRequest, match="finite"):
        ranker.rank(HISTORY, CANDIDATES, np.full(dim, np.nan, np.float32))


def test_the_service_takes_a_vector_only_with_a_pinned_version(
    ranking_stub: ranking_pb2_grpc.RankingStub, retriever: Retriever
) -> None:
    vector = retriever.user_vectors([HISTORY])[0].tolist()
    request = ranking_pb2.RankRequest(
        context=common_pb2.UserContext(recent_item_ids=HISTORY), item_ids=list(CANDIDATES.item_ids), user_vector=vector
    )
    with pytest.raises(grpc.RpcError) as refused:
        ranking_stub.Rank(request, timeout=5)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "user_vector" in (refused.value.details() or "") and "bundle_version" in (refused.value.details() or "")

    request.bundle_version = retriever.version
    with_vector = ranking_stub.Rank(request, timeout=5).scores
    del request.user_vector[:]
    without = ranking_stub.Rank(request, timeout=5).scores
    np.testing.assert_allclose(with_vector, without, rtol=1e-6, atol=1e-7)

    request.user_vector.extend([0.0, 1.0])
    with pytest.raises(grpc.RpcError) as short:
        ranking_stub.Rank(request, timeout=5)
    assert short.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "user_vector" in (short.value.details() or "")
