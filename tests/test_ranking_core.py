"""Ranker on a tiny hand-built bundle: scores match the features the ranker graph is known to compute."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ranking_svc.core import Candidates, Ranker
from recsys_common.bundle import open_bundle
from recsys_common.errors import BundleMismatch, InvalidRequest
from recsys_common.features import BASE_FEATURES, DENSE_FEATURES, SOURCES
from tests.bundle_factory import item_embeddings, make_bundle


@pytest.fixture(scope="module")
def ranker(tiny_bundles: Path) -> Ranker:
    return Ranker(open_bundle(tiny_bundles), max_candidates=50)


def test_scores_are_aligned_with_candidates(ranker: Ranker) -> None:
    history = ["i001", "i003"]
    pairs = [(f"i{i:03d}", ("ann",)) for i in (2, 5, 7, 10)]
    scores = ranker.rank(history, Candidates.of(pairs))
    emb = item_embeddings(40)
    user_vec = emb[[1, 3]].mean(axis=0)
    retrieval = emb[[2, 5, 7, 10]] @ user_vec
    covisit_history = np.log1p(np.array([0.0, 2.0 + 0.8 * 1.0, 1.0, 0.0]))  # i005: i003's first + i001's second
    np.testing.assert_allclose(scores, retrieval + 0.01 * covisit_history, rtol=1e-5, atol=1e-6)
    reversed_scores = ranker.rank(history, Candidates.of(pairs[::-1]))
    np.testing.assert_allclose(reversed_scores, scores[::-1], rtol=1e-6)


def test_unknown_candidates_score_minus_infinity(ranker: Ranker) -> None:
    scores = ranker.rank(["i001"], Candidates(["i003", "missing", "i004"]))
    assert np.isneginf(scores[1]) and np.isfinite(scores[[0, 2]]).all()
    assert np.isneginf(ranker.rank(["i001"], Candidates(["missing"]))).all()


def test_empty_history_is_served(ranker: Ranker) -> None:
    scores = ranker.rank([], Candidates(["i001", "i002"]))
    assert np.isfinite(scores).all()


@pytest.mark.parametrize("n", [0, 51])
def test_candidate_count_is_bounded(ranker: Ranker, n: int) -> None:
    with pytest.raises(InvalidRequest, match="item_ids"):
        ranker.rank(["i001"], Candidates(["i002"] * n))


def test_source_mask_marks_each_known_source_and_ignores_unknown_ones() -> None:
    candidates = Candidates.of([("a", ("ann", "covisit")), ("b", ()), ("c", ("popular", "new-source"))])
    assert list(candidates.source_bits) == [0b0011, 0, 0b1100]
    expected = np.zeros((3, len(SOURCES)), dtype=np.float32)
    expected[0, [SOURCES.index("ann"), SOURCES.index("covisit")]] = 1
    expected[2, SOURCES.index("popular")] = 1
    np.testing.assert_array_equal(candidates.source_mask(), expected)
    assert Candidates([]).source_mask().shape == (0, len(SOURCES))
    # No bits at all: no source known for any candidate.
    assert not Candidates(["a", "b"], source_names=["ann"]).source_mask().any()


@pytest.mark.parametrize(
    ("bits", "names", "field"),
    [
        ([1], ["ann"], "source_bits"),  # one entry for two item ids
        ([1, 4], ["ann", "covisit"], "source_bits"),  # bit 2 has no name
        ([1, 1], [f"s{j}" for j in range(33)], "source_names"),
    ],
)
def test_malformed_source_columns_are_invalid(ranker: Ranker, bits: list[int], names: list[str], field: str) -> None:
    with pytest.raises(InvalidRequest, match=field):
        ranker.rank(["i001"], Candidates(["i002", "i003"], np.asarray(bits, np.uint32), names))


# -- bundles whose manifest declares the ranker's dense features (features.dense) ----------------------------


def _ranker_of(tmp_path: Path, **bundle_options: object) -> Ranker:
    make_bundle(tmp_path, **bundle_options)  # type: ignore[arg-type]
    return Ranker(open_bundle(tmp_path), max_candidates=50)


def test_ease_features_reach_the_ranker(tmp_path: Path) -> None:
    ranker = _ranker_of(tmp_path, ease=True)
    assert ranker.tables.ease is not None and ranker.tables.dense_features == DENSE_FEATURES
    history = ["i001", "i003"]
    pairs = [(f"i{i:03d}", ("ann",)) for i in (2, 4, 5, 6)]
    emb = item_embeddings(40)
    retrieval = emb[[2, 4, 5, 6]] @ emb[[1, 3]].mean(axis=0)
    covisit_history = np.log1p(np.array([0.0, 0.0, 2.0 + 0.8 * 1.0, 0.0]))
    # EASE rows: i -> {i + 1: 0.5, i + 3: 0.25}; the newest item (3) weighs 1, item 1 weighs ease_decay 0.5.
    ease_history = np.array([0.5 * 0.5, 0.5 + 0.5 * 0.25, 0.0, 0.25])
    expected = retrieval + 0.01 * covisit_history + 0.1 * ease_history
    np.testing.assert_allclose(ranker.rank(history, Candidates.of(pairs)), expected, rtol=1e-5, atol=1e-6)


def test_a_bundle_declaring_older_features_is_served_with_them(tmp_path: Path) -> None:
    # A bundle made before retrieval_z, sim_* and the ease features: its ranker takes these 7 columns.
    old = ["retrieval_score", "retrieval_gap", "covisit_history", "covisit_last", *(f"source:{s}" for s in SOURCES)]
    ranker = _ranker_of(tmp_path, dense_features=old)
    assert ranker.tables.dense_features == tuple(old) and ranker.tables.n_dense == len(old) + 1
    emb = item_embeddings(40)
    expected = emb[[2, 5]] @ emb[[1, 3]].mean(axis=0) + 0.01 * np.log1p([0.0, 2.8])
    scores = ranker.rank(["i001", "i003"], Candidates.of([("i002", ("ann",)), ("i005", ("covisit",))]))
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dense_features": ["retrieval_score", "from_the_future"]}, "unknown dense feature.*from_the_future"),
        ({"dense_features": ["retrieval_score", "ease_history"]}, "need ease.npz"),
        (
            {"ease": True, "ranker_dense": len(BASE_FEATURES) + 1},
            f"ranker dense input has {len(BASE_FEATURES) + 1} columns.*make {len(DENSE_FEATURES) + 1}",
        ),
    ],
)
def test_a_bundle_whose_features_cannot_be_made_is_refused(
    tmp_path: Path, options: dict[str, object], message: str
) -> None:
    with pytest.raises(BundleMismatch, match=message):
        _ranker_of(tmp_path, **options)
