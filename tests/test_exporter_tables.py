"""Co-visitation, EASE, popularity and item features on hand-made sequences (EASE also on ML-100K)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from exporter.baselines import BaselineSettings, fit_ease, train_matrix
from exporter.config import ExportConfig
from exporter.data import load_dataset
from exporter.evaluate import protocol_split
from exporter.sequences import Sequences
from exporter.tables import covisitation, ease_table, genre_multi_hot, item_feature_matrix, popularity
from tests.conftest import ml100k_dir


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


def test_ease_table_keeps_each_items_top_m_positive_weights() -> None:
    # Three users: 1 and 2 go together, 3 goes with 1 once; item 4 is never seen.
    seqs = _seqs([("a", 1, 1), ("a", 2, 2), ("b", 2, 1), ("b", 1, 2), ("c", 1, 1), ("c", 3, 2), ("c", 1, 3)])
    csr = ease_table(seqs, n_items=4, lam=0.5, top_m=1)
    assert csr.indptr.shape == (4 + 2,) and csr.indptr[1] == 0  # row 0 is padding
    assert (csr.scores > 0).all() and all(np.diff(csr.indptr) <= 1)
    assert list(_row(csr, 2)) == [1] and list(_row(csr, 3)) == [1]  # both only ever seen beside item 1
    assert _row(csr, 4) == {}


def test_ease_table_rows_are_the_ease_baselines_weights_on_ml100k() -> None:
    split = protocol_split(load_dataset(ml100k_dir()), "loo", ExportConfig())
    seqs, n, top_m = split.seqs, len(split.vocab), 50
    train = train_matrix(seqs.user_of_position(), seqs.items, seqs.n_users, n)
    b = fit_ease(train, BaselineSettings(ease_lambda=500.0))(sp.identity(n, dtype=np.float32, format="csr"))
    csr = ease_table(seqs, n, 500.0, top_m)
    assert csr.indptr.shape == (n + 2,)
    for i in np.random.default_rng(0).choice(np.arange(1, n + 1), size=200, replace=False):
        row = b[i - 1]
        best = np.sort(row[row > 0])[::-1][:top_m]
        got = _row(csr, int(i))
        # The row's top_m positive weights, best first (items with equal weights may come in either order) ...
        np.testing.assert_allclose(list(got.values()), best, rtol=1e-4, atol=1e-7)
        # ... each one the weight of the item it names.
        named = row[np.array(list(got), dtype=np.int64) - 1]
        np.testing.assert_allclose(list(got.values()), named, rtol=1e-4, atol=1e-7)
