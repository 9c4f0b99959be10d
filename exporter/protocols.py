"""The evaluation protocols of ARCHITECTURE.md (`loo`, `replay`) on raw arrays, reusable by benchmarks."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


def time_order(user_ids: npt.NDArray, timestamps: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Row order by (user, timestamp, file position): each user's sequence, oldest first."""
    rows = np.arange(len(timestamps))
    return np.lexsort((rows, timestamps, user_ids)).astype(np.int64)


def loo_split(
    user_ids: npt.NDArray, timestamps: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.int64]]:
    """Leave-last-out: each user's last interaction (file order breaks ties) is the test row.

    Users with a single interaction keep it in train (there is no history to predict from).
    Returns (train_mask (N,), test_rows (n_test,) sorted row indices).
    """
    order = time_order(user_ids, timestamps)
    users_sorted = user_ids[order]
    is_last = np.ones(len(order), dtype=bool)
    is_last[:-1] = users_sorted[1:] != users_sorted[:-1]
    is_first = np.ones(len(order), dtype=bool)
    is_first[1:] = users_sorted[1:] != users_sorted[:-1]
    test_rows = np.sort(order[is_last & ~is_first])
    train_mask = np.ones(len(timestamps), dtype=bool)
    train_mask[test_rows] = False
    return train_mask, test_rows


def replay_split(timestamps: npt.NDArray[np.int64], quantile: float = 0.9) -> npt.NDArray[np.bool_]:
    """Global temporal split: rows at or before the `quantile` timestamp are the training part."""
    if len(timestamps) == 0:
        return np.zeros(0, dtype=bool)
    cut = np.quantile(timestamps, quantile, method="lower")
    return timestamps <= cut


@dataclass(frozen=True)
class ReplayEvent:
    """One test event: the row, and whether it counts (item known at fit time, not yet seen by the user)."""

    row: int
    counted: bool


def replay_events(
    user_ids: npt.NDArray,
    item_ids: npt.NDArray,
    timestamps: npt.NDArray[np.int64],
    train_mask: npt.NDArray[np.bool_],
) -> Iterator[ReplayEvent]:
    """Test events in time order (file order breaks ties), with the counting rule of `replay`.

    An event counts only if its item was known at fit time and is not yet in the user's history; the
    history grows with every test event, counted or not (callers append each yielded row).
    """
    known = set(item_ids[train_mask].tolist())
    seen: dict[object, set[object]] = {}
    for u, i in zip(user_ids[train_mask].tolist(), item_ids[train_mask].tolist(), strict=True):
        seen.setdefault(u, set()).add(i)
    test = np.flatnonzero(~train_mask)
    test = test[np.lexsort((test, timestamps[test]))]
    for row in test.tolist():
        u, i = user_ids[row].item(), item_ids[row].item()
        history = seen.setdefault(u, set())
        yield ReplayEvent(row=row, counted=i in known and i not in history)
        history.add(i)
