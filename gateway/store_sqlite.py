"""The embedded user-state store: SQLite in WAL mode with full fsync, one connection per thread.

An append commits before it returns, with synchronous=FULL, so an acknowledged event survives a
kill -9 of the process (and a power cut, as far as the disk honours fsync). Each append is one
``BEGIN IMMEDIATE`` transaction: the dedupe check, the insert, trending and the trim are atomic
and serialized against every other writer, threads and processes alike.

Tables: ``events`` (the newest N per user), ``dedupe`` (user, event id, when seen: kept apart from
events so trimming never forgets an id), ``users`` (last activity, for the optional TTL),
``trending`` and ``meta`` (its epoch). secure_delete is on and forget() truncates the WAL, so an
erased user's rows do not linger in free pages or old WAL frames.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gateway.store import Event, StoreSettings
from gateway.trending import DROP_BELOW, MAX_ITEMS, TrendingUpdate, decayed
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
CREATE INDEX IF NOT EXISTS events_user_ts ON events(user_id, ts, seq);
CREATE TABLE IF NOT EXISTS dedupe (
    user_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    seen_ms INTEGER NOT NULL,
    PRIMARY KEY (user_id, event_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dedupe_seen ON dedupe(seen_ms);
CREATE TABLE IF NOT EXISTS users (user_id TEXT PRIMARY KEY, last_seen_ms INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS users_seen ON users(last_seen_ms);
CREATE TABLE IF NOT EXISTS trending (item_id TEXT PRIMARY KEY, score REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value REAL NOT NULL) WITHOUT ROWID;
"""

_STAGING = (
    "CREATE TEMP TABLE IF NOT EXISTS staging (user_id TEXT NOT NULL, item_id TEXT NOT NULL, ts INTEGER NOT NULL, "
    "event_id TEXT NOT NULL, type TEXT NOT NULL)"
)

# The foundation's schema deduplicated event ids globally with a unique index on events; ids now
# live per user in `dedupe`, which survives trimming.
_MIGRATE_V1 = """
INSERT OR IGNORE INTO dedupe (user_id, event_id, seen_ms)
    SELECT user_id, event_id, :now FROM events WHERE event_id IS NOT NULL AND event_id != '';
INSERT OR IGNORE INTO users (user_id, last_seen_ms) SELECT DISTINCT user_id, :now FROM events;
DROP INDEX IF EXISTS events_event_id;
"""

_TRIM = """
DELETE FROM events WHERE seq IN (
    SELECT seq FROM (
        SELECT seq, ROW_NUMBER() OVER (PARTITION BY user_id ORDER BY ts DESC, seq DESC) AS rn
        FROM events WHERE user_id IN (SELECT DISTINCT user_id FROM temp.staging JOIN users USING (user_id))
    ) WHERE rn > ?
)
"""

MAINTENANCE_EVERY_S = 60.0


def _now_ms() -> int:
    return int(time.time() * 1000)


