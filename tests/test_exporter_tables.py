"""Co-visitation, popularity and item features on hand-made sequences."""

from __future__ import annotations

import numpy as np
import pytest

from exporter.sequences import Sequences
from exporter.tables import covisitation, genre_multi_hot, item_feature_matrix, popularity


def _seqs(rows: list[tuple[str, int, int]]) -> Sequences:
    users = np.array([r[0] for r in rows])
    items = np.array([r[1] for r in rows], dtype=np.int64)
    stamps = np.array([r[2] for r in rows], dtype=np.int64)
    return Sequences.build(users, items, stamps)


def _row(csr, i: int) -> dict[int, float]:  # type: ignore[no-untyped-def]
    lo, hi = csr.indptr[i], csr.indptr[i + 1]
    return dict(zip(csr.indices[lo:hi].tolist(), csr.scores[lo:hi].tolist(), strict=True))


def test_covisit_weights_pairs_by_closeness_within_window() -> None:
    # user a watches 1, 2, 3, 4 in time order (given out of order); user b watches 2, 1.
    seqs = _seqs([("a", 3, 30), ("a", 1, 10), ("b", 2, 5), ("a", 4, 40), ("a", 2, 20), ("b", 1, 6)])
    csr = covisitation(seqs, n_items=4, window=2, top_m=10)
    assert csr.indptr.shape == (4 + 2,)
    assert csr.indptr[0] == csr.indptr[1] == 0  # row 0 is padding
    # 1-2 adjacent for a (1.0) and for b (1.0); 1-3 at distance 2 (0.5); 1-4 is beyond the window.
    assert _row(csr, 1) == pytest.approx({2: 2.0, 3: 0.5})
    assert _row(csr, 4) == pytest.approx({3: 1.0, 2: 0.5})
    # rows are sorted best first
    assert list(_row(csr, 2).values()) == sorted(_row(csr, 2).values(), reverse=True)


def test_covisit_keeps_top_m_per_item() -> None:
    seqs = _seqs([("a", 1, 1), ("a", 2, 2), ("a", 3, 3), ("b", 1, 1), ("b", 2, 2)])
    csr = covisitation(seqs, n_items=3, window=5, top_m=1)
    assert _row(csr, 1) == pytest.approx({2: 2.0})
    assert all(np.diff(csr.indptr) <= 1)


def test_covisit_ignores_other_users_boundaries() -> None:
    seqs = _seqs([("a", 1, 1), ("b", 2, 2)])
    csr = covisitation(seqs, n_items=2, window=3, top_m=5)
    assert csr.indices.size == 0


def test_popularity_and_item_features() -> None:
    pop = popularity(np.array([1, 1, 2, 3, 1]), n_items=3)
    assert pop.tolist() == [0.0, 3.0, 1.0, 1.0]
    genres = genre_multi_hot(("i1", "i2", "i3"), {"i1": ("A",), "i3": ("A", "B")}, ("A", "B"))
    assert genres.tolist() == [[0, 0], [1, 0], [0, 0], [1, 1]]
    feats, names = item_feature_matrix(genres, pop, pop)
    assert feats.shape == (4, 4) and len(names) == 4
    assert feats[0].tolist() == [0, 0, 0, 0]
    assert feats[1, 2] == pytest.approx(1.0)  # the most popular item has scaled log popularity 1
