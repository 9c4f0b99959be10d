"""Per-principal rate limits: the token bucket on a fake clock, its accuracy under a threaded flood, and the
gateway's 429 / RESOURCE_EXHAUSTED answers from a real process."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from gateway.auth import EVENTS, RECOMMEND, SCOPES, Guard, RateLimited, key_file_line, new_api_key
from gateway.config import GatewayConfig
from gateway.ratelimit import RateLimiter
from protos.recsys.v1 import gateway_pb2, gateway_pb2_grpc
from recsys_cli.stack import Stack

RATE, BURST = 50.0, 10
# The real gateway's bucket is deeper: on a loaded 2-core machine the client threads can stall for a few hundred ms,
# and a bucket that fills up during such a stall drops tokens the stalled clients never asked for. The rate
# measured net of the burst is the same either way.
STACK_BURST = 25


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_bucket_admits_the_burst_then_refills_at_the_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate_per_s=10, burst=3, clock=clock)
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("a") == pytest.approx(0.1), "one token comes back in 1/rate s"
    clock.now += 0.05
    assert limiter.acquire("a") == pytest.approx(0.05)
    clock.now += 0.05
    assert limiter.acquire("a") == 0.0
    assert limiter.acquire("b") == 0.0, "each key has its own bucket"
    clock.now += 60
    assert [limiter.acquire("a") for _ in range(4)][-1] > 0, "an idle bucket refills to the burst, not beyond"


def test_burst_defaults_to_one_seconds_worth_and_bad_settings_are_refused() -> None:
    assert RateLimiter(rate_per_s=20).burst == 20
    assert RateLimiter(rate_per_s=0.5).burst == 1
    with pytest.raises(ValueError, match="rate_per_s"):
        RateLimiter(rate_per_s=0)
    with pytest.raises(ValueError, match="burst"):
        RateLimiter(rate_per_s=1, burst=-1)


def test_memory_stays_bounded_however_many_keys_call() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate_per_s=1, burst=2, clock=clock, max_keys=100)
    for n in range(1000):
        limiter.acquire(f"k{n}")
        clock.now += 0.001
    assert len(limiter) <= 100
    busy = RateLimiter(rate_per_s=1, burst=1, clock=clock, max_keys=10)
    busy.acquire("hot")
    clock.now += 2  # "hot" has refilled: dropping it changes nothing for it
    for n in range(20):
        busy.acquire(f"k{n}")
    assert len(busy) <= 10


def flood(call: Callable[[], bool], threads: int, seconds: float) -> tuple[int, int, float]:
    """`threads` threads call as fast as they can for `seconds`: (admitted, refused, seconds from the first call's
    start to the last call's end)."""
    counts = [[0, 0] for _ in range(threads)]
    spans: list[tuple[float, float]] = []
    stop_at = time.monotonic() + seconds

    def hammer(slot: list[int]) -> None:
        first = time.monotonic()
        while time.monotonic() < stop_at:
            slot[0 if call() else 1] += 1
        spans.append((first, time.monotonic()))

    workers = [threading.Thread(target=hammer, args=(counts[i],)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = max(end for _, end in spans) - min(start for start, _ in spans)
    return sum(c[0] for c in counts), sum(c[1] for c in counts), elapsed


def assert_rate_within_10_percent(admitted: int, refused: int, elapsed: float, burst: int = BURST) -> None:
    rate = (admitted - burst) / elapsed  # the burst is a one-off allowance, not part of the rate
    assert refused > admitted, f"not a flood: {admitted} admitted, {refused} refused"
    assert abs(rate - RATE) <= 0.1 * RATE, f"admitted {rate:.1f}/s against a limit of {RATE}/s"


def test_admitted_rate_under_a_threaded_flood_is_the_limit() -> None:
    limiter = RateLimiter(rate_per_s=RATE, burst=BURST)
    admitted, refused, elapsed = flood(lambda: limiter.acquire("k") == 0.0, threads=4, seconds=2.0)
    assert_rate_within_10_percent(admitted, refused, elapsed)


def test_guard_limits_each_principal_and_without_keys_each_address(tmp_path: Path) -> None:
    keys = {name: new_api_key() for name in ("a", "b")}
    (tmp_path / "keys").write_text("".join(key_file_line(k, n, SCOPES) + "\n" for n, k in keys.items()))
    guard = Guard.from_config(GatewayConfig(api_keys_file=tmp_path / "keys", rate_limit_per_s=1, rate_limit_burst=2))
    for _ in range(2):
        guard.check(f"ApiKey {keys['a']}", RECOMMEND, "10.0.0.1")
    with pytest.raises(RateLimited) as caught:
        guard.check(f"ApiKey {keys['a']}", RECOMMEND, "10.0.0.2")  # another address, same key: same bucket
    assert caught.value.retry_after == "1" and caught.value.http_status == 429
    assert guard.check(f"ApiKey {keys['b']}", RECOMMEND, "10.0.0.1").name == "key:b"
    anonymous = Guard.from_config(GatewayConfig(rate_limit_per_s=1, rate_limit_burst=1))
    assert anonymous.active and anonymous.authenticator is None
    anonymous.check(None, RECOMMEND, "10.0.0.1")
    anonymous.check(None, RECOMMEND, "10.0.0.2")
    with pytest.raises(RateLimited):
        anonymous.check(None, RECOMMEND, "10.0.0.1")


def test_retry_after_is_whole_seconds_rounded_up() -> None:
    assert RateLimited(0.02).retry_after == "1"
    assert RateLimited(1.2).retry_after == "2"
    assert "retry after 2 s" in str(RateLimited(1.2))


# -- a real gateway process ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    path = tmp_path_factory.mktemp("keys") / "api-keys"
    keys = {name: new_api_key() for name in ("rest-client", "grpc-client", "slow-client")}
    path.write_text("".join(key_file_line(k, n, [RECOMMEND, EVENTS]) + "\n" for n, k in keys.items()))
    return path, keys


@pytest.fixture(scope="module")
def stack(
    keys: tuple[Path, dict[str, str]], tiny_bundles: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    env = {
        "RECSYS_GATEWAY_API_KEYS_FILE": str(keys[0]),
        "RECSYS_GATEWAY_RATE_LIMIT_PER_S": str(RATE),
        "RECSYS_GATEWAY_RATE_LIMIT_BURST": str(STACK_BURST),
    }
    with Stack(tiny_bundles, tmp_path_factory.mktemp("state"), http_port=0, grpc_port=0, env=env) as s:
        yield s


def test_real_gateway_holds_each_key_to_its_rate_on_rest_and_grpc(
    keys: tuple[Path, dict[str, str]], stack: Stack
) -> None:
    """REST, then gRPC, flooded by 4 threads each with one key per transport: each key gets its 50/s.

    Admitted calls are kept short (a 50 ms budget) so that the clients always have a call waiting at the limiter:
    a client that cannot offer the load does not get the rate, and that would not be the limiter's error."""
    rest_headers = {"Authorization": f"ApiKey {keys[1]['rest-client']}"}
    grpc_metadata = [("authorization", f"ApiKey {keys[1]['grpc-client']}")]
    local = threading.local()
    # Made up front: an httpx.Client takes a while to build, and the bucket would refill meanwhile.
    clients = [httpx.Client(base_url=stack.http_url, timeout=10) for _ in range(4)]
    for client in clients:
        client.get("/healthz")  # connected (keep-alive) before the flood
    idle = list(clients)
    retry_after: set[str] = set()
    grpc_codes: set[grpc.StatusCode] = set()

    def rest_call() -> bool:
        if not hasattr(local, "http"):
            local.http = idle.pop()
        body = {"user_id": "hank", "k": 2, "timeout_ms": 50}
        reply = local.http.post("/v1/recommendations", json=body, headers=rest_headers)
        assert reply.status_code in (200, 429), reply.text
        if reply.status_code == 429:
            retry_after.add(reply.headers["Retry-After"])
            assert reply.json()["error"]["code"] == "resource_exhausted"
        return reply.status_code == 200

    channel = grpc.insecure_channel(stack.grpc_addr)
    grpc.channel_ready_future(channel).result(timeout=10)
    stub = gateway_pb2_grpc.GatewayStub(channel)

    def grpc_call() -> bool:
        try:
            request = gateway_pb2.RecommendRequest(user_id="ivy", k=2, timeout_ms=50)
            stub.Recommend(request, metadata=grpc_metadata, timeout=10)
        except grpc.RpcError as err:
            grpc_codes.add(err.code())
            trailers = dict(err.trailing_metadata() or ())
            retry_after.add(trailers.get("retry-after", "none"))
            return False
        return True

    # One transport after the other: on a small machine two floods at once starve each other's clients.
    results = {"rest": flood(rest_call, threads=4, seconds=2.5), "grpc": flood(grpc_call, threads=4, seconds=2.5)}
    channel.close()
    for client in clients:
        client.close()
    assert grpc_codes == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert retry_after == {"1"}, "a 50/s bucket has a token again within 1 s; the gRPC trailer says the same"
    for transport, (admitted, refused, elapsed) in results.items():
        print(f"{transport}: {admitted} admitted, {refused} refused in {elapsed:.2f} s")
        assert_rate_within_10_percent(admitted, refused, elapsed, STACK_BURST)
    # A key that waited as told is let in again, and /healthz is never limited.
    with httpx.Client(base_url=stack.http_url, timeout=10) as http:
        assert all(http.get("/healthz").status_code == 200 for _ in range(3 * STACK_BURST))
        slow = {"Authorization": f"ApiKey {keys[1]['slow-client']}"}
        assert http.post("/v1/recommendations", json={"user_id": "jo", "k": 2}, headers=slow).status_code == 200
        metrics = http.get("/metrics").text
    assert 'recsys_gateway_rate_limited_total{transport="rest"}' in metrics
    assert 'recsys_gateway_rate_limited_total{transport="grpc"}' in metrics
