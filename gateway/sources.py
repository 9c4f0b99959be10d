"""Candidate sources: small pluggable parts the gateway runs concurrently for each request.

Each source answers one question ("which items, and how strongly?") for a SourceQuery and returns
a SourceResult. fetch is a coroutine on the gateway's event loop: a remote call awaits its answer, a
blocking store read runs in a worker thread, and a local numpy source just computes (it is short);
each respects the timeout it is given. Failures are exceptions; the fan-out in core.py turns them
into a `missing` entry.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from gateway.clients import RetrievalClient, ShardedRetrievalClient
from gateway.store import UserStore
from recsys_common.catalog import Catalog
from recsys_common.features import ItemTables, covisit_candidates, not_in, popular_candidates


@dataclass(frozen=True)
class SourceQuery:
    """What every source may use: the user's recent items and what must not be proposed."""

    recent_ids: Sequence[str]  # newest history_len item ids, oldest first
    history_idx: npt.NDArray[np.int64]  # their dense indices, unknown items dropped
    excluded_ids: Sequence[str]
    excluded_idx: npt.NDArray[np.int64]
    k: int
    bundle_version: str
    catalog: Catalog  # the request's bundle version's catalogue
    user_key: str = ""  # the pseudonymized user key (never the raw id), for sources that know users


@dataclass(frozen=True)
class SourceResult:
    name: str
    item_ids: list[str]
    scores: list[float]
    # Parts of the source that did not answer (e.g. a retrieval shard), with the reason.
    missing: tuple[tuple[str, str], ...] = ()
    # The user's query vector, from a source that computed one (ANN): ranking reuses it.
    query_vector: Sequence[float] = ()


class CandidateSource(Protocol):
    name: str

    async def fetch(self, query: SourceQuery, timeout_s: float) -> SourceResult: ...


def _from_indices(
    name: str, catalog: Catalog, idx: npt.NDArray[np.int64], scores: npt.NDArray[np.float32]
) -> SourceResult:
    ids = catalog.item_ids  # index i is ids[i - 1]
    return SourceResult(name, [ids[i - 1] for i in idx.tolist()], np.asarray(scores, dtype=np.float64).tolist())


class AnnSource:
    """Nearest items to the user's query vector, from the retrieval service (all its shards)."""

    name = "ann"

    def __init__(self, client: RetrievalClient | ShardedRetrievalClient, n: int) -> None:
        self.client = client
        self.n = n

    async def fetch(self, query: SourceQuery, timeout_s: float) -> SourceResult:
        scored = await self.client.search(
            query.recent_ids, max(self.n, query.k), query.excluded_ids, query.bundle_version, timeout_s
        )
        missing = tuple((f"{self.name} {part}", reason) for part, reason in scored.missing)
        return SourceResult(self.name, scored.item_ids, scored.scores, missing, scored.query_vector)


class CovisitSource:
    """Items often consumed next to the user's recent items (recency-weighted), from the bundle."""

    name = "covisit"

    def __init__(self, catalog: Catalog, tables: ItemTables, n: int) -> None:
        self.catalog, self.tables, self.n = catalog, tables, n

    async def fetch(self, query: SourceQuery, timeout_s: float) -> SourceResult:
        idx, scores = covisit_candidates(self.tables, query.history_idx, self.n, query.excluded_idx)
        return _from_indices(self.name, self.catalog, idx, scores)


class PopularSource:
    """The bundle's most popular items: always available, the last resort of every answer."""

    name = "popular"

    def __init__(self, catalog: Catalog, tables: ItemTables, n: int) -> None:
        self.catalog, self.tables, self.n = catalog, tables, n

    async def fetch(self, query: SourceQuery, timeout_s: float) -> SourceResult:
        idx, scores = popular_candidates(self.tables, max(self.n, query.k), query.excluded_idx)
        return _from_indices(self.name, self.catalog, idx, scores)


class ColdStartSource:
    """Popular items in the genres of the user's recent items: useful while a history is short."""

    name = "coldstart"

    def __init__(self, catalog: Catalog, tables: ItemTables, n: int) -> None:
        self.catalog, self.n = catalog, n
        self.popularity = tables.popularity
        # Per genre, its items by descending popularity (ties: smaller index first).
        by_genre: dict[str, list[int]] = {}
        for index, genres in enumerate(catalog.genres, start=1):
            for g in genres:
                by_genre.setdefault(g, []).append(index)
        self.by_genre = {
            g: np.asarray(sorted(items, key=lambda i: (-self.popularity[i], i)), dtype=np.int64)
            for g, items in by_genre.items()
        }

    async def fetch(self, query: SourceQuery, timeout_s: float) -> SourceResult:
        recent = query.history_idx[-10:]
        genres = {g for i in recent.tolist() for g in self.catalog.genres[i - 1]}
        if not genres:
            return SourceResult(self.name, [], [])
        pool = np.unique(np.concatenate([self.by_genre[g][: self.n] for g in genres if g in self.by_genre]))
        pool = pool[not_in(pool, query.excluded_idx)]
        order = np.argsort(-self.popularity[pool], kind="stable")[: self.n]
        return _from_indices(self.name, self.catalog, pool[order], self.popularity[pool[order]])


class TrendingSource:
    """Items trending now: decayed counts of recent events from the user-state store (all replicas share it).

    The list is the same for every user, so it is read at most once per `max_age_s` (and again when a
    request must skip more excluded items than the kept list can spare), not once per request.
    """

    name = "trending"

    def __init__(self, store: UserStore, n: int, max_age_s: float = 1.0) -> None:
        self.store, self.n, self.max_age_s = store, n, max_age_s
        self._rows: list[tuple[str, float]] = []
        self._asked = 0  # how many rows the kept list was read for (fewer came back: that is all there is)
        self._read_at = float("-inf")

    async def _trending(self, want: int) -> list[tuple[str, float]]:
        stale = time.monotonic() - self._read_at > self.max_age_s
        if stale or (want > self._asked and len(self._rows) == self._asked):
            asked = max(want, 2 * self.n)
            read_at = time.monotonic()
            self._rows = await asyncio.to_thread(self.store.trending, asked)
            self._asked, self._read_at = asked, read_at
        return self._rows

    async def fetch(self, query: SourceQuery, timeout_s: float) -> SourceResult:
        excluded = set(query.excluded_ids)
        # Enough that n remain after dropping excluded items and items this bundle cannot rank.
        rows = await self._trending(self.n + len(excluded))
        kept = [(i, s) for i, s in rows if i not in excluded and query.catalog.index_of(i)][: self.n]
        return SourceResult(self.name, [i for i, _ in kept], [s for _, s in kept])
