"""exporter.ann_index: the index type follows the catalogue size and memory; recall is checked against exact search."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from exporter import ann_index
from exporter.ann_index import IndexPolicy, choose_and_build, choose_index, exact_topk, recall_at_k
from tests.bundle_factory import clustered_vectors

DIM = 16


@pytest.fixture(scope="module")
def catalogue() -> tuple[np.ndarray, np.ndarray]:
    """(n + 1, D) item embeddings with a padding row, and held-out user vectors from the same clusters."""
    x = clustered_vectors(20_000 + 300, DIM, n_clusters=200, noise=1.0, seed=3)
    return np.vstack([np.zeros((1, DIM), np.float32), x[:20_000]]), x[20_000:]


@pytest.mark.parametrize(
    ("n_items", "budget", "expected"),
    [
        (1_682, None, "Flat"),
        (50_000, None, "Flat"),
        (100_000, None, "HNSW"),
        (1_000_000, None, "IVF"),
        # Flat vectors of 1M x 64 need 256 MB+; a 120 MB budget leaves IVF-SQ8 only.
        (1_000_000, 120 << 20, "IVF"),
    ],
)
def test_choice_follows_size_and_memory(n_items: int, budget: int | None, expected: str) -> None:
    spec = choose_index(n_items, 64, IndexPolicy(memory_budget_bytes=budget))
    assert spec.type == expected
    if budget is not None:
        assert spec.params["encoding"] == "SQ8"
        assert ann_index.estimate_memory_bytes(spec, n_items, 64) <= budget
    if expected == "IVF":
        assert spec.params["nlist"] == 4000


def test_exact_topk_and_recall_definitions() -> None:
    rng = np.random.default_rng(0)
    items = rng.normal(size=(500, 8)).astype(np.float32)
    queries = rng.normal(size=(5, 8)).astype(np.float32)
    scores, ids = exact_topk(items, queries, 10)
    ref = np.argsort(-(queries @ items.T), axis=1)[:, :10] + 1
    assert np.array_equal(ids, ref)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ items.T, ref - 1, axis=1), rtol=1e-5)
    assert recall_at_k(ids, ids) == 1.0
    assert recall_at_k(np.full_like(ids, -1), ids) == 0.0
    half = ids.copy()
    half[:, 5:] = -1
    assert recall_at_k(half, ids) == 0.5


@pytest.mark.parametrize("kind", ["HNSW", "IVF"])
def test_approximate_index_is_tuned_to_the_floor_on_user_vectors(
    catalogue: tuple[np.ndarray, np.ndarray], kind: str
) -> None:
    emb, users = catalogue
    policy = IndexPolicy(exact_max_items=1000, hnsw_max_items=50_000 if kind == "HNSW" else 5_000, hnsw_m=16)
    index, entry, report = choose_and_build(emb, users, policy)
    assert report.passed and report.type == entry["type"] == kind
    assert entry["ntotal"] == index.ntotal == 20_000
    assert entry["recall"]["value"] >= 0.95 and entry["recall"]["k"] == 100
    # The recorded parameter reproduces the recorded recall, measured independently here.
    _, truth = exact_topk(emb[1:], users, 100)
    params = ann_index.search_params(kind, entry["params"])
    _, found = index.search(users, 100, params=params)
    assert recall_at_k(found, truth) == pytest.approx(report.recall, abs=1e-4)
    # Tuning stopped at the first grid value that reached the target: the one before it did not.
    name = "efSearch" if kind == "HNSW" else "nprobe"
    tried = [t for t in report.tried if t["factory"] == entry["factory"]]
    assert tried[-1]["param"] == {name: entry["params"][name]}
    if len(tried) > 1:
        assert tried[-2]["recall"] < policy.recall_floor + policy.recall_margin
    assert set(np.unique(found)) <= set(range(1, 20_001))


def test_small_catalogue_is_exact(catalogue: tuple[np.ndarray, np.ndarray]) -> None:
    emb, users = catalogue
    index, entry, report = choose_and_build(emb[:3001], users)
    assert entry["type"] == "Flat" and report.recall == 1.0 and report.passed
    assert isinstance(faiss.downcast_index(index), faiss.IndexIDMap2)


def test_floor_failure_is_reported_not_hidden(catalogue: tuple[np.ndarray, np.ndarray]) -> None:
    emb, users = catalogue
    # A grid that cannot reach the floor and no exact fallback within the memory budget.
    policy = IndexPolicy(
        exact_max_items=1000,
        hnsw_max_items=1000,
        nprobe_grid=(1,),
        memory_budget_bytes=ann_index.estimate_memory_bytes(ann_index.ivf_spec(20_000, "SQ8"), 20_000, DIM),
    )
    _, entry, report = choose_and_build(emb, users, policy)
    assert not report.passed and "below the floor" in report.reason
    assert entry["params"]["nprobe"] == 1 and entry["params"]["encoding"] == "SQ8"
    assert ann_index.check_recall_floor(report, floor=0.0).passed
