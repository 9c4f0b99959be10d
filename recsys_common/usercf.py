"""User-based collaborative filtering, the arithmetic: user vectors, nearest users, and what they propose.

numpy only. The gateway's real-time source (gateway/usercf.py) keeps the recently active users and calls these
functions; the exporter's evaluation (exporter/candidates.py) replays a protocol's events through the same
functions, so the quality it reports is the quality of the algorithm the gateway serves::

    unit = unit_rows(item_emb)                              # (n + 1, D) unit item embeddings
    mine = user_vector(unit, history[-items_per_user:])     # (D,) or None
    near = nearest(vectors @ mine, n_neighbours)             # rows of the nearest users, best first
    items, scores = propose([(sims[r], recent[r]) for r in near], n_items, excluded, n)

A user is the recency-weighted mean of the unit embeddings of their newest distinct items (recent_items); a
neighbour is a user whose vector has a positive cosine with this user's; a proposal is an item a neighbour
interacted with recently, weighted by the neighbour's similarity and the item's recency in their list.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

RECENCY_DECAY = 0.9  # weight of an item relative to the next newer one

I64 = npt.NDArray[np.int64]
F32 = npt.NDArray[np.float32]


def recency_weights(n: int) -> F32:
    """(n,) weights for items oldest first: the newest weighs 1, each older one RECENCY_DECAY times less."""
    return (RECENCY_DECAY ** np.arange(n - 1, -1, -1)).astype(np.float32)


def unit_rows(item_emb: F32) -> F32:
    """(n + 1, D) float32: each item embedding scaled to unit length (the zero padding row stays zero)."""
    norms = np.linalg.norm(item_emb, axis=1, keepdims=True)
    return (item_emb / np.maximum(norms, 1e-12)).astype(np.float32)


def recent_items(items: I64, keep: int) -> I64:
    """The newest `keep` distinct items of a sequence (oldest first), each at its last occurrence.

    What a user's row holds: re-consuming an item moves it to the newest place instead of counting it twice.
    """
    items = np.asarray(items, dtype=np.int64).reshape(-1)
    if items.size == 0:
        return items
    _, first_from_end = np.unique(items[::-1], return_index=True)
    last = np.sort(items.size - 1 - first_from_end)
    return items[last][-keep:]


def user_vector(unit_emb: F32, items: I64) -> F32 | None:
    """Unit vector (D,) of the recency-weighted mean of the items' unit embeddings (items oldest first)."""
    if items.size == 0:
        return None
    v = recency_weights(items.size) @ unit_emb[items]
    norm = float(np.linalg.norm(v))
    return (v / norm).astype(np.float32) if norm > 0 else None


def nearest(sims: F32, n: int) -> I64:
    """Positions of the (at most n) largest similarities, best first; only positive ones are neighbours."""
    if sims.size == 0 or n < 1:
        return np.zeros(0, dtype=np.int64)
    top = np.argpartition(-sims, min(n, sims.size) - 1)[:n] if sims.size > n else np.arange(sims.size)
    top = top[np.argsort(-sims[top], kind="stable")]
    return top[sims[top] > 0].astype(np.int64)


def propose(neighbours: Sequence[tuple[float, I64]], n_items: int, excluded: I64, n: int) -> tuple[I64, F32]:
    """Top-n items (best first) and their scores from (similarity, recent items oldest first) of the neighbours.

    An item scores the sum over the neighbours holding it of similarity * its recency weight in their list;
    excluded items and the padding index 0 are never proposed, nor items that score 0.
    """
    if not neighbours:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    items = np.concatenate([its for _, its in neighbours])
    weights = np.concatenate([sim * recency_weights(its.size) for sim, its in neighbours])
    scores = np.bincount(items, weights=weights, minlength=n_items + 1).astype(np.float32)
    scores[np.asarray(excluded, dtype=np.int64)] = 0
    scores[0] = 0
    candidates = np.flatnonzero(scores > 0)
    chosen = candidates[np.argsort(-scores[candidates], kind="stable")[:n]].astype(np.int64)
    return chosen, scores[chosen]
