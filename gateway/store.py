"""The user-state store contract and open_store(), which picks a backend by URL.

Usage::

    store = open_store("sqlite:///var/state/events.db")   # or a directory: <dir>/events.db
    accepted = store.append([Event("u1", "i9", 1700000000, event_id="e-1")])
    history = store.recent("u1", 50)                       # newest 50, oldest first
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class Event:
    user_id: str
    item_id: str
    timestamp: int
    event_id: str = ""
    type: str = ""


class UserStore(Protocol):
    def append(self, events: list[Event]) -> int:
        """Store events durably before returning; return how many were new (a seen event_id is not new)."""
        ...

    def recent(self, user_id: str, n: int) -> list[Event]:
        """The user's newest n events, oldest first (by timestamp, then arrival)."""
        ...

    def close(self) -> None: ...


def open_store(url: str) -> UserStore:
    """sqlite:///PATH (or a bare directory, meaning DIR/events.db) is the embedded default."""
    if url.startswith("sqlite://"):
        path = Path(url.removeprefix("sqlite://"))
    elif "://" not in url:
        path = Path(url) / "events.db"
    else:
        raise ValueError(f"unsupported user-state store URL {url!r}: use sqlite:///PATH or a directory")
    from gateway.store_sqlite import SQLiteStore

    return SQLiteStore(path)
