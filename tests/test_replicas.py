"""Two gateway replicas sharing one real Redis: an event acknowledged by one shapes the very next
answer of the other. Measures the ack-to-reflected latency."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from recsys_cli.stack import Stack
from tests.bundle_factory import make_bundle
from tests.redis_server import RedisServer

KEY = "k" * 64


def start_gateway(stack: Stack, redis_url: str, tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    port_file = tmp / "replica.port"
    cmd = [
        sys.executable, "-m", "gateway", "--bundles", str(stack.bundles_dir), "--state", redis_url,
        "--port", "0", "--grpc-port", "0", "--port-file", str(port_file),
        "--retrieval", f"127.0.0.1:{stack.ports['retrieval']}", "--ranking", f"127.0.0.1:{stack.ports['ranking']}",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env={**os.environ, "RECSYS_GATEWAY_USER_KEY": KEY})
    deadline = time.monotonic() + 60
    while not port_file.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "replica gateway did not start"
        time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port_file.read_text()}"


def test_replicas_sharing_redis_see_each_others_events_at_once(tmp_path: Path) -> None:
    bundles = tmp_path / "bundles"
    make_bundle(bundles)
    server = RedisServer(tmp_path / "redis").start()
    env = {"RECSYS_GATEWAY_USER_KEY": KEY}
    try:
        with Stack(bundles, server.url, http_port=0, grpc_port=0, env=env) as stack:
            replica, replica_url = start_gateway(stack, server.url, tmp_path)
            try:
                with httpx.Client(timeout=10) as a, httpx.Client(timeout=10) as b:
                    lags_ms = []
                    for n in range(1, 31):
                        item = f"i{n:03d}"
                        event = {"user_id": "shared", "item_id": item, "timestamp": n, "event_id": f"e{n}"}
                        acked = a.post(f"{stack.http_url}/v1/events", json={"events": [event]})
                        assert acked.json() == {"accepted": 1}
                        t = time.perf_counter()
                        answer = b.post(f"{replica_url}/v1/recommendations", json={"user_id": "shared", "k": 40})
                        lags_ms.append((time.perf_counter() - t) * 1000)
                        ids = [i["item_id"] for i in answer.json()["items"]]
                        # The replica's very next answer already excludes every acknowledged item.
                        assert len(ids) == 40 - n and not {f"i{m:03d}" for m in range(1, n + 1)} & set(ids)
                    # Idempotency holds across replicas: a resend through the other replica is not counted.
                    resend = {"user_id": "shared", "item_id": "i001", "timestamp": 1, "event_id": "e1"}
                    assert b.post(f"{replica_url}/v1/events", json={"events": [resend]}).json() == {"accepted": 0}
                print(f"ack-to-reflected (next request on the other replica): p50 {np.median(lags_ms):.1f} ms, "
                      f"max {max(lags_ms):.1f} ms over {len(lags_ms)} events")  # fmt: skip
            finally:
                replica.terminate()
                replica.wait(timeout=30)
    finally:
        server.stop()
