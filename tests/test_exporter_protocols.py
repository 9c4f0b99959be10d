"""The loo and replay protocols on a hand-made table."""

from __future__ import annotations

import numpy as np

from exporter.protocols import loo_split, replay_events, replay_split

#               row: 0    1    2    3    4    5    6    7
USERS = np.array(["a", "b", "a", "a", "c", "b", "a", "b"])
ITEMS = np.array(["x", "y", "y", "z", "x", "x", "w", "q"])
STAMPS = np.array([10, 11, 12, 30, 5, 40, 30, 50], dtype=np.int64)


def test_loo_holds_out_each_users_last_event_ties_by_file_order() -> None:
    train, test = loo_split(USERS, STAMPS)
    # a: rows 3 and 6 share t=30; the later row in file order (6) is last. b: row 7. c: single event stays.
    assert test.tolist() == [6, 7]
    assert train.tolist() == [True, True, True, True, True, True, False, False]


def test_replay_split_is_global_time_quantile() -> None:
    train = replay_split(STAMPS, quantile=0.75)
    cut = np.quantile(STAMPS, 0.75, method="lower")
    assert train.tolist() == (cut >= STAMPS).tolist()
    assert not train[7] and train[4]


def test_replay_counts_only_known_unseen_items_and_histories_grow() -> None:
    users = np.array(["a", "a", "b", "a", "a", "b", "b"])
    items = np.array(["x", "y", "x", "new", "x", "y", "new"])
    stamps = np.array([1, 2, 3, 10, 11, 12, 13], dtype=np.int64)
    train = stamps <= 3
    events = list(replay_events(users, items, stamps, train))
    assert [e.row for e in events] == [3, 4, 5, 6]
    # row 3: item unknown at fit time; row 4: a already saw x; row 5: b has not seen y -> counted;
    # row 6: "new" is still unknown at fit time even though a saw it during the replay.
    assert [e.counted for e in events] == [False, False, True, False]


def test_replay_orders_test_events_by_time_then_file_order() -> None:
    users = np.array(["a", "b", "c", "d"])
    items = np.array(["x", "x", "x", "x"])
    stamps = np.array([1, 9, 5, 9], dtype=np.int64)
    events = list(replay_events(users, items, stamps, stamps <= 1))
    assert [e.row for e in events] == [2, 1, 3]
