"""The user-state store contract, run against every backend (the embedded SQLite one for now)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from gateway.store import Event, UserStore, open_store


@pytest.fixture(params=["sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> UserStore:
    s = open_store(f"sqlite://{tmp_path}/events.db")
    yield s
    s.close()


def test_recent_returns_newest_n_oldest_first(store: UserStore) -> None:
    store.append([Event("u", f"i{t}", t) for t in (5, 1, 3, 2, 4)])
    assert [e.item_id for e in store.recent("u", 3)] == ["i3", "i4", "i5"]
    assert [e.item_id for e in store.recent("u", 100)] == ["i1", "i2", "i3", "i4", "i5"]
    assert store.recent("someone-else", 10) == []


def test_equal_timestamps_keep_arrival_order(store: UserStore) -> None:
    store.append([Event("u", "a", 7), Event("u", "b", 7)])
    store.append([Event("u", "c", 7)])
    assert [e.item_id for e in store.recent("u", 10)] == ["a", "b", "c"]


def test_event_ids_are_counted_once(store: UserStore) -> None:
    assert store.append([Event("u", "a", 1, "e1"), Event("u", "b", 2, "e2")]) == 2
    assert store.append([Event("u", "a", 1, "e1"), Event("u", "c", 3, "e3")]) == 1
    assert store.append([Event("u", "d", 4, "e4"), Event("u", "d", 4, "e4")]) == 1
    assert [e.item_id for e in store.recent("u", 10)] == ["a", "b", "c", "d"]


def test_concurrent_resends_count_once(store: UserStore) -> None:
    counts: list[int] = []
    lock = threading.Lock()

    def send() -> None:
        n = store.append([Event("u", f"i{j}", j, f"e{j}") for j in range(50)])
        with lock:
            counts.append(n)

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(counts) == 50
    assert len(store.recent("u", 1000)) == 50


def test_unsupported_url_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported"):
        open_store("mongodb://x")


def test_acknowledged_events_survive_kill_9(tmp_path: Path) -> None:
    """A child process appends, prints 'acked' after each commit, and is SIGKILLed mid-stream."""
    db = tmp_path / "events.db"
    code = (
        "import sys\n"
        "from gateway.store import Event, open_store\n"
        f"s = open_store('sqlite://{db}')\n"
        "for n in range(100000):\n"
        "    s.append([Event('u', f'i{n}', n, f'e{n}')])\n"
        "    print(n, flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    assert proc.stdout is not None
    acked = -1
    for line in proc.stdout:
        acked = int(line)
        if acked >= 200:
            break
    proc.kill()
    proc.wait()
    s = open_store(f"sqlite://{db}")
    stored = {e.item_id for e in s.recent("u", 1_000_000)}
    assert {f"i{n}" for n in range(acked + 1)} <= stored
