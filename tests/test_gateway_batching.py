"""Under concurrent load the gateway batches its calls to retrieval and ranking (BatchSearch, BatchRank), and a
batched answer is the answer the same request gets alone. Real processes over the tiny bundle."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from recsys_cli.stack import Stack

USERS = [f"batch-{n}" for n in range(24)]


def batched_calls(http: httpx.Client) -> dict[str, tuple[float, float]]:
    """call -> (requests sent, calls made), from the gateway's batch-size histogram."""
    text = http.get("/metrics").text
    out: dict[str, list[float]] = {}
    for kind, call, value in re.findall(r'recsys_gateway_batch_size_(sum|count)\{call="(\w+)"\} (\S+)', text):
        out.setdefault(call, [0.0, 0.0])[kind == "count"] = float(value)
    return {call: (v[0], v[1]) for call, v in out.items()}


def answer(http: httpx.Client, user: str) -> dict[str, Any]:
    reply = http.post("/v1/recommendations", json={"user_id": user, "k": 5})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert not body["partial"] and body["degraded"] is None, body
    items = [(i["item_id"], i["score"], i["sources"]) for i in body["items"]]
    return {"items": items, "version": body["bundle_version"]}


def test_concurrent_requests_share_calls_and_get_the_answers_they_get_alone(tiny_bundles: Path, tmp_path: Path) -> None:
    with (
        Stack(tiny_bundles, tmp_path / "state", http_port=0, grpc_port=0) as stack,
        httpx.Client(base_url=stack.http_url, timeout=10) as http,
    ):
        for n, user in enumerate(USERS):
            items = [f"i{(n * 7 + j) % 40 + 1:03d}" for j in range(3 + n % 5)]
            rows = [{"user_id": user, "item_id": i, "timestamp": 1000 + j} for j, i in enumerate(items)]
            assert http.post("/v1/events", json={"events": rows}).status_code == 200
        alone = {user: answer(http, user) for user in USERS}  # one at a time: every call goes alone
        before = batched_calls(http)

        clients = [httpx.Client(base_url=stack.http_url, timeout=10) for _ in range(12)]
        try:
            with ThreadPoolExecutor(len(clients)) as pool:
                for _ in range(20):  # rounds of 12 concurrent requests until some calls were shared
                    jobs = [(u, pool.submit(answer, clients[n % 12], u)) for n, u in enumerate(USERS)]
                    for user, job in jobs:
                        assert job.result() == alone[user], user
                    after = batched_calls(http)
                    if all(after[c][0] - before[c][0] > after[c][1] - before[c][1] for c in ("search", "rank")):
                        break
        finally:
            for client in clients:
                client.close()
        for call in ("search", "rank"):
            sent, calls = after[call][0] - before[call][0], after[call][1] - before[call][1]
            assert sent > calls, f"no {call} call was shared ({sent} requests in {calls} calls)"
