"""Operating the stack: Prometheus metrics after real traffic, JSON logs with request ids, graceful shutdown.

Every service runs as a real process on loopback (tiny hand-built bundle, two retrieval shards).
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from gateway.core import WARM_UP_ROUNDS
from protos.recsys.v1 import gateway_pb2, gateway_pb2_grpc
from recsys_cli.stack import Stack

SECRET_USER = "alice-secret-user-4711"
N_REQUESTS = 12


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a Prometheus text page."""
    text = httpx.get(url, timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def traffic(tiny_bundles: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """A stack that served known traffic, then lost a retrieval shard, then lost ranking; scraped at the end."""
    logs = tmp_path_factory.mktemp("logs")
    env = {"RECSYS_LOG_LEVEL": "DEBUG", "RECSYS_LOG_FORMAT": "json"}
    with Stack(
        tiny_bundles, tmp_path_factory.mktemp("state"), http_port=0, grpc_port=0, env=env, shards=2,
        log_dir=logs, metrics=True,
    ) as stack, httpx.Client(base_url=stack.http_url, timeout=10) as http:  # fmt: skip
        events = [
            {"user_id": SECRET_USER, "item_id": f"i00{n}", "timestamp": 1000 + n, "event_id": f"e{n}"}
            for n in range(1, 4)
        ]
        assert http.post("/v1/events", json={"events": events}).json() == {"accepted": 3}
        assert http.post("/v1/events", json={"events": events[:1]}).json() == {"accepted": 0}
        for n in range(N_REQUESTS):
            reply = http.post(
                "/v1/recommendations", json={"user_id": SECRET_USER, "k": 5}, headers={"X-Request-ID": f"req-ok-{n}"}
            )
            assert reply.status_code == 200 and reply.headers["X-Request-ID"] == f"req-ok-{n}"
            assert not reply.json()["partial"]
        assert http.post("/v1/recommendations", json={"user_id": SECRET_USER, "k": 0}).status_code == 422
        with grpc.insecure_channel(stack.grpc_addr) as channel:
            request = gateway_pb2.RecommendRequest(user_id=SECRET_USER, k=3)
            metadata = (("x-request-id", "req-grpc"),)
            gateway_pb2_grpc.GatewayStub(channel).Recommend(request, timeout=10, metadata=metadata)
        service_metrics = {
            name: scrape(f"http://{stack.host}:{port}/metrics") for name, port in stack.metrics_ports.items()
        }

        stack.procs["retrieval-1"].send_signal(signal.SIGKILL)
        stack.procs["retrieval-1"].wait()
        partial = http.post(
            "/v1/recommendations", json={"user_id": SECRET_USER, "k": 5}, headers={"X-Request-ID": "req-partial"}
        ).json()
        stack.procs["ranking"].send_signal(signal.SIGKILL)
        stack.procs["ranking"].wait()
        degraded = http.post("/v1/recommendations", json={"user_id": SECRET_USER, "k": 5}).json()
        gateway_metrics = scrape(f"{stack.http_url}/metrics")
        version = http.get("/healthz").json()["bundle_version"]
    yield {
        "gateway": gateway_metrics,
        "services": service_metrics,
        "partial": partial,
        "degraded": degraded,
        "version": version,
        "logs": logs,
    }


def test_gateway_metrics_count_requests_stages_store_and_events(traffic: dict[str, object]) -> None:
    m = traffic["gateway"]
    assert isinstance(m, dict)
    ok = value(m, "recsys_http_requests_total", route="/v1/recommendations", method="POST", status="200")
    assert ok == N_REQUESTS + 2  # the clean ones, the partial one, the degraded one
    assert value(m, "recsys_http_requests_total", route="/v1/recommendations", method="POST", status="422") == 1
    assert value(m, "recsys_http_latency_seconds_count", route="/v1/recommendations", method="POST") == N_REQUESTS + 3
    assert value(m, "recsys_grpc_requests_total", method="/recsys.v1.Gateway/Recommend", code="OK") == 1
    # REST and gRPC answers alike pass through the stages, and so do the gateway's warm-up requests.
    answers = N_REQUESTS + 3 + WARM_UP_ROUNDS
    for stage in ("store", "ann", "covisit", "trending", "sources", "ranking", "total"):
        assert value(m, "recsys_gateway_stage_seconds_count", stage=stage) == answers, stage
    assert value(m, "recsys_gateway_store_seconds_count", op="recent") == answers
    assert value(m, "recsys_gateway_store_seconds_count", op="append") == 2
    assert value(m, "recsys_gateway_events_total", outcome="accepted") == 3
    assert value(m, "recsys_gateway_events_total", outcome="duplicate") == 1
    assert value(m, "recsys_bundle_info", component="gateway", version=str(traffic["version"])) == 1


def test_partial_and_degraded_answers_are_counted_by_reason(traffic: dict[str, object]) -> None:
    m = traffic["gateway"]
    assert isinstance(m, dict)
    partial, degraded = traffic["partial"], traffic["degraded"]
    assert isinstance(partial, dict) and isinstance(degraded, dict)
    assert partial["partial"] and partial["missing"][0]["stage"] == "ann shard 1/2"
    assert degraded["degraded"].startswith("ranking failed")
    # Both later answers miss shard 1: one partial-only, one also degraded.
    assert value(m, "recsys_gateway_partial_total", stage="ann", reason="unavailable") == 2
    assert value(m, "recsys_gateway_degraded_total", reason="ranking_failed") == 1
    assert value(m, "recsys_gateway_answers_total", outcome="complete") == N_REQUESTS + 1 + WARM_UP_ROUNDS
    assert value(m, "recsys_gateway_answers_total", outcome="partial") == 1
    assert value(m, "recsys_gateway_answers_total", outcome="degraded") == 1


def test_retrieval_and_ranking_export_rpc_metrics_and_their_bundle(traffic: dict[str, object]) -> None:
    services = traffic["services"]
    assert isinstance(services, dict) and set(services) == {"retrieval-0", "retrieval-1", "ranking"}
    answered = N_REQUESTS + 1 + WARM_UP_ROUNDS
    for shard in ("retrieval-0", "retrieval-1"):
        m = services[shard]
        assert value(m, "recsys_grpc_requests_total", method="/recsys.v1.Retrieval/Search", code="OK") >= answered
        assert value(m, "recsys_grpc_latency_seconds_count", method="/recsys.v1.Retrieval/Search") >= answered
        index = shard.split("-")[1]
        assert value(m, "recsys_bundle_info", component=f"retrieval[{index}/2]", version=str(traffic["version"])) == 1
    m = services["ranking"]
    assert value(m, "recsys_grpc_requests_total", method="/recsys.v1.Ranking/Rank", code="OK") == answered
    assert value(m, "recsys_bundle_info", component="ranking", version=str(traffic["version"])) == 1


def _log_lines(logs: Path, name: str) -> list[dict[str, object]]:
    lines = [ln for ln in (logs / f"{name}.log").read_text().splitlines() if ln.strip()]
    assert lines, f"{name} wrote no log"
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"{name} wrote a log line that is not JSON: {line!r}")
    return parsed


def test_logs_are_json_carry_the_request_id_downstream_and_no_user_ids(traffic: dict[str, object]) -> None:
    logs = traffic["logs"]
    assert isinstance(logs, Path)
    per_service = {name: _log_lines(logs, name) for name in ("gateway", "retrieval-0", "ranking")}
    for name, lines in per_service.items():
        assert all({"ts", "level", "service", "msg"} <= set(line) for line in lines), name
        assert SECRET_USER not in (logs / f"{name}.log").read_text(), f"{name} logged a raw user id"
    assert SECRET_USER not in (logs / "retrieval-1.log").read_text()
    # The caller's request id reaches both services in gRPC metadata and tags their log lines.
    for name in ("retrieval-0", "ranking"):
        ids = {line.get("request_id") for line in per_service[name]}
        assert {"req-ok-0", f"req-ok-{N_REQUESTS - 1}", "req-grpc"} <= ids, name
    warnings = [line for line in per_service["gateway"] if line["level"] == "WARNING"]
    assert any(line.get("request_id") == "req-partial" and "partial=True" in str(line["msg"]) for line in warnings)


def _health(addr: str) -> str:
    with grpc.insecure_channel(addr) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5)
        except grpc.RpcError as err:
            return err.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_sigterm_under_load_finishes_every_accepted_request(tiny_bundles: Path, tmp_path: Path) -> None:
    """Ranking is made slow (300 ms) so requests are surely in flight when the gateway gets SIGTERM."""
    env = {"RECSYS_RANKING_FAULT_DELAY_MS": "300", "RECSYS_GATEWAY_GRACE_S": "5"}
    with Stack(tiny_bundles, tmp_path / "state", http_port=0, grpc_port=0, env=env) as stack:
        url, gateway = stack.http_url, stack.procs["gateway"]
        body = {"user_id": "u1", "k": 5, "timeout_ms": 4000}
        results: list[tuple[float, float, str]] = []  # (sent, answered, outcome)
        stop = threading.Event()

        def client() -> None:
            with httpx.Client(base_url=url, timeout=10) as http:
                while not stop.is_set():
                    sent = time.monotonic()
                    try:
                        reply = http.post("/v1/recommendations", json=body)
                        ok = reply.status_code == 200 and not reply.json()["degraded"]
                        outcome = "ok" if ok else f"bad {reply.status_code} {reply.text[:200]}"
                    except (httpx.ConnectError, httpx.RemoteProtocolError) as err:
                        outcome = f"refused {type(err).__name__}"  # never read by the server: not accepted
                        stop.wait(0.05)
                    results.append((sent, time.monotonic(), outcome))

        def grpc_call() -> str:
            with grpc.insecure_channel(stack.grpc_addr) as channel:
                reply = gateway_pb2_grpc.GatewayStub(channel).Recommend(
                    gateway_pb2.RecommendRequest(user_id="u2", k=5, timeout_ms=4000), timeout=10
                )
                return "ok" if not reply.degraded and len(reply.items) == 5 else f"bad {reply}"

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        grpc_outcome: list[str] = []
        grpc_thread = threading.Thread(target=lambda: grpc_outcome.append(grpc_call()))
        grpc_thread.start()
        time.sleep(0.1)  # the gRPC call is now inside ranking's 300 ms
        signalled = time.monotonic()
        gateway.send_signal(signal.SIGTERM)
        health_after = _health(stack.grpc_addr)
        assert gateway.wait(timeout=15) == 0
        exited = time.monotonic()
        stop.set()
        for t in (*threads, grpc_thread):
            t.join(timeout=15)

    assert health_after != "SERVING"
    assert grpc_outcome == ["ok"]
    # Sent before the signal, answered after it: in flight when the gateway was told to stop.
    in_flight = [r for r in results if r[0] < signalled and r[1] > signalled]
    timeline = [(round(s - signalled, 3), round(e - signalled, 3), o) for s, e, o in results]
    assert len(in_flight) >= 3, str(timeline)  # each client had a request inside ranking's delay
    assert all(outcome == "ok" for _, _, outcome in in_flight), in_flight
    failures = [r for r in results if r[2] != "ok" and not r[2].startswith("refused")]
    assert not failures, failures
    assert sum(1 for r in results if r[2] == "ok" and r[0] < signalled) >= 8
    assert exited - signalled < 5  # drained, not killed at the end of the grace period
