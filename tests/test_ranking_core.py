"""Ranker on a tiny hand-built bundle: scores match the features the ranker graph is known to compute."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ranking_svc.core import Candidates, Ranker
from recsys_common.bundle import open_bundle
from recsys_common.errors import InvalidRequest
from recsys_common.features import SOURCES
from tests.bundle_factory import item_embeddings


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
