"""AnswerCache: a bounded LRU of complete answers, keyed by everything that determines them.

Usage (what gateway/core.py does)::

    cache = AnswerCache(max_entries=10_000, ttl_s=30.0)
    key = AnswerKey.of(req, user_key, store.version(user_key), view.version)
    answer = cache.get(key, view)          # None: compute it
    ...
    cache.put(key, view, answer)           # only complete answers, only for the live bundle view

Invalidation is by version, never by broadcast, so it holds across gateway replicas sharing a store:

- the user's store version (gateway.store.UserStore.version) changes with every event stored for
  that user, on whichever replica it arrived, and after forget() or a TTL expiry, so the next
  request after an event builds a new key and computes afresh;
- entries belong to one bundle view (the object, not just its version string): the first put for a
  newly swapped-in view empties the cache, and a lookup with any other view misses. A rollback to an
  earlier version is a new view too, so nothing computed before a swap is ever served after it;
- trending and user-based CF move with *other* users' events, which no per-user key can see; ttl_s
  bounds how stale those parts of a cached answer may be.

The request's budget (timeout_ms, the gRPC deadline) is not in the key: only complete answers are
stored, and a complete answer does not depend on how long it was allowed to take.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from gateway.metrics import ANSWER_CACHE_ENTRIES, ANSWER_CACHE_EVICTIONS, ANSWER_CACHE_LOOKUPS

V = TypeVar("V")


class _Request(Protocol):
    @property
    def k(self) -> int: ...
    @property
    def exclude_seen(self) -> bool: ...
    @property
    def exclude_item_ids(self) -> Sequence[str]: ...
    @property
    def max_per_genre(self) -> int | None: ...
    @property
    def debug(self) -> bool: ...


@dataclass(frozen=True)
class AnswerKey:
    user_key: str  # the pseudonymized user key, never the raw id
    user_version: str  # UserStore.version(): changes with every event stored for the user
    bundle_version: str
    k: int
    exclude_seen: bool
    exclude_item_ids: tuple[str, ...]  # sorted and unique: their order does not change the answer
    max_per_genre: int | None
    debug: bool

    @classmethod
    def of(cls, req: _Request, user_key: str, user_version: str, bundle_version: str) -> AnswerKey:
        return cls(
            user_key,
            user_version,
            bundle_version,
            req.k,
            req.exclude_seen,
            tuple(sorted(set(req.exclude_item_ids))),
            req.max_per_genre,
            req.debug,
        )


class AnswerCache(Generic[V]):
    """Complete answers of the live bundle view, at most max_entries, each for at most ttl_s seconds.

    Thread-safe; every operation is O(1) under one lock except forget_user and a swap's clear.
    """

    def __init__(self, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1:
            raise ValueError(f"answer cache max_entries must be >= 1, got {max_entries}")
        if ttl_s <= 0:
            raise ValueError(f"answer cache ttl_s must be > 0, got {ttl_s}")
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[AnswerKey, tuple[float, V]] = OrderedDict()  # key -> (expires at, answer)
        # The bundle view the entries were computed with; weak, so a swapped-out bundle is freed.
        self._view: weakref.ref[object] | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: AnswerKey, view: object) -> V | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and (self._view is None or self._view() is not view):
                entry = None  # computed with another bundle view: never served across a swap
            if entry is not None and entry[0] <= self._clock():
                del self._entries[key]
                ANSWER_CACHE_EVICTIONS.labels("expired").inc()
                entry = None
            if entry is None:
                ANSWER_CACHE_LOOKUPS.labels("miss").inc()
                return None
            self._entries.move_to_end(key)
        ANSWER_CACHE_LOOKUPS.labels("hit").inc()
        return entry[1]

    def put(self, key: AnswerKey, view: object, answer: V) -> None:
        """Store an answer computed with `view`, which the caller has checked is the live one."""
        with self._lock:
            if self._view is None or self._view() is not view:
                if self._entries:
                    ANSWER_CACHE_EVICTIONS.labels("bundle_swap").inc(len(self._entries))
                self._entries.clear()
                self._view = weakref.ref(view)
            self._entries[key] = (self._clock() + self.ttl_s, answer)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
                ANSWER_CACHE_EVICTIONS.labels("capacity").inc()
            ANSWER_CACHE_ENTRIES.set(len(self._entries))

    def forget_user(self, user_key: str) -> int:
        """Drop every answer for the user (on an erasure request); returns how many were dropped."""
        with self._lock:
            keys = [k for k in self._entries if k.user_key == user_key]
            for k in keys:
                del self._entries[k]
            ANSWER_CACHE_ENTRIES.set(len(self._entries))
        return len(keys)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            ANSWER_CACHE_ENTRIES.set(0)
