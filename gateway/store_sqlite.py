"""The embedded user-state store: SQLite in WAL mode with full fsync, one connection per thread.

An append commits before it returns, with synchronous=FULL, so an acknowledged event survives
a kill -9 of the process (and a power cut, as far as the disk honours fsync).
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from gateway.store import Event
from recsys_common.errors import StoreError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
    ts INTEGER NOT NULL,
    event_id TEXT,
    type TEXT NOT NULL DEFAULT ''
);
CREATE UNIQUE INDEX IF NOT EXISTS events_event_id ON events(event_id) WHERE event_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_user_ts ON events(user_id, ts, seq);
"""


class SQLiteStore:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._conn() as conn:
            conn.executescript(_SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=True)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            self._local.conn = conn
        return conn

    def append(self, events: list[Event]) -> int:
        rows = [(e.user_id, e.item_id, e.timestamp, e.event_id or None, e.type) for e in events]
        try:
            conn = self._conn()
            before = conn.total_changes
            conn.execute("BEGIN IMMEDIATE")
            try:
                # The unique index on event_id makes the check and the insert one atomic step.
                conn.executemany(
                    "INSERT OR IGNORE INTO events (user_id, item_id, ts, event_id, type) VALUES (?, ?, ?, ?, ?)", rows
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return conn.total_changes - before
        except sqlite3.Error as exc:
            raise StoreError(f"user-state store {self.path}: {exc}") from exc

    def recent(self, user_id: str, n: int) -> list[Event]:
        try:
            rows = (
                self._conn()
                .execute(
                    "SELECT user_id, item_id, ts, event_id, type FROM events WHERE user_id = ? "
                    "ORDER BY ts DESC, seq DESC LIMIT ?",
                    (user_id, n),
                )
                .fetchall()
            )
        except sqlite3.Error as exc:
            raise StoreError(f"user-state store {self.path}: {exc}") from exc
        return [Event(u, i, t, e or "", ty) for u, i, t, e, ty in reversed(rows)]

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
