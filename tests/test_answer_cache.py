"""The answer cache: never an answer computed before the user's latest event or before a bundle swap.

Core tests for the LRU itself and the stores' per-user version (SQLite and a real Redis), then real
processes: one gateway on SQLite, two replicas sharing Redis (an event through one, the other must not
serve its cached answer), and a bundle published mid-stream. A hit is visible in debug timings.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from gateway.cache import AnswerCache, AnswerKey
from gateway.core import RecommendRequest
from gateway.store import Event, UserStore, open_store
from recsys_cli.stack import Stack
from tests.bundle_factory import make_bundle
from tests.redis_server import RedisServer
from tests.test_observability import scrape, value
from tests.test_replicas import KEY, start_gateway

CACHE_ENV = {"RECSYS_GATEWAY_ANSWER_CACHE_SIZE": "1000", "RECSYS_GATEWAY_USER_KEY": KEY}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class View:
    """Stands for a BundleView: the cache only compares identities."""


def key(user: str = "u", version: str = "1", **params: Any) -> AnswerKey:
    return AnswerKey.of(RecommendRequest(user_id="raw", **params), user, version, "b1")


# -- the LRU ---------------------------------------------------------------------------------------


def test_hit_miss_capacity_and_ttl() -> None:
    clock, view = Clock(), View()
    cache: AnswerCache[str] = AnswerCache(max_entries=2, ttl_s=10, clock=clock)
    assert cache.get(key("a"), view) is None
    cache.put(key("a"), view, "A")
    cache.put(key("b"), view, "B")
    assert cache.get(key("a"), view) == "A"  # a is now the most recent
    cache.put(key("c"), view, "C")
    assert cache.get(key("b"), view) is None and cache.get(key("a"), view) == "A" and len(cache) == 2
    clock.now = 10.0
    assert cache.get(key("a"), view) is None and len(cache) == 1


def test_every_parameter_and_the_user_version_are_in_the_key() -> None:
    view = View()
    cache: AnswerCache[str] = AnswerCache(max_entries=100, ttl_s=10)
    cache.put(key(k=5, exclude_item_ids=("x", "y")), view, "answer")
    assert cache.get(key(k=5, exclude_item_ids=("y", "x", "y")), view) == "answer"  # a set: order is no matter
    for other in (
        key(version="2", k=5, exclude_item_ids=("x", "y")),
        key(user="v", k=5, exclude_item_ids=("x", "y")),
        key(k=6, exclude_item_ids=("x", "y")),
        key(k=5, exclude_item_ids=("x",)),
        key(k=5, exclude_item_ids=("x", "y"), exclude_seen=False),
        key(k=5, exclude_item_ids=("x", "y"), max_per_genre=1),
        key(k=5, exclude_item_ids=("x", "y"), debug=True),
    ):
        assert cache.get(other, view) is None, other
    # The budget is not in the key: only complete answers are stored, and they do not depend on it.
    assert cache.get(key(k=5, exclude_item_ids=("x", "y"), timeout_ms=50), view) == "answer"


def test_a_new_bundle_view_empties_the_cache_and_an_old_one_never_hits() -> None:
    old, new = View(), View()
    cache: AnswerCache[str] = AnswerCache(max_entries=100, ttl_s=10)
    cache.put(key(), old, "old")
    assert cache.get(key(), new) is None  # a request on the new view never sees the old answer
    cache.put(key("other"), new, "new")
    assert len(cache) == 1 and cache.get(key(), old) is None and cache.get(key("other"), new) == "new"


def test_forget_user_drops_their_answers() -> None:
    view = View()
    cache: AnswerCache[str] = AnswerCache(max_entries=100, ttl_s=10)
    cache.put(key("u", k=1), view, "1")
    cache.put(key("u", k=2), view, "2")
    cache.put(key("w"), view, "w")
    assert cache.forget_user("u") == 2 and cache.get(key("w"), view) == "w"


# -- the stores' per-user version ----------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[UserStore]:
    if request.param == "sqlite":
        opened = open_store(f"sqlite://{tmp_path}/events.db", max_events_per_user=3)
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        with redis.Redis.from_url(server.url) as client:
            client.flushall()
        opened = open_store(server.url, max_events_per_user=3)
    yield opened
    opened.close()


def test_the_version_changes_with_every_stored_event_and_never_repeats(store: UserStore) -> None:
    assert store.version("u") == "0"
    seen = {store.version("u")}
    for n in range(5):  # past max_events_per_user: trimming does not stall it
        store.append([Event("u", f"i{n}", 100 + n, event_id=f"e{n}")])
        assert store.version("u") not in seen
        seen.add(store.version("u"))
    before = store.version("u")
    assert store.append([Event("u", "i0", 100, event_id="e0")]) == 0  # a duplicate changes nothing
    assert store.version("u") == before
    store.append([Event("w", "i9", 100)])  # another user's event is not this user's
    assert store.version("u") == before
    store.forget("u")
    assert store.version("u") == "0"
    store.append([Event("u", "i0", 100, event_id="e0")])  # the very same first event again
    assert store.version("u") not in seen, "after forget() the version starts somewhere new"


def test_a_user_past_the_ttl_has_version_zero(tmp_path: Path) -> None:
    store = open_store(f"sqlite://{tmp_path}/events.db", user_ttl_s=1)
    try:
        store.append([Event("u", "i1", 100)])
        assert store.version("u") != "0"
        time.sleep(1.1)
        assert store.version("u") == "0" and store.recent("u", 10) == []
    finally:
        store.close()


# -- live gateways ---------------------------------------------------------------------------------


def ask(http: httpx.Client, url: str, user: str, k: int = 10) -> dict[str, Any]:
    # A generous budget: this machine is shared, and a partial answer is never cached (nor wanted here).
    body = {"user_id": user, "k": k, "debug": True, "timeout_ms": 5000}
    reply = http.post(f"{url}/v1/recommendations", json=body)
    assert reply.status_code == 200, reply.text
    answer: dict[str, Any] = reply.json()
    assert not answer["partial"] and not answer["degraded"], answer
    return answer


def hit(answer: dict[str, Any]) -> bool:
    return "cache_hit" in answer["timings_ms"]


def track(http: httpx.Client, url: str, user: str, item: str, ts: int) -> None:
    event = {"user_id": user, "item_id": item, "timestamp": ts, "event_id": f"{user}-{item}"}
    assert http.post(f"{url}/v1/events", json={"events": [event]}).json() == {"accepted": 1}


def check_events_invalidate(http: httpx.Client, writer: str, reader: str, user: str) -> None:
    """Events through `writer`; `reader` must answer afresh (the item excluded) right after each one."""
    ask(http, reader, user)
    assert hit(ask(http, reader, user)), "the repeated request is a hit"
    for n in range(1, 8):
        item = f"i{n:03d}"
        track(http, writer, user, item, 1000 + n)
        answer = ask(http, reader, user, k=30)
        assert not hit(answer), f"served a cached answer after event {n}"
        assert item not in {i["item_id"] for i in answer["items"]}
        assert hit(ask(http, reader, user, k=30))


def test_events_invalidate_the_cache_with_sqlite(tiny_bundles: Path, tmp_path: Path) -> None:
    with (
        Stack(tiny_bundles, tmp_path / "state", http_port=0, grpc_port=0, env=CACHE_ENV) as stack,
        httpx.Client(timeout=10) as http,
    ):
        before = scrape(f"{stack.http_url}/metrics")  # after the gateway's warm-up requests
        check_events_invalidate(http, stack.http_url, stack.http_url, "solo")
        after = scrape(f"{stack.http_url}/metrics")

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("recsys_gateway_answer_cache_lookups_total", result="hit") == 8
    assert delta("recsys_gateway_answer_cache_lookups_total", result="miss") == 8
    assert delta("recsys_gateway_answer_cache_hit_seconds_count") == 8
    assert delta("recsys_gateway_answer_cache_entries") == 8  # one per (version, k) seen; the ttl is 30 s


def test_an_event_through_one_replica_invalidates_the_others_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, setting in CACHE_ENV.items():
        monkeypatch.setenv(name, setting)  # the replica inherits the environment
    bundles = tmp_path / "bundles"
    make_bundle(bundles)
    server = RedisServer(tmp_path / "redis").start()
    try:
        with Stack(bundles, server.url, http_port=0, grpc_port=0) as stack:
            replica, replica_url = start_gateway(stack, server.url, tmp_path)
            try:
                with httpx.Client(timeout=10) as http:
                    check_events_invalidate(http, stack.http_url, replica_url, "shared")
                    check_events_invalidate(http, replica_url, stack.http_url, "other")
                    # Forget through one replica: the other's cached answers with the history are never served
                    # again. The answer it may serve is one for an empty history ("0", as before any event).
                    with_history = ask(http, stack.http_url, "other", k=30)
                    assert hit(with_history) and not {"i001", "i007"} & {i["item_id"] for i in with_history["items"]}
                    assert http.delete(f"{replica_url}/v1/users/other").json() == {"erased": 7}
                    forgotten = ask(http, stack.http_url, "other", k=30)
                    assert {"i001", "i007"} <= {i["item_id"] for i in forgotten["items"]}
            finally:
                replica.terminate()
                replica.wait(timeout=30)
    finally:
        server.stop()


def test_a_bundle_swap_is_never_answered_from_the_cache(tmp_path: Path) -> None:
    bundles = tmp_path / "bundles"
    first = make_bundle(bundles, seed=0)
    # The gateway polls CURRENT after the services (2 s vs 1 s), as deployed: it swaps last.
    with (
        Stack(bundles, tmp_path / "state", http_port=0, grpc_port=0, env=CACHE_ENV) as stack,
        httpx.Client(timeout=10) as http,
    ):
        track(http, stack.http_url, "kim", "i001", 1000)
        answers = [ask(http, stack.http_url, "kim") for _ in range(5)]
        second = make_bundle(bundles, seed=1)
        deadline = time.monotonic() + 30
        while answers[-1]["bundle_version"] != second and time.monotonic() < deadline:
            answers.append(ask(http, stack.http_url, "kim"))
        answers += [ask(http, stack.http_url, "kim") for _ in range(5)]
    versions = [a["bundle_version"] for a in answers]
    swap = versions.index(second)
    assert set(versions[:swap]) == {first} and set(versions[swap:]) == {second}
    assert all(hit(a) for a in answers[1:swap]), "the old version's answer was served from the cache until the swap"
    assert not hit(answers[swap]), "the first answer after the swap was computed afresh"
    assert all(hit(a) for a in answers[swap + 1 :])
