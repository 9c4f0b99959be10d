"""The user-state store contract and open_store(), which picks a backend by URL.

Usage::

    store = open_store("sqlite:///var/state/events.db")   # or a directory: <dir>/events.db
    store = open_store("redis://127.0.0.1:6379/0")         # several gateway replicas share it
    accepted = store.append([Event("u1", "i9", 1700000000, event_id="e-1")])
    history = store.recent("u1", 50)                       # newest 50, oldest first
    store.version("u1")                                    # changes with every event stored for u1
    store.forget("u1")                                     # every trace of u1, dedupe keys included
    store.trending(20)                                     # [(item_id, decayed count), ...] best first

The store never sees raw user ids: callers pass keys made by gateway.privacy.Pseudonymizer
(user_id and event_id of an Event are such keys). Both backends pass tests/test_store.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

DEFAULT_MAX_EVENTS_PER_USER = 200
DEFAULT_DEDUPE_WINDOW_S = 7 * 86_400
DEFAULT_TRENDING_HALF_LIFE_S = 3_600


@dataclass(frozen=True)
class Event:
    user_id: str
    item_id: str
    timestamp: int
    event_id: str = ""
    type: str = ""


@dataclass(frozen=True)
class StoreSettings:
    """What every backend honours; open_store() keyword arguments, validated here."""

    max_events_per_user: int = DEFAULT_MAX_EVENTS_PER_USER
    dedupe_window_s: int = DEFAULT_DEDUPE_WINDOW_S
    user_ttl_s: int | None = None
    trending_half_life_s: int = DEFAULT_TRENDING_HALF_LIFE_S

    def __post_init__(self) -> None:
        for name in ("max_events_per_user", "dedupe_window_s", "trending_half_life_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"store setting {name} must be > 0, got {getattr(self, name)!r}")
        if self.user_ttl_s is not None and self.user_ttl_s <= 0:
            raise ValueError(f"store setting user_ttl_s must be > 0 or None, got {self.user_ttl_s!r}")


class UserStore(Protocol):
    def append(self, events: list[Event]) -> int:
        """Store events durably before returning; return how many were new.

        An event_id already seen for that user within the dedupe window is not stored or counted
        again (checked and appended atomically, also against concurrent writers). New events feed
        trending; each user keeps only the newest max_events_per_user. Large batches are the bulk
        import path (one transaction / pipelined scripts).
        """
        ...

    def recent(self, user_id: str, n: int) -> list[Event]:
        """The user's newest n events, oldest first (by timestamp, then arrival)."""
        ...

    def version(self, user_id: str) -> str:
        """A cheap token that changes whenever an event is stored for the user ("0": nothing stored).

        Never repeats for a user, also after forget() or a TTL expiry, and is read from the store, so
        every replica sharing it agrees: the answer cache keys on it (gateway/cache.py).
        """
        ...

    def forget(self, user_id: str) -> int:
        """Erase everything stored for the user, dedupe keys included; return the events erased."""
        ...

    def trending(self, n: int, now: int | None = None) -> list[tuple[str, float]]:
        """The n items with the highest decayed event counts at `now`, best first.

        Decay is by event timestamp with the configured half-life; `now` defaults to the newest
        event timestamp the store has seen (so replayed history trends as it did at the time).
        """
        ...

    def close(self) -> None: ...


def open_store(
    url: str,
    *,
    max_events_per_user: int = DEFAULT_MAX_EVENTS_PER_USER,
    dedupe_window_s: int = DEFAULT_DEDUPE_WINDOW_S,
    user_ttl_s: int | None = None,
    trending_half_life_s: int = DEFAULT_TRENDING_HALF_LIFE_S,
) -> UserStore:
    """sqlite:///PATH (or a bare directory, meaning DIR/events.db) is the embedded default;
    redis://host:port/db (rediss:// for TLS) is the shared one.
    """
    settings = StoreSettings(max_events_per_user, dedupe_window_s, user_ttl_s, trending_half_life_s)
    if url.startswith(("redis://", "rediss://")):
        from gateway.store_redis import RedisStore

        return RedisStore(url, settings)
    if url.startswith("sqlite://"):
        path = Path(url.removeprefix("sqlite://"))
    elif "://" not in url:
        path = Path(url) / "events.db"
    else:
        raise ValueError(
            f"unsupported user-state store URL {url!r}: use sqlite:///PATH, a directory, or redis://host:port/db"
        )
    from gateway.store_sqlite import SQLiteStore

    return SQLiteStore(path, settings)
