"""Item tables of a bundle: popularity counts, co-visitation (CSR) and item side features."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from exporter.sequences import Sequences


def popularity(items: npt.NDArray[np.int64], n_items: int) -> npt.NDArray[np.float32]:
    """(n + 1,) interaction counts per item index; row 0 (padding) is 0."""
    counts = np.bincount(items, minlength=n_items + 1).astype(np.float32)
    counts[0] = 0.0
    return counts


@dataclass(frozen=True)
class CovisitCSR:
    """Top-M co-visited items per item: row i is `indices[indptr[i]:indptr[i + 1]]`, best first."""

    indptr: npt.NDArray[np.int64]  # (n + 2,)
    indices: npt.NDArray[np.int32]  # (nnz,)
    scores: npt.NDArray[np.float32]  # (nnz,)


def covisitation(seqs: Sequences, n_items: int, window: int, top_m: int) -> CovisitCSR:
    """Pairs of items at most `window` steps apart in a user's sequence, weighted 1 / distance.

    Symmetric (watching B soon after A says as much about A->B as B->A for next-item candidates);
    closeness weighting keeps the pairs that reflect one session of taste rather than a whole year.
    """
    user_of = seqs.user_of_position()
    src_parts, dst_parts, w_parts = [], [], []
    for d in range(1, window + 1):
        same = user_of[:-d] == user_of[d:]
        a, b = seqs.items[:-d][same], seqs.items[d:][same]
        keep = (a != b) & (a > 0) & (b > 0)
        a, b = a[keep], b[keep]
        w = np.full(a.size, 1.0 / d)
        src_parts += [a, b]
        dst_parts += [b, a]
        w_parts += [w, w]
    n_rows = n_items + 1
    if src_parts:
        src = np.concatenate(src_parts)
        dst = np.concatenate(dst_parts)
        weights = np.concatenate(w_parts)
    else:
        src = dst = np.zeros(0, dtype=np.int64)
        weights = np.zeros(0)
    keys, inverse = np.unique(src * n_rows + dst, return_inverse=True)
    summed = np.bincount(inverse, weights=weights, minlength=keys.size)
    return _top_m_rows(keys // n_rows, keys % n_rows, summed, n_rows, top_m)


def _top_m_rows(
    rows: npt.NDArray[np.int64], cols: npt.NDArray[np.int64], scores: npt.NDArray[Any], n_rows: int, top_m: int
) -> CovisitCSR:
    """CSR of (row, col, score) entries: each row's top_m by descending score (ties: smaller col first)."""
    order = np.lexsort((cols, -scores, rows))
    rows, cols, scores = rows[order], cols[order], scores[order]
    starts = np.searchsorted(rows, np.arange(n_rows + 1))
    rank = np.arange(rows.size) - starts[rows]
    keep = rank < top_m
    rows, cols, scores = rows[keep], cols[keep], scores[keep]
    indptr = np.r_[0, np.cumsum(np.bincount(rows, minlength=n_rows))].astype(np.int64)
    return CovisitCSR(indptr, cols.astype(np.int32), scores.astype(np.float32))


def ease_weights(seqs: Sequences, n_items: int, lam: float) -> npt.NDArray[np.float64]:
    """(n + 1, n + 1) EASE weights B (Steck 2019) by item index, fitted on seqs; row and column 0 are 0.

    B = I - P diagMat(1 / diag(P)), P = (X^T X + lam I)^-1 over the binary user x item matrix X, diag(B) = 0:
    the closed form of exporter.baselines.fit_ease. score(user, j) = sum over history items i of B[i, j].
    """
    user_of = seqs.user_of_position()
    keep = seqs.items > 0
    x = sp.csr_matrix((np.ones(int(keep.sum())), (user_of[keep], seqs.items[keep] - 1)), shape=(seqs.n_users, n_items))
    x.sum_duplicates()
    x.data[:] = 1.0  # a repeated (user, item) pair counts once
    gram = np.asarray((x.T @ x).toarray(), dtype=np.float64)
    gram[np.diag_indices_from(gram)] += lam
    p = np.linalg.inv(gram)
    b = np.zeros((n_items + 1, n_items + 1), dtype=np.float64)
    b[1:, 1:] = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    return b


def ease_table(seqs: Sequences, n_items: int, lam: float, top_m: int) -> CovisitCSR:
    """Top-m EASE weights per history item, best first: row i holds the items j with the largest B[i, j] > 0.

    Only positive weights are kept: a candidate missing from a row then reads 0, the prior a negative weight
    would only push further down, and the served table is a tenth of the dense matrix at top_m 200.
    """
    b = ease_weights(seqs, n_items, lam)
    m = min(top_m, n_items)
    top = np.argpartition(-b, m - 1, axis=1)[:, :m] if m > 0 else np.zeros((n_items + 1, 0), dtype=np.int64)
    rows = np.repeat(np.arange(n_items + 1), top.shape[1])
    cols = top.reshape(-1).astype(np.int64)
    vals = b[rows, cols]
    pos = vals > 0
    return _top_m_rows(rows[pos], cols[pos], vals[pos], n_items + 1, top_m)


def item_feature_matrix(
    genre_multi_hot: npt.NDArray[np.float32],
    popularity_counts: npt.NDArray[np.float32],
    recent_counts: npt.NDArray[np.float32],
) -> tuple[npt.NDArray[np.float32], list[str]]:
    """(n + 1, F) side features: genre multi-hot, log popularity, log recent popularity (both scaled to [0, 1]).

    Recent popularity (the last part of the training time span) lets the ranker prefer what is trending
    at export time, which the replay protocol rewards.
    """
    log_pop = np.log1p(popularity_counts)
    log_recent = np.log1p(recent_counts)
    cols = [
        genre_multi_hot.astype(np.float32),
        (log_pop / max(float(log_pop.max()), 1e-6))[:, None],
        (log_recent / max(float(log_recent.max()), 1e-6))[:, None],
    ]
    feats = np.concatenate(cols, axis=1).astype(np.float32)
    feats[0] = 0.0
    names = [f"genre:{i}" for i in range(genre_multi_hot.shape[1])] + ["log_popularity", "log_recent_popularity"]
    return feats, names


def genre_multi_hot(
    vocab: tuple[str, ...], genres: dict[str, tuple[str, ...]], genre_names: tuple[str, ...]
) -> npt.NDArray[np.float32]:
    """(n + 1, G) 0/1 genre flags by item index; row 0 and items without metadata are all zero."""
    col = {g: j for j, g in enumerate(genre_names)}
    out = np.zeros((len(vocab) + 1, len(genre_names)), dtype=np.float32)
    for i, item in enumerate(vocab, start=1):
        for g in genres.get(item, ()):
            if g in col:
                out[i, col[g]] = 1.0
    return out


def recent_counts(seqs: Sequences, n_items: int, fraction: float) -> npt.NDArray[np.float32]:
    """(n + 1,) interaction counts within the last `fraction` of the training time span."""
    if len(seqs.timestamps) == 0:
        return np.zeros(n_items + 1, dtype=np.float32)
    lo, hi = seqs.timestamps.min(), seqs.timestamps.max()
    cut = hi - fraction * (hi - lo)
    return popularity(seqs.items[seqs.timestamps >= cut], n_items)
