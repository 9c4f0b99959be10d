"""The user-state store contract: one suite, run against every backend (embedded SQLite, real Redis)."""

from __future__ import annotations

import math
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from gateway.store import Event, UserStore, open_store
from gateway.store_redis import user_keys
from recsys_common.errors import StoreError
from tests.redis_server import RedisServer

BACKENDS = ["sqlite", "redis"]
ROOT = Path(__file__).resolve().parent.parent

Factory = Callable[..., UserStore]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if backend == "sqlite":
        return f"sqlite://{tmp_path}/events.db"
    server: RedisServer = request.getfixturevalue("redis_server")
    with redis.Redis.from_url(server.url) as client:
        client.flushall()
    return server.url


@pytest.fixture
def make_store(store_url: str) -> Iterator[Factory]:
    opened: list[UserStore] = []

    def make(**settings: Any) -> UserStore:
        opened.append(open_store(store_url, **settings))
        return opened[-1]

    yield make
    for s in opened:
        s.close()


@pytest.fixture
def store(make_store: Factory) -> UserStore:
    return make_store()


def dump_everything(store_url: str) -> bytes:
    """Every byte the backend holds: all rows of all SQLite tables plus the raw files, or every Redis key and value."""
    if store_url.startswith("sqlite://"):
        path = Path(store_url.removeprefix("sqlite://"))
        out = []
        with sqlite3.connect(path) as conn:
            tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            assert {"events", "dedupe", "users", "trending", "meta"} <= set(tables)
            for table in tables:
                out += [repr(row).encode() for row in conn.execute(f"SELECT * FROM {table}")]  # noqa: S608
        conn.close()
        out += [p.read_bytes() for p in path.parent.glob(path.name + "*")]
        return b"\n".join(out)
    out = []
    with redis.Redis.from_url(store_url) as client:
        for key in client.scan_iter(count=1000):
            out.append(key)
            kind = client.type(key)
            if kind == b"zset":
                out += [m + repr(s).encode() for m, s in client.zrange(key, 0, -1, withscores=True)]
            elif kind == b"hash":
                out += [k + v for k, v in client.hgetall(key).items()]
            elif kind == b"string":
                out.append(client.get(key) or b"")
            else:
                raise AssertionError(f"unexpected key type {kind!r} for {key!r}")
    return b"\n".join(out)


def items(events: list[Event]) -> list[str]:
    return [e.item_id for e in events]


# --- history -------------------------------------------------------------------------------------


def test_recent_returns_newest_n_oldest_first(store: UserStore) -> None:
    assert store.append([Event("u", f"i{t}", t) for t in (5, 1, 3, 2, 4)]) == 5
    assert items(store.recent("u", 3)) == ["i3", "i4", "i5"]
    assert items(store.recent("u", 100)) == ["i1", "i2", "i3", "i4", "i5"]
    assert store.recent("someone-else", 10) == []


def test_events_round_trip_every_field(store: UserStore) -> None:
    odd = Event("u", 'item "with" \\ quotes|and\x1fseparators ü', 2**53 - 1, "e|1", "click")
    store.append([odd, Event("u", "plain", 3)])
    assert store.recent("u", 10) == [Event("u", "plain", 3), odd]


def test_equal_timestamps_keep_arrival_order(store: UserStore) -> None:
    store.append([Event("u", "a", 7), Event("u", "b", 7)])
    store.append([Event("u", "c", 7)])
    assert items(store.recent("u", 10)) == ["a", "b", "c"]


def test_history_is_bounded_to_the_newest_n(make_store: Factory) -> None:
    store = make_store(max_events_per_user=5)
    store.append([Event("u", f"i{t}", t) for t in range(12)])
    store.append([Event("u", "old", -1)])  # older than everything kept: trimmed at once
    store.append([Event("v", "x", 1)])
    assert items(store.recent("u", 100)) == ["i7", "i8", "i9", "i10", "i11"]
    assert items(store.recent("v", 100)) == ["x"]


# --- idempotency ---------------------------------------------------------------------------------


def test_event_ids_are_counted_once_per_user(store: UserStore) -> None:
    assert store.append([Event("u", "a", 1, "e1"), Event("u", "b", 2, "e2")]) == 2
    assert store.append([Event("u", "a", 1, "e1"), Event("u", "c", 3, "e3")]) == 1
    assert store.append([Event("u", "d", 4, "e4"), Event("u", "d", 4, "e4")]) == 1
    assert items(store.recent("u", 10)) == ["a", "b", "c", "d"]
    # Event ids are scoped to the user (keys differ per user once pseudonymized).
    assert store.append([Event("w", "a", 1, "e1")]) == 1


