"""Retriever on a tiny hand-built bundle: exact answers, exclusions inside the search, validation."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from recsys_common.bundle import open_bundle
from recsys_common.errors import InvalidRequest
from retrieval_svc.core import Query, Retriever
from tests.bundle_factory import DIM, item_embeddings


@pytest.fixture(scope="module")
def retriever(tiny_bundles: Path) -> Retriever:
    return Retriever(open_bundle(tiny_bundles))


def brute_force(query: np.ndarray, k: int, excluded: set[int]) -> tuple[list[str], np.ndarray]:
    emb = item_embeddings(40)
    scores = emb[1:] @ query
    order = [i + 1 for i in np.argsort(-scores, kind="stable") if i + 1 not in excluded][:k]
    return [f"i{i:03d}" for i in order], emb[order] @ query


@pytest.mark.parametrize(("k", "n_excluded"), itertools.product([1, 5, 39, 40], [0, 3, 20]))
def test_vector_search_equals_brute_force_with_exclusions(retriever: Retriever, k: int, n_excluded: int) -> None:
    rng = np.random.default_rng(k * 100 + n_excluded)
    query = rng.normal(size=DIM).astype(np.float32)
    excluded = {int(i) for i in rng.choice(np.arange(1, 41), size=n_excluded, replace=False)}
    (result,) = retriever.search([Query(k=k, vector=query, exclude_item_ids=[f"i{i:03d}" for i in excluded])])
    ids, scores = brute_force(query, k, excluded)
    assert result.item_ids == ids
    np.testing.assert_allclose(result.scores, scores, rtol=1e-5, atol=1e-6)
    # Never short while k eligible items exist.
    assert len(result.item_ids) == min(k, 40 - n_excluded)


def test_context_search_follows_the_history_and_excludes_it(retriever: Retriever) -> None:
    history = ["i001", "i003", "i005"]  # odd cluster
    (result,) = retriever.search([Query(k=10, recent_item_ids=history, exclude_context=True)])
    assert not set(result.item_ids) & set(history)
    assert all(int(i[1:]) % 2 == 1 for i in result.item_ids)
    (even,) = retriever.search([Query(k=10, recent_item_ids=["i002", "i004"])])
    assert all(int(i[1:]) % 2 == 0 for i in even.item_ids)


def test_batch_answers_equal_single_answers(retriever: Retriever) -> None:
    queries = [Query(k=7, recent_item_ids=["i001"]), Query(k=3, vector=np.ones(DIM, np.float32)), Query(k=2)]
    batch = retriever.search(queries)
    for q, got in zip(queries, batch, strict=True):
        (single,) = retriever.search([q])
        assert got.item_ids == single.item_ids


def test_unknown_history_items_are_ignored(retriever: Retriever) -> None:
    (a,) = retriever.search([Query(k=5, recent_item_ids=["i001", "nope"])])
    (b,) = retriever.search([Query(k=5, recent_item_ids=["i001"])])
    assert a.item_ids == b.item_ids


@pytest.mark.parametrize(
    ("query", "field"),
    [
        (Query(k=0), "k"),
        (Query(k=10_001), "k"),
        (Query(k=5, vector=np.ones(3, np.float32)), "vector"),
        (Query(k=5, vector=np.full(DIM, np.nan, np.float32)), "vector"),
    ],
)
def test_invalid_queries_name_the_field(retriever: Retriever, query: Query, field: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        retriever.search([query])
    assert err.value.field == field
