"""Item metadata for people: look items up by id and find them by title, over one bundle's Catalog.

Search is a case-insensitive match of every word of the query inside the title (so "star wars"
finds "Star Wars (1977)" and "Return of the Jedi (Star Wars VI)"). Titles that start with the
query come first, then the more popular items (the bundle's popularity table), then catalogue order.
An empty query matches everything, so the same call also browses the catalogue or fetches a batch
of ids for display.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from gateway.core import MAX_ID_LEN
from recsys_common.catalog import Catalog
from recsys_common.errors import InvalidRequest, NotFound

MAX_QUERY_LEN = 256
MAX_LIMIT = 100
MAX_IDS = 100
DEFAULT_LIMIT = 20


@dataclass(frozen=True)
class ItemInfo:
    item_id: str
    title: str
    genres: tuple[str, ...]


def _check_id(field_name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidRequest(field_name, "must be a non-empty string")
    if len(value) > MAX_ID_LEN:
        raise InvalidRequest(field_name, f"must be at most {MAX_ID_LEN} characters, got {len(value)}")
    return value


def validate_search(query: str, ids: Sequence[str], limit: int) -> None:
    if not isinstance(query, str) or len(query) > MAX_QUERY_LEN:
        raise InvalidRequest("query", f"must be a string of at most {MAX_QUERY_LEN} characters")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise InvalidRequest("limit", f"must be in 1..{MAX_LIMIT}, got {limit!r}")
    if len(ids) > MAX_IDS:
        raise InvalidRequest("ids", f"must hold at most {MAX_IDS} ids, got {len(ids)}")
    for n, item_id in enumerate(ids):
        _check_id(f"ids[{n}]", item_id)


class ItemIndex:
    """Title search and id lookup over one bundle version's items; built once per version."""

    def __init__(self, version: str, catalog: Catalog, popularity: npt.NDArray[np.float32] | None = None) -> None:
        self.version = version
        self.catalog = catalog
        self._folded = [t.casefold() for t in catalog.titles]
        n = len(catalog)
        # Item indices (1..n), most popular first; ties by catalogue order. Sorted once per version.
        pop = np.zeros(n, dtype=np.float64) if popularity is None else np.asarray(popularity[1 : n + 1], np.float64)
        self._by_popularity: list[int] = (np.argsort(-pop, kind="stable") + 1).tolist()

    def info(self, index: int) -> ItemInfo:
        return ItemInfo(self.catalog.id_of(index), self.catalog.titles[index - 1], self.catalog.genres[index - 1])

    def get(self, item_id: str) -> ItemInfo:
        """One item by id; NotFound when this bundle version does not know it."""
        index = self.catalog.index_of(_check_id("item_id", item_id))
        if not index:
            raise NotFound(f"item_id: bundle {self.version} has no item {item_id!r}")
        return self.info(index)

    def search(self, query: str = "", ids: Sequence[str] = (), limit: int = DEFAULT_LIMIT) -> list[ItemInfo]:
        """Items matching every word of ``query``, at most ``limit``.

        With ``ids``, only those items are considered and they keep the given order (unknown ids and
        repeats are left out): that is how a client fetches the metadata of a list it already has.
        """
        validate_search(query, ids, limit)
        words = query.casefold().split()
        folded = self._folded
        if ids:
            known = dict.fromkeys(int(i) for i in self.catalog.known(list(ids)))
            hits = [i for i in known if all(w in folded[i - 1] for w in words)]
            return [self.info(i) for i in hits[:limit]]
        if not words:
            return [self.info(i) for i in self._by_popularity[:limit]]
        prefix = " ".join(words)
        starts, contains = [], []
        for i in self._by_popularity:
            title = folded[i - 1]
            if all(w in title for w in words):
                (starts if title.startswith(prefix) else contains).append(i)
                if len(starts) >= limit:
                    break
        return [self.info(i) for i in (starts + contains)[:limit]]


class ItemIndexes:
    """The ItemIndex of the bundle version being served, rebuilt when the version changes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: ItemIndex | None = None

    def for_version(self, version: str, catalog: Catalog, popularity: npt.NDArray[np.float32] | None) -> ItemIndex:
        current = self._current
        if current is not None and current.version == version:
            return current
        with self._lock:
            if self._current is None or self._current.version != version:
                self._current = ItemIndex(version, catalog, popularity)
            return self._current
