"""The three services as real processes on loopback (tiny hand-built bundle): REST and gRPC contracts."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.recsys.v1 import (
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    ranking_pb2,
    ranking_pb2_grpc,
    retrieval_pb2,
    retrieval_pb2_grpc,
)
from recsys_cli.stack import Stack
from tests.bundle_factory import DIM, make_bundle


@pytest.fixture(scope="module")
def stack(tiny_bundles: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(tiny_bundles, tmp_path_factory.mktemp("state"), http_port=0, grpc_port=0) as s:
        yield s


@pytest.fixture(scope="module")
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.http_url, timeout=10) as client:
        yield client


def events(user: str, items: list[str], start: int = 1000, ids: bool = True) -> dict[str, Any]:
    rows = [{"user_id": user, "item_id": item, "timestamp": start + n} for n, item in enumerate(items)]
    if ids:
        for row in rows:
            row["event_id"] = f"{user}-{row['item_id']}"
    return {"events": rows}


def test_healthz_reports_every_service(http: httpx.Client) -> None:
    reply = http.get("/healthz")
    assert reply.status_code == 200
    assert reply.json()["services"] == {"gateway": True, "retrieval": True, "ranking": True}


def test_events_then_recommendations_follow_the_user(http: httpx.Client) -> None:
    odd = ["i001", "i003", "i005"]
    assert http.post("/v1/events", json=events("alice", odd)).json() == {"accepted": 3}
    reply = http.post("/v1/recommendations", json={"user_id": "alice", "k": 8})
    assert reply.status_code == 200
    body = reply.json()
    ids = [i["item_id"] for i in body["items"]]
    assert len(ids) == 8 and len(set(ids)) == 8
    assert not set(ids) & set(odd), "seen items must be left out"
    assert all(int(i[1:]) % 2 == 1 for i in ids), f"an odd-cluster history should get odd items, got {ids}"
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True)
    assert body["bundle_version"] and body["partial"] is False and body["degraded"] is None
    # The very next answer reflects a new event: the even cluster takes over after even clicks.
    http.post("/v1/events", json=events("alice", ["i002", "i004", "i006", "i008", "i010"], start=2000))
    ids = [i["item_id"] for i in http.post("/v1/recommendations", json={"user_id": "alice", "k": 5}).json()["items"]]
    assert sum(int(i[1:]) % 2 == 0 for i in ids) >= 4, ids


def test_exclude_seen_false_may_return_seen_items(http: httpx.Client) -> None:
    http.post("/v1/events", json=events("bob", ["i001"]))
    seen = http.post("/v1/recommendations", json={"user_id": "bob", "k": 40, "exclude_seen": False}).json()
    assert "i001" in [i["item_id"] for i in seen["items"]]
    unseen = http.post("/v1/recommendations", json={"user_id": "bob", "k": 40}).json()
    assert "i001" not in [i["item_id"] for i in unseen["items"]]
    assert len(unseen["items"]) == 39


def test_duplicate_event_ids_are_not_counted_again(http: httpx.Client) -> None:
    body = events("carol", ["i002", "i004"])
    assert http.post("/v1/events", json=body).json() == {"accepted": 2}
    assert http.post("/v1/events", json=body).json() == {"accepted": 0}
    without_ids = events("carol", ["i006"], ids=False)
    assert http.post("/v1/events", json=without_ids).json() == {"accepted": 1}


def test_unknown_user_gets_a_cold_start_answer(http: httpx.Client) -> None:
    body = http.post("/v1/recommendations", json={"user_id": "never-seen", "k": 10, "debug": True}).json()
    assert len(body["items"]) == 10
    assert set(body["timings_ms"]) >= {"store", "ann", "ranking", "total"}


@pytest.mark.parametrize(
    ("path", "payload", "field"),
    [
        ("/v1/recommendations", {"user_id": "u", "k": 0}, "k"),
        ("/v1/recommendations", {"user_id": "u", "k": 1001}, "k"),
        ("/v1/recommendations", {"user_id": "u", "k": "ten"}, "k"),
        ("/v1/recommendations", {"k": 3}, "user_id"),
        ("/v1/recommendations", {"user_id": ""}, "user_id"),
        ("/v1/recommendations", {"user_id": "x" * 257}, "user_id"),
        ("/v1/recommendations", {"user_id": 7}, "user_id"),
        ("/v1/recommendations", {"user_id": "u", "timeout_ms": 0}, "timeout_ms"),
        ("/v1/recommendations", {"user_id": "u", "exclude_seen": "maybe"}, "exclude_seen"),
        ("/v1/events", {"events": []}, "events"),
        ("/v1/events", {}, "events"),
        ("/v1/events", {"events": [{"user_id": "u", "item_id": "i", "timestamp": -1}]}, "events[0].timestamp"),
        ("/v1/events", {"events": [{"user_id": "u", "item_id": "i", "timestamp": "now"}]}, "events[0].timestamp"),
        ("/v1/events", {"events": [{"user_id": "u", "timestamp": 1}]}, "events[0].item_id"),
        ("/v1/events", {"events": [{"user_id": "u", "item_id": "", "timestamp": 1}]}, "events[0].item_id"),
        ("/v1/events", events("u", ["i001"] * 1001, ids=False), "events"),
    ],
)
def test_bad_input_is_a_422_naming_the_field(http: httpx.Client, path: str, payload: Any, field: str) -> None:
    reply = http.post(path, json=payload)
    assert reply.status_code == 422, reply.text
    error = reply.json()["error"]
    assert error["field"] == field and field in error["message"]


def test_malformed_json_is_a_422(http: httpx.Client) -> None:
    reply = http.post("/v1/events", content=b"{not json", headers={"Content-Type": "application/json"})
    assert reply.status_code == 422
    assert reply.json()["error"]["code"] == "invalid_argument"


def test_rejected_batch_stores_nothing(http: httpx.Client) -> None:
    bad = events("dave", ["i001", "i003"])
    bad["events"][1]["timestamp"] = -5
    assert http.post("/v1/events", json=bad).status_code == 422
    body = http.post("/v1/recommendations", json={"user_id": "dave", "k": 40, "exclude_seen": True}).json()
    assert len(body["items"]) == 40, "nothing of the rejected batch may have been stored"


def test_gateway_grpc_recommend_and_track(stack: Stack) -> None:
    with grpc.insecure_channel(stack.grpc_addr) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        track = stub.Track(
            gateway_pb2.TrackRequest(
                events=[common_pb2.Event(user_id="erin", item_id=i, timestamp=5, event_id=f"g-{i}") for i in ("i002",)]
            ),
            timeout=5,
        )
        assert track.accepted == 1
        reply = stub.Recommend(gateway_pb2.RecommendRequest(user_id="erin", k=4), timeout=5)
        ids = [i.item_id for i in reply.items]
        assert len(ids) == 4 and "i002" not in ids and all(int(i[1:]) % 2 == 0 for i in ids)
        assert reply.bundle_version and not reply.partial and not reply.degraded
        with pytest.raises(grpc.RpcError) as err:
            stub.Recommend(gateway_pb2.RecommendRequest(user_id="erin", k=5000), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "k" in err.value.details()
        # The limits hold before any per-event work: a batch over 1,000 events is refused by its count, a message
        # over 1 MiB (REST: 256 KiB) before it is decoded; the front door answers normally right after.
        tiny = [common_pb2.Event(user_id="e", item_id="i002", timestamp=5)]
        with pytest.raises(grpc.RpcError) as err:
            stub.Track(gateway_pb2.TrackRequest(events=tiny * 60_000), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "events" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.Track(gateway_pb2.TrackRequest(events=tiny * 200_000), timeout=5)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert stub.Recommend(gateway_pb2.RecommendRequest(user_id="erin", k=4), timeout=5).items
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_retrieval_and_ranking_speak_grpc(stack: Stack) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{stack.ports['retrieval']}") as channel:
        stub = retrieval_pb2_grpc.RetrievalStub(channel)
        by_vector = stub.Search(
            retrieval_pb2.SearchRequest(vector=retrieval_pb2.Vector(values=np.eye(DIM)[0].tolist()), k=3), timeout=5
        )
        assert [int(i.item_id[1:]) % 2 for i in by_vector.items] == [1, 1, 1]
        batch = stub.BatchSearch(
            retrieval_pb2.BatchSearchRequest(
                requests=[
                    retrieval_pb2.SearchRequest(context=common_pb2.UserContext(recent_item_ids=["i002"]), k=2),
                    retrieval_pb2.SearchRequest(vector=retrieval_pb2.Vector(values=[0.0] * DIM), k=1),
                ]
            ),
            timeout=5,
        )
        assert [len(r.items) for r in batch.responses] == [2, 1]
        with pytest.raises(grpc.RpcError) as err:
            stub.Search(retrieval_pb2.SearchRequest(vector=retrieval_pb2.Vector(values=[1.0]), k=3), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "vector" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.Search(retrieval_pb2.SearchRequest(k=3, bundle_version="not-this-one"), timeout=5)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with grpc.insecure_channel(f"127.0.0.1:{stack.ports['ranking']}") as channel:
        ranked = ranking_pb2_grpc.RankingStub(channel).Rank(
            ranking_pb2.RankRequest(
                context=common_pb2.UserContext(recent_item_ids=["i001"]),
                item_ids=["i002", "i003"],
                source_bits=[1, 1],
                source_names=["ann"],
            ),
            timeout=5,
        )
        assert len(ranked.scores) == 2 and ranked.scores[1] > ranked.scores[0]


def test_ranking_down_gives_a_degraded_answer_not_an_error(tiny_bundles: Path, tmp_path: Path) -> None:
    with Stack(tiny_bundles, tmp_path / "state", http_port=0, grpc_port=0) as s:
        s.procs["ranking"].send_signal(signal.SIGKILL)
        s.procs["ranking"].wait()
        reply = httpx.post(f"{s.http_url}/v1/recommendations", json={"user_id": "x", "k": 5}, timeout=10)
        assert reply.status_code == 200
        body = reply.json()
        assert len(body["items"]) == 5 and body["degraded"].startswith("ranking failed: unavailable")
        assert httpx.get(f"{s.http_url}/healthz", timeout=10).status_code == 503


def test_events_survive_a_restart(tiny_bundles: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    with Stack(tiny_bundles, state, http_port=0, grpc_port=0) as s:
        httpx.post(f"{s.http_url}/v1/events", json=events("frank", ["i001", "i003"]), timeout=10)
    with Stack(tiny_bundles, state, http_port=0, grpc_port=0) as s:
        body = httpx.post(f"{s.http_url}/v1/recommendations", json={"user_id": "frank", "k": 40}, timeout=10).json()
        assert len(body["items"]) == 38
        again = httpx.post(f"{s.http_url}/v1/events", json=events("frank", ["i001"]), timeout=10).json()
        assert again == {"accepted": 0}


def test_recsys_serve_stops_cleanly_on_sigterm(tiny_bundles: Path, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "recsys_cli.main", "serve", "--bundles", str(tiny_bundles), "--state", str(tmp_path),
         "--port", "0", "--grpc-port", "0"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    banner = ""
    while time.monotonic() < deadline and "recsys is serving" not in banner:
        banner = proc.stdout.readline()
    assert "recsys is serving" in banner
    url = banner.split("REST ")[1].split()[0]
    assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/healthz", timeout=2)


def test_body_over_256_kib_is_refused_also_when_chunked(http: httpx.Client) -> None:
    big = {"user_id": "u", "exclude_item_ids": ["x" * 200] * 1400}
    reply = http.post("/v1/recommendations", json=big)
    assert reply.status_code == 413 and reply.json()["error"]["field"] == "body"

    def chunks() -> Iterator[bytes]:
        yield b'{"user_id": "u", "exclude_item_ids": ['
        for _ in range(1400):
            yield b'"' + b"x" * 200 + b'",'
        yield b'"y"]}'

    reply = http.post("/v1/recommendations", content=chunks(), headers={"Content-Type": "application/json"})
    assert reply.status_code == 413


def test_explanations_and_diversity(http: httpx.Client) -> None:
    http.post("/v1/events", json=events("gina", ["i001", "i003"]))
    body = http.post("/v1/recommendations", json={"user_id": "gina", "k": 10, "max_per_genre": 2}).json()
    genres = ["Odd" if int(i["item_id"][1:]) % 2 else "Even" for i in body["items"]]
    assert genres.count("Odd") <= 2 and genres.count("Even") <= 2 and len(body["items"]) == 4
    for item in body["items"]:
        assert set(item["sources"]) <= set(item["stage_scores"])
        assert item["stage_scores"]["ranker"] == pytest.approx(item["score"])


def test_slow_ranking_gives_a_degraded_answer_within_budget(tiny_bundles: Path, tmp_path: Path) -> None:
    env = {"RECSYS_RANKING_FAULT_DELAY_MS": "400", "RECSYS_GATEWAY_MAX_INFLIGHT": "2"}
    with Stack(tiny_bundles, tmp_path / "state", http_port=0, grpc_port=0, env=env) as s:
        with httpx.Client(base_url=s.http_url, timeout=10) as client:
            client.post("/v1/events", json=events("hank", ["i002"]))
            for timeout_ms in (50, 100):
                t = time.perf_counter()
                reply = client.post("/v1/recommendations", json={"user_id": "hank", "k": 5, "timeout_ms": timeout_ms})
                elapsed_ms = (time.perf_counter() - t) * 1000
                assert reply.status_code == 200
                body = reply.json()
                assert body["degraded"].startswith("ranking failed: deadline_exceeded"), body
                assert len(body["items"]) == 5 and "i002" not in [i["item_id"] for i in body["items"]]
                assert elapsed_ms <= timeout_ms + 15, f"{elapsed_ms:.1f} ms for a {timeout_ms} ms budget"

        # At the in-flight limit, a request is refused at once with 503 + Retry-After, never queued.
        limits = httpx.Limits(max_connections=8)
        with httpx.Client(base_url=s.http_url, timeout=10, limits=limits) as client:

            def ask(_: int) -> tuple[int, float, str | None]:
                t = time.perf_counter()
                r = client.post("/v1/recommendations", json={"user_id": "x", "timeout_ms": 1000})
                return r.status_code, (time.perf_counter() - t) * 1000, r.headers.get("retry-after")

            with ThreadPoolExecutor(8) as pool:
                outcomes = list(pool.map(ask, range(8)))
        refused = [o for o in outcomes if o[0] == 503]
        assert {o[0] for o in outcomes} == {200, 503} and len(refused) >= 4, outcomes
        assert all(ms < 100 and retry == "1" for _, ms, retry in refused), refused

        # The gRPC front door: the budget is the call's deadline, and the same limit refuses at once.
        with grpc.insecure_channel(s.grpc_addr) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            t = time.perf_counter()
            reply = stub.Recommend(gateway_pb2.RecommendRequest(user_id="hank", k=5), timeout=0.1)
            assert (time.perf_counter() - t) * 1000 <= 100 + 15
            assert reply.degraded.startswith("ranking failed: deadline_exceeded") and len(reply.items) == 5

            def ask_grpc(_: int) -> tuple[grpc.StatusCode, float]:
                t = time.perf_counter()
                try:
                    stub.Recommend(gateway_pb2.RecommendRequest(user_id="x", timeout_ms=1000), timeout=10)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as err:
                    code = err.code()
                return code, (time.perf_counter() - t) * 1000

            with ThreadPoolExecutor(8) as pool:
                codes = list(pool.map(ask_grpc, range(8)))
        exhausted = [c for c in codes if c[0] == grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert {c[0] for c in codes} == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
        assert len(exhausted) >= 4 and all(ms < 100 for _, ms in exhausted), codes


def test_forget_erases_the_user_and_raw_ids_never_reach_the_store(tiny_bundles: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    with Stack(tiny_bundles, state, http_port=0, grpc_port=0) as s, httpx.Client(base_url=s.http_url) as client:
        raw = "ivy.raw-user-id@example.com"
        client.post("/v1/events", json=events(raw, ["i001", "i003", "i005"]))
        client.post("/v1/events", json=events("jack", ["i002"]))
        assert len(client.post("/v1/recommendations", json={"user_id": raw, "k": 40}).json()["items"]) == 37
        stored = b"".join(p.read_bytes() for p in state.iterdir() if p.is_file())
        assert raw.encode() not in stored and b"jack" not in stored
        assert client.delete(f"/v1/users/{raw}").json() == {"erased": 3}
        assert len(client.post("/v1/recommendations", json={"user_id": raw, "k": 40}).json()["items"]) == 40
        # Its idempotency keys went too: the same events count again.
        assert client.post("/v1/events", json=events(raw, ["i001"])).json() == {"accepted": 1}
        with grpc.insecure_channel(s.grpc_addr) as channel:
            reply = gateway_pb2_grpc.GatewayStub(channel).ForgetUser(gateway_pb2.ForgetUserRequest(user_id=raw))
        assert reply.erased == 1
        assert client.delete("/v1/users/jack").json() == {"erased": 1}
        assert client.delete(f"/v1/users/{'x' * 300}").status_code == 422


def test_a_published_bundle_is_picked_up_under_load_without_errors(tmp_path: Path) -> None:
    bundles = tmp_path / "bundles"
    first = make_bundle(bundles, seed=0)
    with Stack(bundles, tmp_path / "state", http_port=0, grpc_port=0) as s, httpx.Client(base_url=s.http_url) as client:
        client.post("/v1/events", json=events("kim", ["i001", "i003"]))
        answers: list[dict[str, Any]] = []
        second = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            reply = client.post("/v1/recommendations", json={"user_id": "kim", "k": 5, "timeout_ms": 1000})
            assert reply.status_code == 200, reply.text
            answers.append(reply.json())
            if second is None and len(answers) == 20:
                second = make_bundle(bundles, seed=1)  # published (CURRENT swapped) mid-stream
            if second is not None and answers[-1]["bundle_version"] == second and len(answers) > 60:
                break
        versions = [a["bundle_version"] for a in answers]
        assert set(versions) == {first, second} and versions[-1] == second
        assert versions == sorted(versions, key=[first, second].index), "no flapping back to the old version"
        assert all(len(a["items"]) == 5 for a in answers)
        assert not [a for a in answers if a["degraded"]], "ranking always answered for the pinned version"
