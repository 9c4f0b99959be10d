"""The gateway's own Prometheus metrics: stages, partial and degraded answers, the store, events, HTTP.

gRPC methods are counted by recsys_common.metrics.ServerTelemetry, as in every service.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from recsys_common.logs import HEADER, REQUEST_ID, new_request_id
from recsys_common.metrics import LATENCY_BUCKETS

STAGE_LATENCY = Histogram(
    "recsys_gateway_stage_seconds",
    "Time spent per stage of a recommendation (store, each source, sources, ranking, total)",
    ["stage"],
    buckets=LATENCY_BUCKETS,
)
PARTIAL = Counter("recsys_gateway_partial", "Stages missing from an answer, by stage and reason", ["stage", "reason"])
DEGRADED = Counter("recsys_gateway_degraded", "Answers not in ranked order, by reason", ["reason"])
ANSWERS = Counter("recsys_gateway_answers", "Recommendation answers, by outcome", ["outcome"])
OVERLOADED = Counter("recsys_gateway_overloaded", "Requests refused at admission (503 / RESOURCE_EXHAUSTED)")
AUTH_REFUSED = Counter(
    "recsys_gateway_auth_refused",
    "Calls refused by authentication (401 / UNAUTHENTICATED) or authorization (403 / PERMISSION_DENIED), "
    "by transport and reason (missing, malformed, unknown_key, invalid_token, expired_token, insufficient_scope)",
    ["transport", "reason"],
)
RATE_LIMITED = Counter(
    "recsys_gateway_rate_limited",
    "Calls refused by the per-principal rate limit (429 / RESOURCE_EXHAUSTED)",
    ["transport"],
)
STORE_LATENCY = Histogram(
    "recsys_gateway_store_seconds", "User-state store calls, by operation", ["op"], buckets=LATENCY_BUCKETS
)
BATCH_SIZE = Histogram(
    "recsys_gateway_batch_size",
    "Requests per call to a service (gateway/batching.py): 1 is a plain call, more a batched one",
    ["call"],
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
)
EVENTS = Counter("recsys_gateway_events", "Events received, by outcome (accepted, duplicate)", ["outcome"])
ANSWER_CACHE_LOOKUPS = Counter(
    "recsys_gateway_answer_cache_lookups", "Answer cache lookups, by result (hit, miss)", ["result"]
)
ANSWER_CACHE_EVICTIONS = Counter(
    "recsys_gateway_answer_cache_evictions",
    "Answers dropped from the cache, by reason (capacity, expired, bundle_swap)",
    ["reason"],
)
ANSWER_CACHE_NOT_STORED = Counter(
    "recsys_gateway_answer_cache_not_stored",
    "Computed answers not cached, by reason (partial, degraded, bundle_swapped)",
    ["reason"],
)
ANSWER_CACHE_ENTRIES = Gauge("recsys_gateway_answer_cache_entries", "Answers held in the cache")
ANSWER_CACHE_HIT_LATENCY = Histogram(
    "recsys_gateway_answer_cache_hit_seconds",
    "Request start to answer for cache hits (store version read + lookup)",
    buckets=(0.0001, 0.0002, 0.0003, 0.0005, 0.00075, 0.001, 0.002, 0.005, 0.01, 0.05),
)
HTTP_REQUESTS = Counter(
    "recsys_http_requests", "REST requests, by route, method and status", ["route", "method", "status"]
)
HTTP_LATENCY = Histogram(
    "recsys_http_latency_seconds",
    "REST handling time, by route and method",
    ["route", "method"],
    buckets=LATENCY_BUCKETS,
)

_WORD = re.compile(r"[a-z_]+")


def reason_label(reason: str) -> str:
    """A bounded label from a free-text reason: 'deadline exceeded after 3 ms' -> 'deadline_exceeded'."""
    head = reason.split(":", 1)[0].strip().lower()
    if head.startswith("deadline exceeded"):
        return "deadline_exceeded"
    words = _WORD.findall(head.replace(" ", "_"))
    return "_".join(words)[:40] or "other"


def record_answer(timings_ms: dict[str, float], missing: list[tuple[str, str]], degraded: str) -> None:
    for stage, ms in timings_ms.items():
        STAGE_LATENCY.labels(stage).observe(ms / 1000)
    for stage, reason in missing:
        PARTIAL.labels(stage.split(" ", 1)[0], reason_label(reason)).inc()
    if degraded:
        DEGRADED.labels(reason_label(degraded)).inc()
    ANSWERS.labels("degraded" if degraded else "partial" if missing else "complete").inc()


class timed_store:
    """`with timed_store("recent"): ...` observes the store call's duration."""

    def __init__(self, op: str) -> None:
        self.op = op

    def __enter__(self) -> None:
        self.started = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        STORE_LATENCY.labels(self.op).observe(time.perf_counter() - self.started)


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Any]]
Send = Callable[[Any], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class RestTelemetry:
    """ASGI middleware: a request id per request (the caller's X-Request-ID or a new one, echoed back),
    and request counts and latency per route template (never the raw path: it may hold a user id)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), None)
        request_id = new_request_id(given)
        token = REQUEST_ID.set(request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (HEADER.lower().encode(), request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            HTTP_REQUESTS.labels(route, scope["method"], str(status)).inc()
            HTTP_LATENCY.labels(route, scope["method"]).observe(time.perf_counter() - started)
            REQUEST_ID.reset(token)
