"""Fault drill: the user-state store (a real redis-server) stops answering under steady load.

redis-server is frozen with SIGSTOP, so the gateway's reads hang as they would on a stalled network.
Every answer must still arrive within its budget + 15 ms, as a 200 flagged partial with the store
named; once Redis resumes, answers are whole again and the user's history is back.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx

from recsys_cli.stack import Stack
from tests.redis_server import RedisServer

BUDGET_MS = 100


def test_a_frozen_store_gives_partial_answers_within_budget(tiny_bundles: Path, tmp_path: Path) -> None:
    redis_server = RedisServer(tmp_path / "redis").start()
    try:
        env = {"RECSYS_GATEWAY_USER_KEY": "k" * 64}
        with Stack(tiny_bundles, redis_server.url, http_port=0, grpc_port=0, env=env) as stack:
            with httpx.Client(base_url=stack.http_url, timeout=10) as http:
                seen = [{"user_id": "sam", "item_id": i, "timestamp": 1000 + n} for n, i in enumerate(("i001", "i002"))]
                assert http.post("/v1/events", json={"events": seen}).json() == {"accepted": 2}
                body = {"user_id": "sam", "k": 5, "timeout_ms": BUDGET_MS}
                before = http.post("/v1/recommendations", json=body).json()
                assert not before["partial"]
                assert not {"i001", "i002"} & {i["item_id"] for i in before["items"]}

            assert redis_server.proc is not None
            redis_server.proc.send_signal(signal.SIGSTOP)
            outcomes: list[tuple[int, float, dict[str, object]]] = []
            stop = threading.Event()

            def client() -> None:
                with httpx.Client(base_url=stack.http_url, timeout=10) as c:
                    while not stop.is_set():
                        t = time.perf_counter()
                        reply = c.post("/v1/recommendations", json=body)
                        outcomes.append((reply.status_code, (time.perf_counter() - t) * 1000, reply.json()))

            threads = [threading.Thread(target=client) for _ in range(3)]
            try:
                for t in threads:
                    t.start()
                time.sleep(2.0)
            finally:
                stop.set()
                for t in threads:
                    t.join(timeout=10)
                redis_server.proc.send_signal(signal.SIGCONT)

            assert len(outcomes) >= 20
            assert all(status == 200 for status, _, _ in outcomes), [o for o in outcomes if o[0] != 200][:3]
            slow = [ms for _, ms, _ in outcomes if ms > BUDGET_MS + 15]
            assert not slow, f"{len(slow)} of {len(outcomes)} answers over budget + 15 ms: {sorted(slow)[-5:]}"
            for _, _, reply in outcomes:
                assert reply["partial"], reply
                stages = {m["stage"] for m in reply["missing"]}  # type: ignore[attr-defined]
                assert "store" in stages, reply
                assert len(reply["items"]) == 5  # type: ignore[arg-type]

            with httpx.Client(base_url=stack.http_url, timeout=10) as http:
                deadline = time.monotonic() + 10
                after = http.post("/v1/recommendations", json=body).json()
                while after["partial"] and time.monotonic() < deadline:
                    time.sleep(0.1)
                    after = http.post("/v1/recommendations", json=body).json()
                assert not after["partial"], after
                assert not {"i001", "i002"} & {i["item_id"] for i in after["items"]}
    finally:
        redis_server.stop()
