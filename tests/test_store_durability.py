"""Acknowledged events survive kill -9: of a process using the embedded store, of the gateway in the
middle of a burst of REST requests, and of redis-server (appendfsync always)."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from gateway.store import Event, open_store
from recsys_cli.stack import Stack
from recsys_common.errors import StoreError
from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
BIG = 1_000_000  # no trimming in these tests: every acknowledged event must be readable


def test_sqlite_acknowledged_events_survive_kill_9(tmp_path: Path) -> None:
    """A child process appends, prints n after each commit, and is SIGKILLed mid-stream."""
    db = tmp_path / "events.db"
    code = (
        "from gateway.store import Event, open_store\n"
        f"s = open_store('sqlite://{db}', max_events_per_user={BIG})\n"
        "for n in range(100000):\n"
        "    s.append([Event('u', f'i{n}', n, f'e{n}')])\n"
        "    print(n, flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout is not None
    acked = -1
    for line in proc.stdout:
        acked = int(line)
        if acked >= 300:
            break
    proc.kill()
    proc.wait()
    proc.stdout.close()
    s = open_store(f"sqlite://{db}")
    try:
        stored = {e.item_id for e in s.recent("u", BIG)}
        assert {f"i{n}" for n in range(acked + 1)} <= stored
        assert s.append([Event("u", "i0", 0, "e0")]) == 0, "dedupe keys survive too"
    finally:
        s.close()


def _burst(url: str, acked: list[dict[str, object]], stop: threading.Event, worker: int) -> None:
    """POST batches of 50 until the gateway dies; remember each batch it acknowledged."""
    with httpx.Client(base_url=url, timeout=10) as client:
        for n in range(10_000):
            if stop.is_set():
                return
            body = {
                "events": [
                    {"user_id": f"burst{worker}-{(n * 50 + j) // 150}", "item_id": f"i{1 + j % 40:03d}",
                     "timestamp": 1000 + n, "event_id": f"w{worker}-b{n}-{j}"}
                    for j in range(50)
                ]
            }  # fmt: skip
            try:
                reply = client.post("/v1/events", json=body)
            except httpx.TransportError:
                return
            if reply.status_code != 200:
                return
            assert reply.json() == {"accepted": 50}
            acked.append(body)


def test_gateway_kill_9_after_a_burst_loses_no_acknowledged_event(tiny_bundles: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    acked: list[dict[str, object]] = []
    stop = threading.Event()
    with Stack(tiny_bundles, state, http_port=0, grpc_port=0) as s:
        workers = [threading.Thread(target=_burst, args=(s.http_url, acked, stop, w)) for w in range(4)]
        for w in workers:
            w.start()
        deadline = time.monotonic() + 30
        while len(acked) < 40 and time.monotonic() < deadline:
            time.sleep(0.01)
        s.procs["gateway"].send_signal(signal.SIGKILL)  # requests are in flight
        s.procs["gateway"].wait()
        stop.set()
        for w in workers:
            w.join()
    n_acked = 50 * len(acked)
    assert n_acked >= 2000
    with sqlite3.connect(state / "events.db") as conn:
        (rows,) = conn.execute("SELECT count(*) FROM events").fetchone()
    conn.close()
    assert rows >= n_acked
    with Stack(tiny_bundles, state, http_port=0, grpc_port=0) as s, httpx.Client(base_url=s.http_url) as client:
        # Every acknowledged batch is known after the restart: resending it stores nothing.
        for body in acked:
            assert client.post("/v1/events", json=body, timeout=10).json() == {"accepted": 0}


def test_redis_acknowledged_events_survive_kill_9_of_the_server(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    try:
        store = open_store(server.url, max_events_per_user=BIG)
        acked: list[int] = []

        def write() -> None:
            for n in range(100_000):
                try:
                    store.append([Event("u", f"i{n}", n, f"e{n}")])
                except StoreError:
                    return
                acked.append(n)

        writer = threading.Thread(target=write)
        writer.start()
        deadline = time.monotonic() + 30
        while len(acked) < 300 and time.monotonic() < deadline:
            time.sleep(0.005)
        server.kill()  # while the writer is mid-stream
        writer.join()
        store.close()
        assert len(acked) >= 300

        server.start()
        store = open_store(server.url, max_events_per_user=BIG)
        try:
            stored = {e.item_id for e in store.recent("u", BIG)}
            assert {f"i{n}" for n in acked} <= stored
            assert store.append([Event("u", "i0", 0, "e0")]) == 0, "dedupe keys survive too"
        finally:
            store.close()
    finally:
        server.stop()
