"""Ranker on a tiny hand-built bundle: scores match the features the ranker graph is known to compute."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ranking_svc.core import Candidate, Ranker, source_mask
from recsys_common.bundle import open_bundle
from recsys_common.errors import InvalidRequest
from recsys_common.features import SOURCES
from tests.bundle_factory import item_embeddings


@pytest.fixture(scope="module")
def ranker(tiny_bundles: Path) -> Ranker:
    return Ranker(open_bundle(tiny_bundles), max_candidates=50)


def test_scores_are_aligned_with_candidates(ranker: Ranker) -> None:
    history = ["i001", "i003"]
    candidates = [Candidate(f"i{i:03d}", ("ann",)) for i in (2, 5, 7, 10)]
    scores = ranker.rank(history, candidates)
    emb = item_embeddings(40)
    user_vec = emb[[1, 3]].mean(axis=0)
    retrieval = emb[[2, 5, 7, 10]] @ user_vec
    covisit_history = np.log1p(np.array([0.0, 2.0 + 0.8 * 1.0, 1.0, 0.0]))  # i005: i003's first + i001's second
    np.testing.assert_allclose(scores, retrieval + 0.01 * covisit_history, rtol=1e-5, atol=1e-6)
    reversed_scores = ranker.rank(history, candidates[::-1])
    np.testing.assert_allclose(reversed_scores, scores[::-1], rtol=1e-6)


def test_unknown_candidates_score_minus_infinity(ranker: Ranker) -> None:
    scores = ranker.rank(["i001"], [Candidate("i003"), Candidate("missing"), Candidate("i004")])
    assert np.isneginf(scores[1]) and np.isfinite(scores[[0, 2]]).all()
    assert np.isneginf(ranker.rank(["i001"], [Candidate("missing")])).all()


def test_empty_history_is_served(ranker: Ranker) -> None:
    scores = ranker.rank([], [Candidate("i001"), Candidate("i002")])
    assert np.isfinite(scores).all()


@pytest.mark.parametrize("n", [0, 51])
def test_candidate_count_is_bounded(ranker: Ranker, n: int) -> None:
    with pytest.raises(InvalidRequest, match="candidates"):
        ranker.rank(["i001"], [Candidate("i002")] * n)


def test_source_mask_marks_each_known_source_and_ignores_unknown_ones() -> None:
    candidates = [Candidate("a", ("ann", "covisit")), Candidate("b", ()), Candidate("c", ("popular", "new-source"))]
    mask = source_mask(candidates)
    expected = np.zeros((3, len(SOURCES)), dtype=np.float32)
    expected[0, [SOURCES.index("ann"), SOURCES.index("covisit")]] = 1
    expected[2, SOURCES.index("popular")] = 1
    np.testing.assert_array_equal(mask, expected)
    assert source_mask([]).shape == (0, len(SOURCES))
