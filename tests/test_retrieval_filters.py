"""Filters inside the search on every index type: never short while k eligible items exist, never an excluded item."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from recsys_common.bundle import open_bundle
from retrieval_svc.ann import FilterPolicy, Shard
from retrieval_svc.core import Query, Retriever
from tests.bundle_factory import clustered_vectors, make_bundle

N, DIM, K = 4000, 16, 50
UNAVAILABLE = [f"i{i:03d}" for i in range(7, N + 1, 97)]


def item_id(i: int) -> str:
    return f"i{i:03d}"


@pytest.fixture(scope="module")
def emb() -> np.ndarray:
    x = clustered_vectors(N, DIM, n_clusters=40, noise=1.0, seed=5)
    return np.vstack([np.zeros((1, DIM), np.float32), x])


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, emb: np.ndarray) -> dict[str, Path]:
    out = {}
    for kind, params in [("Flat", {}), ("HNSW", {"efSearch": 64}), ("IVF", {"nlist": 64, "nprobe": 8})]:
        path = tmp_path_factory.mktemp(kind)
        make_bundle(path, emb=emb, index=kind, index_params=params, unavailable=UNAVAILABLE)
        out[kind] = path
    return out


def brute_force(emb: np.ndarray, query: np.ndarray, k: int, excluded: set[int]) -> tuple[list[str], np.ndarray]:
    scores = emb[1:] @ query
    order = [i + 1 for i in np.argsort(-scores, kind="stable") if i + 1 not in excluded][:k]
    return [item_id(i) for i in order], emb[order] @ query


@pytest.mark.parametrize(
    ("kind", "ratio", "planned"), itertools.product(["Flat", "HNSW", "IVF"], [0.0, 0.5, 0.8, 0.95, 0.99], [True, False])
)
def test_never_short_and_never_excluded(
    bundles: dict[str, Path], emb: np.ndarray, kind: str, ratio: float, planned: bool
) -> None:
    # planned=False switches the planned exact search off, so the scaled ANN search and its
    # fallback carry the high exclusion ratios alone.
    policy = FilterPolicy() if planned else FilterPolicy(exact_max_eligible=0, exact_min_ratio=1.0)
    retriever = Retriever(open_bundle(bundles[kind]), filter_policy=policy, warm=False)
    rng = np.random.default_rng(int(ratio * 100))
    unavailable = {int(i[1:]) for i in UNAVAILABLE}
    recalls, methods = [], []
    for _ in range(5):
        query = emb[rng.integers(1, N + 1)] + 0.1 * rng.normal(size=DIM).astype(np.float32)
        excluded = set(rng.choice(np.arange(1, N + 1), size=int(ratio * N), replace=False).tolist())
        (result,) = retriever.search([Query(k=K, vector=query, exclude_item_ids=[item_id(i) for i in excluded])])
        eligible = N - len(excluded | unavailable)
        assert len(result.item_ids) == min(K, eligible), (kind, ratio, result.method)
        got = {int(i[1:]) for i in result.item_ids}
        assert not got & (excluded | unavailable)
        assert list(result.scores) == sorted(result.scores, reverse=True)
        truth, scores = brute_force(emb, query, K, excluded | unavailable)
        if kind == "Flat" or result.method != "ann":
            assert result.item_ids == truth
            np.testing.assert_allclose(result.scores, scores, rtol=1e-5, atol=1e-6)
        recalls.append(len(set(result.item_ids) & set(truth)) / len(truth))
        methods.append(result.method)
    assert np.mean(recalls) >= 0.9, (kind, ratio, recalls, methods)
    if kind != "Flat" and planned and ratio >= 0.95:
        assert set(methods) == {"exact"}
    if kind != "Flat" and not planned:
        assert "exact" not in methods


def test_leaving_exactly_k_eligible(bundles: dict[str, Path], emb: np.ndarray) -> None:
    for kind in ("HNSW", "IVF"):
        retriever = Retriever(open_bundle(bundles[kind]), filter_policy=FilterPolicy(0, 1.0), warm=False)
        unavailable = {int(i[1:]) for i in UNAVAILABLE}
        keep = [i for i in range(N, 0, -1) if i not in unavailable][:K]
        excluded = [item_id(i) for i in range(1, N + 1) if i not in keep]
        (result,) = retriever.search([Query(k=K, vector=emb[1], exclude_item_ids=excluded)])
        assert sorted(int(i[1:]) for i in result.item_ids) == sorted(keep)


def test_unavailable_from_bundle_and_runtime(bundles: dict[str, Path], emb: np.ndarray) -> None:
    # Selector path of the HNSW index (the planned exact search is off at this small size).
    retriever = Retriever(open_bundle(bundles["HNSW"]), filter_policy=FilterPolicy(0, 1.0), warm=False)
    assert retriever.filter.n_unavailable == len(UNAVAILABLE)
    query = emb[105]  # the nearest item to its own (unit) vector is itself
    (before,) = retriever.search([Query(k=10, vector=emb[104])])
    assert "i104" not in before.item_ids and before.method == "ann", "i104 is in unavailable.json"
    (before,) = retriever.search([Query(k=10, vector=query)])
    assert before.item_ids[0] == "i105"
    runtime = retriever.with_unavailable(["i105", "not-in-bundle"])
    assert runtime.ann is retriever.ann and runtime.filter.n_unavailable == len(UNAVAILABLE) + 1
    batch = runtime.search([Query(k=10, vector=query), Query(k=10, vector=query, exclude_item_ids=["i106"])])
    assert all("i105" not in r.item_ids and len(r.item_ids) == 10 for r in batch)
    assert "i106" not in batch[1].item_ids
    (after,) = retriever.search([Query(k=10, vector=query)])
    assert after.item_ids == before.item_ids, "the old snapshot is not changed by with_unavailable"


@pytest.mark.parametrize("kind", ["Flat", "IVF", "HNSW"])
def test_shards_partition_the_items_and_merge_to_the_whole(
    bundles: dict[str, Path], emb: np.ndarray, kind: str
) -> None:
    bundle = open_bundle(bundles[kind])
    whole = Retriever(bundle, warm=False)
    shards = [Retriever(bundle, shard=Shard(i, 3), warm=False) for i in range(3)]
    assert sum(s.ann.ntotal for s in shards) == N
    rng = np.random.default_rng(1)
    for _ in range(5):
        q = Query(k=K, vector=emb[rng.integers(1, N + 1)], exclude_item_ids=[item_id(i) for i in range(1, 200)])
        parts = [s.search([q])[0] for s in shards]
        for i, part in enumerate(parts):
            assert all((int(x[1:]) - 1) % 3 == i for x in part.item_ids)
        merged = sorted(
            ((float(s), x) for p in parts for x, s in zip(p.item_ids, p.scores, strict=True)), key=lambda t: -t[0]
        )[:K]
        (ref,) = whole.search([q])
        if kind == "Flat":
            assert [x for _, x in merged] == ref.item_ids
            assert [s for s, _ in merged] == ref.scores.tolist()  # bit for bit
        else:
            assert len(set(x for _, x in merged) & set(ref.item_ids)) >= 0.9 * K