class SQLiteStore:
    """The embedded default: no server, survives restarts and crashes; one file, one writer at a time."""

    def __init__(self, path: Path, settings: StoreSettings | None = None) -> None:
        self.path = Path(path)
        self.settings = settings or StoreSettings()
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._last_maintenance = 0.0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = self._conn()
            with self._write(conn):
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'events_event_id'").fetchone():
                    for statement in _MIGRATE_V1.strip().split(";"):
                        if statement.strip():
                            conn.execute(statement, {"now": _now_ms()} if ":now" in statement else {})
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"user-state store {self.path}: {exc}") from exc

    # -- plumbing --------------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            # Deleted rows (trimmed or forgotten) are overwritten, not left in free space.
            conn.execute("PRAGMA secure_delete=ON")
            conn.execute("PRAGMA temp_store=MEMORY")
            conn.execute("PRAGMA cache_size=-65536")  # 64 MiB: bulk imports touch many index pages
            conn.execute(_STAGING)
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    @contextmanager
    def _write(self, conn: sqlite3.Connection) -> Iterator[None]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _error(self, exc: sqlite3.Error) -> StoreError:
        return StoreError(f"user-state store {self.path}: {exc}")

    # -- the contract ------------------------------------------------------------------------------
    def append(self, events: list[Event]) -> int:
        if not events:
            return 0
        # Duplicates inside the batch are dropped here; those seen earlier, in SQL under the lock.
        rows, seen = [], set()
        for e in events:
            if e.event_id:
                if (e.user_id, e.event_id) in seen:
                    continue
                seen.add((e.user_id, e.event_id))
            rows.append((e.user_id, e.item_id, int(e.timestamp), e.event_id, e.type))
        s = self.settings
        try:
            conn = self._conn()
            with self._write(conn):
                now_ms = _now_ms()
                conn.execute("DELETE FROM temp.staging")
                conn.executemany("INSERT INTO temp.staging VALUES (?, ?, ?, ?, ?)", rows)
                conn.execute("DELETE FROM dedupe WHERE seen_ms < ?", (now_ms - s.dedupe_window_s * 1000,))
                # A user past the TTL starts afresh, even before the periodic purge gets to them.
                self._expire_users(conn, now_ms, staged_only=True)
                conn.execute(
                    "DELETE FROM temp.staging WHERE event_id != '' AND EXISTS (SELECT 1 FROM dedupe d "
                    "WHERE d.user_id = staging.user_id AND d.event_id = staging.event_id)"
                )
                (added,) = conn.execute("SELECT count(*) FROM temp.staging").fetchone()
                # Rows a user's own batch already pushes out of the newest N are never written (they
                # still count, dedupe and trend). Insert order (user, ts, arrival) keeps each user's
                # seq in arrival order among equal timestamps, and turns index inserts into appends.
                conn.execute(
                    "INSERT INTO events (user_id, item_id, ts, event_id, type) "
                    "SELECT user_id, item_id, ts, event_id, type FROM (SELECT *, rowid AS arrival, "
                    "ROW_NUMBER() OVER (PARTITION BY user_id ORDER BY ts DESC, rowid DESC) AS rn FROM temp.staging) "
                    "WHERE rn <= ? ORDER BY user_id, ts, arrival",
                    (s.max_events_per_user,),
                )
                if added:
                    conn.execute(
                        # In key order: a bulk insert then appends to B-tree pages instead of splitting them.
                        "INSERT INTO dedupe SELECT user_id, event_id, ? FROM temp.staging WHERE event_id != '' "
                        "ORDER BY user_id, event_id",
                        (now_ms,),
                    )
                    self._feed_trending(conn, conn.execute("SELECT item_id, ts FROM temp.staging").fetchall())
                    # Only users with earlier events can exceed N now (the insert kept <= N of the batch's own).
                    conn.execute(_TRIM, (s.max_events_per_user,))
                    conn.execute(
                        "INSERT INTO users SELECT DISTINCT user_id, ? FROM temp.staging WHERE true "
                        "ON CONFLICT (user_id) DO UPDATE SET last_seen_ms = excluded.last_seen_ms",
                        (now_ms,),
                    )
                conn.execute("DELETE FROM temp.staging")
                if time.monotonic() - self._last_maintenance > MAINTENANCE_EVERY_S:
                    self._last_maintenance = time.monotonic()
                    self._expire_users(conn, now_ms)
            return added
        except sqlite3.Error as exc:
            raise self._error(exc) from exc

    def _feed_trending(self, conn: sqlite3.Connection, items: list[tuple[str, int]]) -> None:
        meta = dict(conn.execute("SELECT key, value FROM meta WHERE key IN ('trend_epoch', 'trend_latest')"))
        update = TrendingUpdate(meta.get("trend_epoch"), meta.get("trend_latest"), self.settings.trending_half_life_s)
        update.add(items)
        if update.rescale is not None:
            conn.execute("UPDATE trending SET score = score * ?", (update.rescale,))
            conn.execute("DELETE FROM trending WHERE score < ?", (DROP_BELOW,))
            (count,) = conn.execute("SELECT count(*) FROM trending").fetchone()
            if count > MAX_ITEMS:
                conn.execute(
                    "DELETE FROM trending WHERE item_id NOT IN "
                    "(SELECT item_id FROM trending ORDER BY score DESC LIMIT ?)",
                    (MAX_ITEMS,),
                )
        conn.executemany(
            "INSERT INTO trending VALUES (?, ?) ON CONFLICT (item_id) DO UPDATE SET score = score + excluded.score",
            update.increments.items(),
        )
        conn.executemany(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)",
            [("trend_epoch", update.epoch), ("trend_latest", update.latest)],
        )

    def _expire_users(self, conn: sqlite3.Connection, now_ms: int, staged_only: bool = False) -> None:
        """Erase users inactive for longer than the TTL: everyone, or only the users of this batch."""
        ttl = self.settings.user_ttl_s
        if ttl is None:
            return
        cutoff = (now_ms - ttl * 1000,)
        stale = "SELECT user_id FROM users WHERE last_seen_ms < ?"
        if staged_only:
            stale += " AND user_id IN (SELECT user_id FROM temp.staging)"
        conn.execute(f"DELETE FROM events WHERE user_id IN ({stale})", cutoff)
        conn.execute(f"DELETE FROM dedupe WHERE user_id IN ({stale})", cutoff)
        conn.execute(f"DELETE FROM users WHERE user_id IN ({stale})", cutoff)

    def expire_inactive(self) -> None:
        """Erase users inactive for longer than user_ttl_s now (append also does it once a minute)."""
        try:
            conn = self._conn()
            with self._write(conn):
                self._expire_users(conn, _now_ms())
        except sqlite3.Error as exc:
            raise self._error(exc) from exc

    def recent(self, user_id: str, n: int) -> list[Event]:
        if n <= 0:  # LIMIT -1 would mean "all" to SQLite
            return []
        try:
            conn = self._conn()
            ttl = self.settings.user_ttl_s
            if ttl is not None:
                row = conn.execute("SELECT last_seen_ms FROM users WHERE user_id = ?", (user_id,)).fetchone()
                if row is None or row[0] < _now_ms() - ttl * 1000:
                    return []
            rows = conn.execute(
                "SELECT user_id, item_id, ts, event_id, type FROM events WHERE user_id = ? "
                "ORDER BY ts DESC, seq DESC LIMIT ?",
                (user_id, n),
            ).fetchall()
        except sqlite3.Error as exc:
            raise self._error(exc) from exc
        return [Event(u, i, t, e or "", ty) for u, i, t, e, ty in reversed(rows)]

    def version(self, user_id: str) -> str:
        """The highest seq among the user's stored events, "0" for none (or past the TTL).

        seq is AUTOINCREMENT, so it is never reused, also after forget() or a TTL purge. Every stored
        event of the user raises it; only an event that trimming drops at once (older than the newest
        N) leaves it, and the events that recent() returns, unchanged.
        """
        try:
            row = self._conn().execute(
                "SELECT (SELECT max(seq) FROM events WHERE user_id = ?), "
                "(SELECT last_seen_ms FROM users WHERE user_id = ?)",
                (user_id, user_id),
            ).fetchone()
        except sqlite3.Error as exc:
            raise self._error(exc) from exc
        seq, last_seen_ms = row
        ttl = self.settings.user_ttl_s
        if seq is None or (ttl is not None and (last_seen_ms is None or last_seen_ms < _now_ms() - ttl * 1000)):
            return "0"
        return str(seq)

    def forget(self, user_id: str) -> int:
        try:
            conn = self._conn()
            with self._write(conn):
                erased = conn.execute("DELETE FROM events WHERE user_id = ?", (user_id,)).rowcount
                conn.execute("DELETE FROM dedupe WHERE user_id = ?", (user_id,))
                conn.execute("DELETE FROM users WHERE user_id = ?", (user_id,))
            # Old WAL frames still hold the rows as they were: copy the zeroed pages back and truncate.
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            return erased
        except sqlite3.Error as exc:
            raise self._error(exc) from exc

    def trending(self, n: int, now: int | None = None) -> list[tuple[str, float]]:
        if n <= 0:
            return []
        try:
            conn = self._conn()
            meta = dict(conn.execute("SELECT key, value FROM meta WHERE key IN ('trend_epoch', 'trend_latest')"))
            rows = conn.execute("SELECT item_id, score FROM trending ORDER BY score DESC, item_id DESC LIMIT ?", (n,))
            rows = rows.fetchall()
        except sqlite3.Error as exc:
            raise self._error(exc) from exc
        at = now if now is not None else meta.get("trend_latest", 0.0)
        return decayed(rows, meta.get("trend_epoch"), at, self.settings.trending_half_life_s)

    def close(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()
        self._local = threading.local()
