"""Dense item indices and per-user, time-ordered sequences: the shape every model and table consumes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from exporter.protocols import time_order


def item_vocabulary(item_ids: npt.NDArray[np.str_]) -> tuple[str, ...]:
    """Distinct item ids, numerically sorted when all are integers (ML-100K item "7" gets index 7)."""
    unique = np.unique(item_ids).tolist()
    if all(s.lstrip("-").isdigit() for s in unique):
        unique.sort(key=int)
    return tuple(unique)


def encode_items(item_ids: npt.NDArray[np.str_], vocab: tuple[str, ...]) -> npt.NDArray[np.int64]:
    """Dense indices 1..n for known ids, 0 for ids outside vocab."""
    lookup = {item: i + 1 for i, item in enumerate(vocab)}
    return np.fromiter((lookup.get(i, 0) for i in item_ids.tolist()), dtype=np.int64, count=len(item_ids))


@dataclass(frozen=True)
class Sequences:
    """All users' interactions as CSR rows of item indices, oldest first (file order breaks ties).

    `users[u]` owns `items[indptr[u]:indptr[u + 1]]`; `rows` maps back to dataset rows.
    """

    users: npt.NDArray[np.str_]  # (U,)
    indptr: npt.NDArray[np.int64]  # (U + 1,)
    items: npt.NDArray[np.int64]  # (N,)
    timestamps: npt.NDArray[np.int64]  # (N,)
    rows: npt.NDArray[np.int64]  # (N,)

    @classmethod
    def build(
        cls, user_ids: npt.NDArray, item_idx: npt.NDArray[np.int64], timestamps: npt.NDArray[np.int64]
    ) -> Sequences:
        order = time_order(user_ids, timestamps)
        users_sorted = user_ids[order]
        starts = np.flatnonzero(np.r_[True, users_sorted[1:] != users_sorted[:-1]]) if len(order) else np.zeros(0)
        indptr = np.r_[starts, len(order)].astype(np.int64)
        return cls(users_sorted[starts], indptr, item_idx[order], timestamps[order], order)

    @property
    def n_users(self) -> int:
        return len(self.users)

    def user_of_position(self) -> npt.NDArray[np.int64]:
        """(N,) the user number of every position."""
        return np.repeat(np.arange(self.n_users), np.diff(self.indptr))

    def position_in_user(self) -> npt.NDArray[np.int64]:
        """(N,) 0-based position of each event inside its user's sequence."""
        return np.arange(len(self.items)) - np.repeat(self.indptr[:-1], np.diff(self.indptr))

    def user_seq(self, u: int) -> npt.NDArray[np.int64]:
        return self.items[self.indptr[u] : self.indptr[u + 1]]

    def select(self, keep: npt.NDArray[np.bool_]) -> Sequences:
        """Keep positions where keep is true (order preserved); users left empty are dropped."""
        user_of = self.user_of_position()[keep]
        counts = np.bincount(user_of, minlength=self.n_users)
        nonempty = counts > 0
        indptr = np.r_[0, np.cumsum(counts[nonempty])].astype(np.int64)
        return Sequences(self.users[nonempty], indptr, self.items[keep], self.timestamps[keep], self.rows[keep])


def histories_before(seqs: Sequences, positions: npt.NDArray[np.int64], history_len: int) -> npt.NDArray[np.int64]:
    """(P, history_len) right-aligned, 0-padded histories of the events strictly before each position."""
    user_start = seqs.indptr[:-1][seqs.user_of_position()[positions]]
    offsets = np.arange(-history_len, 0)
    idx = positions[:, None] + offsets[None, :]
    valid = idx >= user_start[:, None]
    return np.where(valid, seqs.items[np.clip(idx, 0, None)], 0).astype(np.int64)


def last_histories(seqs: Sequences, history_len: int) -> npt.NDArray[np.int64]:
    """(U, history_len) each user's last history_len items, right-aligned and 0-padded."""
    ends = seqs.indptr[1:]
    idx = ends[:, None] + np.arange(-history_len, 0)[None, :]
    valid = idx >= seqs.indptr[:-1, None]
    return np.where(valid, seqs.items[np.clip(idx, 0, None)], 0).astype(np.int64)
