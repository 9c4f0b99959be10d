"""recsys_common.features: shapes and semantics of the serving-side candidate and feature functions."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from recsys_common.features import (
    BASE_FEATURES,
    DENSE_FEATURES,
    EASE_FEATURES,
    SOURCES,
    Covisit,
    ItemTables,
    covisit_candidates,
    covisit_scores,
    ease_scores,
    merge_sources,
    not_in,
    pad_history,
    popular_candidates,
    ranker_feed,
)


def _tables(history_len: int = 4) -> ItemTables:
    # 5 items. Co-visitation rows (best first): 1 -> {2: 3, 3: 1}; 2 -> {1: 3, 4: 2}; 3 -> {1: 1}; 4 -> {2: 2}.
    indptr = np.array([0, 0, 2, 4, 5, 6, 6], dtype=np.int64)
    indices = np.array([2, 3, 1, 4, 1, 2], dtype=np.int32)
    scores = np.array([3, 1, 3, 2, 1, 2], dtype=np.float32)
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((6, 3)).astype(np.float32)
    emb[0] = 0
    return ItemTables(
        popularity=np.array([0, 5, 9, 1, 7, 3], dtype=np.float32),
        covisit=Covisit(indptr, indices, scores),
        item_features=np.arange(12, dtype=np.float32).reshape(6, 2),
        item_emb=emb,
        history_len=history_len,
        covisit_decay=0.5,
    )


@pytest.mark.parametrize("n_items", [300, 100_000])  # dense accumulator / sorted (np.unique) path
def test_covisit_scores_equal_a_plain_sum_on_either_path(n_items: int) -> None:
    rng = np.random.default_rng(1)
    rows = [rng.choice(np.arange(1, 301), size=rng.integers(0, 40), replace=False) for _ in range(300)]
    ends = np.cumsum([len(r) for r in rows])
    indptr = np.concatenate([[0, 0], ends, np.full(n_items - 300, ends[-1])]).astype(np.int64)
    indices = np.concatenate(rows).astype(np.int32)
    scores = rng.random(indices.size).astype(np.float32)
    scores[::7] = 0.0  # a zero score is still a co-visit
    t = ItemTables(
        popularity=np.zeros(n_items + 1, np.float32),
        covisit=Covisit(indptr, indices, scores),
        item_features=np.zeros((n_items + 1, 1), np.float32),
        item_emb=np.zeros((n_items + 1, 2), np.float32),
        history_len=20,
        covisit_decay=0.8,
    )
    history = rng.choice(np.arange(1, 301), size=20, replace=False)
    expected: dict[int, float] = {}
    for age, item in enumerate(history[::-1]):
        lo, hi = indptr[item], indptr[item + 1]
        for neighbour, score in zip(indices[lo:hi], scores[lo:hi], strict=True):
            expected[int(neighbour)] = expected.get(int(neighbour), 0.0) + float(score) * 0.8**age
    items, got = covisit_scores(t, history)
    assert items.tolist() == sorted(expected)
    np.testing.assert_allclose(got, [expected[i] for i in items.tolist()], rtol=1e-5, atol=1e-7)


def test_pad_history_right_aligns_and_truncates() -> None:
    assert pad_history(np.array([7, 8]), 4).tolist() == [[0, 0, 7, 8]]
    assert pad_history(np.array([1, 2, 3, 4, 5]), 3).tolist() == [[3, 4, 5]]
    assert pad_history(np.array([], dtype=np.int64), 2).tolist() == [[0, 0]]
    assert pad_history(np.array([5]), 3).dtype == np.int64


def test_covisit_candidates_recency_weighted_and_excluding() -> None:
    t = _tables()
    # history [1, 2]: newest (2) weighs 1, item 1 weighs 0.5.
    items, scores = covisit_candidates(t, np.array([1, 2]), n=10, exclude=np.array([], dtype=np.int64))
    expected = {1: 3.0, 4: 2.0, 2: 1.5, 3: 0.5}
    assert dict(zip(items.tolist(), scores.tolist(), strict=True)) == pytest.approx(expected)
    assert scores.tolist() == sorted(scores.tolist(), reverse=True)
    items, _ = covisit_candidates(t, np.array([1, 2]), n=2, exclude=np.array([1, 2]))
    assert items.tolist() == [4, 3]
    empty, _ = covisit_candidates(t, np.array([5]), n=3, exclude=np.array([5]))
    assert empty.size == 0


def test_popular_candidates_skip_excluded() -> None:
    t = _tables()
    items, scores = popular_candidates(t, 3, exclude=np.array([2]))
    assert items.tolist() == [4, 1, 5]
    assert scores.tolist() == [7, 5, 3]
    assert popular_candidates(t, 10, np.array([], dtype=np.int64))[0].tolist() == [2, 4, 1, 5, 3]


def test_merge_sources_dedupes_and_marks_every_source() -> None:
    cands, mask = merge_sources([np.array([3, 1]), np.array([1, 4]), np.array([4, 5])])
    assert cands.tolist() == [3, 1, 4, 5]
    assert mask.tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert mask.dtype == np.float32 and mask.shape[1] == len(SOURCES)


def test_ranker_feed_shapes_and_values() -> None:
    t = _tables()
    history = np.array([1, 2])
    cands, mask = merge_sources([np.array([3, 4]), np.array([4]), np.array([5])])
    user_vec = np.array([1.0, 0.5, -1.0], dtype=np.float32)
    feed = ranker_feed(t, history, cands, mask, user_vec)
    assert set(feed) == {"history", "candidates", "dense"}
    assert feed["history"].tolist() == [[0, 0, 1, 2]] and feed["history"].dtype == np.int64
    assert feed["candidates"].tolist() == [[3, 4, 5]] and feed["candidates"].dtype == np.int64
    dense = feed["dense"]
    assert t.dense_features == BASE_FEATURES  # no EASE table: no ease_* columns
    assert dense.shape == (1, 3, len(BASE_FEATURES) + 2) and dense.dtype == np.float32
    retrieval = t.item_emb[cands] @ user_vec
    col = {name: j for j, name in enumerate(BASE_FEATURES)}
    np.testing.assert_allclose(dense[0, :, col["retrieval_score"]], retrieval, rtol=1e-6)
    np.testing.assert_allclose(dense[0, :, col["retrieval_gap"]], retrieval - retrieval.max(), rtol=1e-6, atol=1e-6)
    z = (retrieval - retrieval.mean()) / (retrieval.std() + 1e-6)
    np.testing.assert_allclose(dense[0, :, col["retrieval_z"]], z, rtol=1e-5, atol=1e-6)
    ranks = np.argsort(np.argsort(-retrieval, kind="stable"), kind="stable")
    np.testing.assert_allclose(dense[0, :, col["retrieval_rank"]], np.log1p(ranks), rtol=1e-6)
    hist_cv, last_cv = dense[0, :, col["covisit_history"]], dense[0, :, col["covisit_last"]]
    np.testing.assert_allclose(hist_cv, np.log1p([0.5, 2.0, 0.0]), rtol=1e-6)  # history co-visitation
    np.testing.assert_allclose(last_cv, np.log1p([0.0, 2.0, 0.0]), rtol=1e-6)  # co-visitation with item 2
    unit = t.item_emb / (np.linalg.norm(t.item_emb, axis=1, keepdims=True) + 1e-6)
    cos = unit[cands] @ unit[history].T
    np.testing.assert_allclose(dense[0, :, col["sim_last"]], cos[:, -1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dense[0, :, col["sim_recent_max"]], cos.max(axis=1), rtol=1e-5, atol=1e-6)
    src = col[f"source:{SOURCES[0]}"]
    np.testing.assert_array_equal(dense[0, :, src : src + len(SOURCES)], mask)
    np.testing.assert_array_equal(dense[0, :, len(BASE_FEATURES) :], t.item_features[cands])


def test_ranker_feed_for_a_user_without_history() -> None:
    t = _tables()
    feed = ranker_feed(t, np.array([], dtype=np.int64), np.array([1, 2]), np.ones((2, 3), np.float32), np.ones(3))
    assert feed["history"].tolist() == [[0, 0, 0, 0]]
    covisit = [BASE_FEATURES.index("covisit_history"), BASE_FEATURES.index("covisit_last")]
    assert np.all(feed["dense"][0, :, covisit] == 0)
    t = _ease_tables()
    feed = ranker_feed(t, np.array([], dtype=np.int64), np.array([1, 2]), np.ones((2, 3), np.float32), np.ones(3))
    ease = [t.dense_features.index(f) for f in EASE_FEATURES if f != "ease_rank"]
    assert np.all(feed["dense"][0, :, ease] == 0)


def _ease_tables() -> ItemTables:
    # EASE rows (best first): 1 -> {3: 0.5, 5: 0.2}; 2 -> {4: 0.4, 3: 0.1}; 4 -> {5: 0.3}; 3 and 5 are empty.
    ease = Covisit(
        np.array([0, 0, 2, 4, 4, 5, 5], dtype=np.int64),
        np.array([3, 5, 4, 3, 5], dtype=np.int32),
        np.array([0.5, 0.2, 0.4, 0.1, 0.3], dtype=np.float32),
    )
    return replace(_tables(), ease=ease, ease_decay=0.5, dense_features=())


def test_ranker_feed_ease_columns() -> None:
    t = _ease_tables()
    assert t.dense_features == DENSE_FEATURES and t.n_dense == len(DENSE_FEATURES) + 2
    history, cands = np.array([1, 2]), np.array([3, 4, 5])
    dense = ranker_feed(t, history, cands, np.ones((3, 3), np.float32), np.ones(3))["dense"][0]
    col = {name: j for j, name in enumerate(DENSE_FEATURES)}
    # The newest item (2) weighs 1, item 1 weighs ease_decay = 0.5.
    np.testing.assert_allclose(dense[:, col["ease_history"]], [0.1 + 0.5 * 0.5, 0.4, 0.5 * 0.2], rtol=1e-6)
    np.testing.assert_allclose(dense[:, col["ease_history_flat"]], [0.1 + 0.5, 0.4, 0.2], rtol=1e-6)
    np.testing.assert_allclose(dense[:, col["ease_last"]], [0.1, 0.4, 0.0], rtol=1e-6)
    np.testing.assert_allclose(dense[:, col["ease_rank"]], np.log1p([1, 0, 2]), rtol=1e-6)  # by ease_history
    # The base columns are the same with or without the EASE table.
    base = ranker_feed(
        replace(t, ease=None, dense_features=()), history, cands, np.ones((3, 3), np.float32), np.ones(3)
    )
    np.testing.assert_array_equal(dense[:, : len(BASE_FEATURES)], base["dense"][0, :, : len(BASE_FEATURES)])
    np.testing.assert_array_equal(dense[:, len(DENSE_FEATURES) :], t.item_features[cands])


def test_ranker_feed_makes_the_columns_a_bundle_declares_in_its_order() -> None:
    # An older bundle's ranker takes fewer columns, in another order.
    declared = ("covisit_last", "retrieval_score", "source:popular")
    t = replace(_tables(), dense_features=declared)
    cands = np.array([3, 4, 5])
    mask = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
    full = ranker_feed(replace(t, dense_features=()), np.array([1, 2]), cands, mask, np.ones(3))["dense"][0]
    dense = ranker_feed(t, np.array([1, 2]), cands, mask, np.ones(3))["dense"][0]
    assert dense.shape == (3, len(declared) + 2)
    for j, name in enumerate(declared):
        np.testing.assert_array_equal(dense[:, j], full[:, BASE_FEATURES.index(name)])
    np.testing.assert_array_equal(dense[:, len(declared) :], t.item_features[cands])


@pytest.mark.parametrize(
    ("declared", "message"),
    [
        (("retrieval_score", "no_such_feature"), "unknown dense feature"),
        (("retrieval_score", "ease_last"), "need ease.npz"),  # no EASE table
    ],
)
def test_item_tables_refuse_features_they_cannot_make(declared: tuple[str, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        replace(_tables(), dense_features=declared)


@pytest.mark.parametrize("n_items", [300, 100_000])  # dense accumulator / sorted path of the feed's lookups
def test_ranker_feed_history_sums_equal_the_candidate_lists(n_items: int) -> None:
    rng = np.random.default_rng(4)
    rows = [rng.choice(np.arange(1, 301), size=rng.integers(0, 40), replace=False) for _ in range(300)]
    ends = np.cumsum([len(r) for r in rows])
    indptr = np.concatenate([[0, 0], ends, np.full(n_items - 300, ends[-1])]).astype(np.int64)
    csr = Covisit(indptr, np.concatenate(rows).astype(np.int32), rng.random(int(ends[-1])).astype(np.float32))
    t = ItemTables(
        popularity=np.zeros(n_items + 1, np.float32),
        covisit=csr,
        item_features=np.zeros((n_items + 1, 1), np.float32),
        item_emb=np.zeros((n_items + 1, 2), np.float32),
        history_len=20,
        ease=csr,
        ease_decay=0.7,
    )
    history = rng.choice(np.arange(1, 301), size=30, replace=False)
    cands = rng.choice(np.arange(1, 301), size=80, replace=False)
    dense = ranker_feed(t, history, cands, np.zeros((80, 3), np.float32), np.zeros(2))["dense"][0]
    for feature, scores, transform in (
        ("covisit_history", covisit_scores(t, history), np.log1p),
        ("ease_history", ease_scores(t, history), lambda x: x),
    ):
        items, values = scores
        expected = dict(zip(items.tolist(), values.tolist(), strict=True))
        got = dense[:, DENSE_FEATURES.index(feature)]
        np.testing.assert_allclose(got, transform(np.array([expected.get(c, 0.0) for c in cands])), rtol=1e-5)
    lo, hi = indptr[history[-1]], indptr[history[-1] + 1]
    last = dict(zip(csr.indices[lo:hi].tolist(), csr.scores[lo:hi].tolist(), strict=True))
    np.testing.assert_allclose(dense[:, DENSE_FEATURES.index("ease_last")], [last.get(c, 0.0) for c in cands.tolist()])


def test_features_module_imports_no_heavy_packages() -> None:
    code = (
        "import sys, recsys_common.features; "
        "bad = [m for m in ('torch', 'faiss', 'onnxruntime') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_not_in_is_the_complement_of_isin() -> None:
    rng = np.random.default_rng(7)
    for _ in range(200):
        items = rng.integers(0, 60, size=int(rng.integers(0, 40)))
        exclude = rng.integers(0, 60, size=int(rng.integers(0, 40)))  # duplicates, unsorted, sometimes empty
        assert np.array_equal(not_in(items, exclude), ~np.isin(items, exclude))
