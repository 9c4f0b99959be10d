"""User-based collaborative filtering in real time: users whose recent items resemble this user's now,
and what they interacted with recently.

ActiveUsers keeps, in this gateway process, the recently active users: for each, a vector in the
bundle's item-embedding space (the recency-weighted mean of the unit embeddings of their newest
items) and those items. It is updated from the event stream (every Track call) and from every
history the gateway reads to answer a request, so it follows users as they act. UserCFSource finds
the user's nearest neighbours by cosine similarity (exact, numpy: at most max_users rows) and
proposes the neighbours' recent items the user has not seen, weighted by similarity and recency.

Bounded: at most max_users users; the least recently active is evicted first, and a user idle for
max_idle_s is no longer anyone's neighbour. Keys are pseudonymized user keys, never raw ids.

Replicas: each process indexes the users it sees (their events and their requests). Behind a load
balancer a replica sees a share of the traffic, so its neighbourhoods are drawn from that share; a
user's *own* vector is always current, because it is rebuilt from the shared store's history on each
request. An erased user leaves the index of the replica that handled the erasure at once, and the
others' within max_idle_s.

The arithmetic (user vectors, nearest users, proposals) is recsys_common/usercf.py: the exporter's evaluation
replays each protocol's events through the same functions to report what this source adds.

Vectors are tied to one bundle version (item indices and embeddings change with it): a row is used
only for requests of the version it was computed with, and is recomputed when its user is next seen.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

from gateway.sources import SourceQuery, SourceResult
from recsys_common.catalog import Catalog
from recsys_common.features import ItemTables
from recsys_common.usercf import RECENCY_DECAY, nearest, propose, recency_weights, recent_items, unit_rows, user_vector

__all__ = ["RECENCY_DECAY", "ActiveUsers", "ItemSpace", "UserCFSource", "recency_weights", "user_vector"]


class ItemSpace(Protocol):
    """What the index needs of a bundle view (gateway.core.BundleView is one)."""

    @property
    def version(self) -> str: ...
    @property
    def catalog(self) -> Catalog: ...
    @property
    def tables(self) -> ItemTables: ...


class ActiveUsers:
    """The recently active users' vectors and recent items, bounded, in LRU order of activity."""

    def __init__(
        self, max_users: int, items_per_user: int, max_idle_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_users < 1 or items_per_user < 1 or max_idle_s <= 0:
            raise ValueError(
                f"usercf needs max_users >= 1, items_per_user >= 1, max_idle_s > 0; got "
                f"{max_users}, {items_per_user}, {max_idle_s}"
            )
        self.max_users, self.items_per_user, self.max_idle_s = max_users, items_per_user, max_idle_s
        self._clock = clock
        self._lock = threading.Lock()
        self._active: OrderedDict[str, float] = OrderedDict()  # user key -> last seen, least recent first
        self._slot: dict[str, int] = {}
        self._free = list(range(max_users - 1, -1, -1))
        self._vectors: npt.NDArray[np.float32] | None = None  # (max_users, D), allocated on first use
        self._tag = np.full(max_users, -1, dtype=np.int32)  # bundle version code of each row; -1: empty
        self._items: list[npt.NDArray[np.int64]] = [np.empty(0, dtype=np.int64)] * max_users  # oldest first
        self._codes: dict[str, int] = {}
        # Unit item embeddings per bundle version (the newest two: a swap serves both for a moment).
        self._unit: OrderedDict[str, npt.NDArray[np.float32]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._active)

    def _code(self, version: str) -> int:
        if version not in self._codes:
            self._codes[version] = len(self._codes)
        return self._codes[version]

    def _unit_emb(self, space: ItemSpace) -> npt.NDArray[np.float32]:
        unit = self._unit.get(space.version)
        if unit is None:
            unit = unit_rows(space.tables.item_emb)
            self._unit[space.version] = unit
            while len(self._unit) > 2:
                self._unit.popitem(last=False)
        return unit

    def _drop(self, user_key: str) -> None:
        self._active.pop(user_key, None)
        slot = self._slot.pop(user_key, None)
        if slot is not None:
            self._tag[slot] = -1
            self._items[slot] = np.empty(0, dtype=np.int64)
            self._free.append(slot)

    def _expire(self, now: float) -> None:
        while self._active:
            user_key, seen = next(iter(self._active.items()))
            if now - seen <= self.max_idle_s:
                break
            self._drop(user_key)

    def observe(self, user_key: str, item_ids: Sequence[str], space: ItemSpace) -> None:
        """Set the user's recent items (oldest first; only the newest items_per_user are kept)."""
        items = recent_items(space.catalog.known(item_ids), self.items_per_user)
        with self._lock:
            unit = self._unit_emb(space)
            vec = user_vector(unit, items)
            if vec is None:
                return
            now = self._clock()
            self._expire(now)
            if user_key not in self._slot:
                if not self._free:
                    self._drop(next(iter(self._active)))
                self._slot[user_key] = self._free.pop()
            if self._vectors is None or self._vectors.shape[1] != vec.size:
                self._vectors = np.zeros((self.max_users, vec.size), dtype=np.float32)
                self._tag[:] = -1
            slot = self._slot[user_key]
            self._vectors[slot] = vec
            self._tag[slot] = self._code(space.version)
            self._items[slot] = items
            self._active[user_key] = now
            self._active.move_to_end(user_key)

    def append(self, user_key: str, item_ids: Sequence[str], space: ItemSpace) -> None:
        """Add newly tracked items (oldest first) after the user's known recent items."""
        with self._lock:
            slot = self._slot.get(user_key)
            same_bundle = slot is not None and self._tag[slot] == self._codes.get(space.version, -2)
            known = [space.catalog.id_of(int(i)) for i in self._items[slot]] if same_bundle and slot is not None else []
        self.observe(user_key, [*known, *item_ids], space)

    def forget(self, user_key: str) -> None:
        with self._lock:
            self._drop(user_key)

    def neighbours(
        self, user_key: str, history: npt.NDArray[np.int64], space: ItemSpace, n: int
    ) -> list[tuple[float, npt.NDArray[np.int64]]]:
        """Up to n (cosine similarity > 0, their recent items) of the users nearest to this history."""
        history = history[-self.items_per_user :]
        with self._lock:
            vec = user_vector(self._unit_emb(space), history)
            code = self._codes.get(space.version)
            if vec is None or code is None or self._vectors is None or self._vectors.shape[1] != vec.size:
                return []
            self._expire(self._clock())
            rows = np.flatnonzero(self._tag == code)
            own = self._slot.get(user_key)
            if own is not None:
                rows = rows[rows != own]
            if rows.size == 0:
                return []
            sims = self._vectors[rows] @ vec
            return [(float(sims[t]), self._items[rows[t]]) for t in nearest(sims, n)]


class UserCFSource:
    """Items the nearest recently active users interacted with recently (see ActiveUsers)."""

    name = "usercf"

    def __init__(self, users: ActiveUsers, space_of: Callable[[str], ItemSpace], n: int, n_neighbours: int) -> None:
        self.users, self.space_of, self.n, self.n_neighbours = users, space_of, n, n_neighbours

    async def fetch(self, query: SourceQuery, timeout_s: float) -> SourceResult:
        space = self.space_of(query.bundle_version)
        found = self.users.neighbours(query.user_key, query.history_idx, space, self.n_neighbours)
        chosen, scores = propose(found, space.tables.n_items, query.excluded_idx, self.n)
        return SourceResult(self.name, [space.catalog.id_of(int(i)) for i in chosen], scores.tolist())