def test_dedupe_keys_outlive_trimmed_events(make_store: Factory) -> None:
    store = make_store(max_events_per_user=3)
    batch = [Event("u", f"i{t}", t, f"e{t}") for t in range(10)]
    assert store.append(batch) == 10
    assert store.append(batch) == 0
    assert store.append(batch[:2]) == 0, "ids of trimmed events must still be known"
    assert items(store.recent("u", 10)) == ["i7", "i8", "i9"]


def test_dedupe_window_expires(make_store: Factory) -> None:
    store = make_store(dedupe_window_s=1)
    assert store.append([Event("u", "a", 1, "e1")]) == 1
    assert store.append([Event("u", "a", 1, "e1")]) == 0
    time.sleep(1.1)
    assert store.append([Event("u", "a", 1, "e1")]) == 1, "outside the window a resend is a new event"


def test_concurrent_resends_from_threads_count_once(store: UserStore) -> None:
    counts: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def send(n: int) -> None:
        start.wait()
        batch = [Event(f"u{j % 3}", f"i{j}", j, f"e{j}") for j in range(60)]
        got = store.append(batch[n:] + batch[:n])
        with lock:
            counts.append(got)

    threads = [threading.Thread(target=send, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(counts) == 60
    assert sum(len(store.recent(f"u{j}", 1000)) for j in range(3)) == 60


def test_concurrent_resends_from_processes_count_once(store: UserStore, store_url: str) -> None:
    code = (
        "import sys\n"
        "from gateway.store import Event, open_store\n"
        "s = open_store(sys.argv[1])\n"
        "sys.stdin.readline()\n"  # start together
        "print(s.append([Event('u' + str(j % 4), 'i' + str(j), j, 'e' + str(j)) for j in range(200)]))\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, store_url], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, cwd=ROOT)
        for _ in range(4)
    ]  # fmt: skip
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum(int(o) for o in outs) == 200
    assert sum(len(store.recent(f"u{j}", 1000)) for j in range(4)) == 200


# --- bounded state in time -----------------------------------------------------------------------


def test_inactive_users_expire_after_the_ttl(make_store: Factory) -> None:
    store = make_store(user_ttl_s=1)
    store.append([Event("u", "a", 1, "e1")])
    assert items(store.recent("u", 10)) == ["a"]
    time.sleep(1.2)
    assert store.recent("u", 10) == []
    assert store.append([Event("u", "b", 2, "e1")]) == 1  # its dedupe keys expired with it
    assert items(store.recent("u", 10)) == ["b"]


# --- forget ---------------------------------------------------------------------------------------


def test_forget_leaves_nothing_of_the_user(make_store: Factory, store_url: str) -> None:
    store = make_store(max_events_per_user=4)
    victim = "f" * 8 + "victim-key" + "0" * 8
    others = ["other-a", "other-b"]
    for n, user in enumerate([victim, *others]):
        store.append([Event(user, f"i{t}", t, f"{user}-e{t}", "click") for t in range(n, n + 6)])
    before = {u: store.recent(u, 10) for u in others}
    assert victim.encode() in dump_everything(store_url)

    assert store.forget(victim) == 4
    everything = dump_everything(store_url)
    assert victim.encode() not in everything, "a key, row, dedupe entry or file page still holds the user"
    assert b"victim-key" not in everything
    assert store.recent(victim, 10) == []
    assert store.forget(victim) == 0
    assert {u: store.recent(u, 10) for u in others} == before
    assert store.append([Event("other-a", "i1", 1, "other-a-e1")]) == 0, "other users' dedupe keys are intact"
    # The victim's old event ids are forgotten too: sent again, they are new events.
    assert store.append([Event(victim, "i0", 0, f"{victim}-e0")]) == 1


# --- trending -------------------------------------------------------------------------------------


def close(got: list[tuple[str, float]], want: list[tuple[str, float]]) -> bool:
    return [i for i, _ in got] == [i for i, _ in want] and all(
        math.isclose(g, w, rel_tol=1e-9) for (_, g), (_, w) in zip(got, want, strict=True)
    )


def test_trending_orders_items_by_decayed_count(make_store: Factory) -> None:
    store = make_store(trending_half_life_s=100)
    assert store.trending(5) == []
    store.append([Event(f"u{n}", "a", 1000) for n in range(3)] + [Event("u9", "c", 1000)])
    assert close(store.trending(5), [("a", 3.0), ("c", 1.0)])
    assert close(store.trending(5, now=1100), [("a", 1.5), ("c", 0.5)])
    store.append([Event("u1", "b", 1200), Event("u2", "b", 1200)])
    # now defaults to the newest event time (1200): a decayed by two half-lives.
    assert close(store.trending(5), [("b", 2.0), ("a", 0.75), ("c", 0.25)])
    assert close(store.trending(1), [("b", 2.0)])


def test_trending_counts_only_new_events(make_store: Factory) -> None:
    store = make_store(trending_half_life_s=100)
    batch = [Event("u", "a", 1000, "e1"), Event("u", "b", 1000, "e2")]
    store.append(batch)
    store.append(batch)
    store.append([Event("v", "a", 1000, "e1")])
    assert close(store.trending(5), [("b", 1.0), ("a", 2.0)][::-1])


def test_trending_rescales_its_epoch_without_overflow(make_store: Factory) -> None:
    store = make_store(trending_half_life_s=1)
    store.append([Event("u", "old", 0)])
    for t in range(0, 5000, 250):  # 5000 half-lives: 2**5000 would overflow a float without rescaling
        store.append([Event("u", "steady", t)])
    store.append([Event("u", "new", 5000), Event("v", "new", 5000)])
    got = dict(store.trending(10))
    assert got["new"] == pytest.approx(2.0)
    assert "old" not in got, "items decayed below the floor leave the table"
    assert all(math.isfinite(v) for v in got.values())
    assert got.get("steady", 0.0) < 1e-6 + 2.0**-250


def test_far_future_timestamps_cannot_wipe_trending(make_store: Factory) -> None:
    store = make_store(trending_half_life_s=3600)
    now = int(time.time())
    store.append([Event("u", "a", now), Event("v", "a", now)])
    store.append([Event("w", "spam", 2**52)])
    got = store.trending(5, now=now)
    assert [i for i, _ in got] == ["a", "spam"]
    assert got[0][1] == pytest.approx(2.0) and got[1][1] < 1.1  # spam counts as if sent at most 300 s ahead


# --- URLs and backend specifics -------------------------------------------------------------------


def test_unsupported_url_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported"):
        open_store("mongodb://x")


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_events_per_user"):
        open_store(str(tmp_path), max_events_per_user=0)


def test_redis_keys_of_a_user_share_one_cluster_slot(redis_server: RedisServer) -> None:
    from redis.crc import key_slot

    store = open_store(redis_server.url)
    try:
        store.append([Event("abc123", "i", 1, "e")])
        with redis.Redis.from_url(redis_server.url) as client:
            keys = {k.decode() for k in client.scan_iter(match="*abc123*")}
        assert keys == set(user_keys("abc123"))
        assert len({key_slot(k.encode()) for k in keys}) == 1
    finally:
        store.close()


def test_redis_without_fsync_always_is_refused(redis_server: RedisServer) -> None:
    with redis.Redis.from_url(redis_server.url) as client:
        client.config_set("appendfsync", "everysec")
        try:
            with pytest.raises(StoreError, match="appendfsync"):
                open_store(redis_server.url)
            open_store(redis_server.url + "?check_durability=false").close()
        finally:
            client.config_set("appendfsync", "always")


def test_sqlite_store_upgrades_the_foundation_schema(tmp_path: Path) -> None:
    """Databases of the first release deduplicated event ids globally on the events table."""
    db = tmp_path / "events.db"
    with sqlite3.connect(db) as conn:
        conn.executescript(
            "CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, user_id TEXT NOT NULL, item_id TEXT NOT NULL,"
            " ts INTEGER NOT NULL, event_id TEXT, type TEXT NOT NULL DEFAULT '');"
            "CREATE UNIQUE INDEX events_event_id ON events(event_id) WHERE event_id IS NOT NULL;"
            "INSERT INTO events (user_id, item_id, ts, event_id) VALUES ('u', 'a', 1, 'e1'), ('u', 'b', 2, NULL);"
        )
    conn.close()
    store = open_store(f"sqlite://{db}", max_events_per_user=2)
    try:
        assert store.append([Event("u", "a", 1, "e1"), Event("w", "a", 1, "e1")]) == 1
        assert store.append([Event("u", "c", 3)]) == 1
        assert items(store.recent("u", 10)) == ["b", "c"]
    finally:
        store.close()
