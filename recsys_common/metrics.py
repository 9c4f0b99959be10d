"""Prometheus metrics every service exports, and the gRPC interceptor that counts and times each RPC.

One process serves one role, so series carry no service label: Prometheus adds the scrape target's
labels (job, pod). The gateway serves them at GET /metrics on its REST port; retrieval and ranking on
their own HTTP port (`RECSYS_<SERVICE>_METRICS_PORT`, off when 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import grpc
import grpc.aio
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from recsys_common.logs import REQUEST_ID, request_id_from

log = logging.getLogger(__name__)

# Milliseconds matter here: the sequential target is a few ms, the budget a few hundred.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5)

RPC_REQUESTS = Counter("recsys_grpc_requests", "gRPC requests handled, by method and status code", ["method", "code"])
RPC_LATENCY = Histogram(
    "recsys_grpc_latency_seconds", "gRPC handling time in the server, by method", ["method"], buckets=LATENCY_BUCKETS
)
BUNDLE_INFO = Gauge("recsys_bundle_info", "1 for the bundle version a component serves", ["component", "version"])
BUNDLE_SWAPS = Counter("recsys_bundle_swaps", "Bundle versions swapped in, by component", ["component"])
BUNDLE_REFUSED = Counter("recsys_bundle_refused", "Bundle versions refused at load, by component", ["component"])


def set_bundle_version(component: str, version: str, previous: str | None) -> None:
    if previous is not None:
        with contextlib.suppress(KeyError):  # several holders of one name in a test process
            BUNDLE_INFO.remove(component, previous)
    BUNDLE_INFO.labels(component, version).set(1)


@contextlib.contextmanager
def _observed(
    method: str, request_id: str, context: grpc.ServicerContext | grpc.aio.ServicerContext[Any, Any]
) -> Iterator[None]:
    """Around one RPC's handler: the caller's request id current for its logs; its status code counted and timed."""
    token = REQUEST_ID.set(request_id)
    started = time.perf_counter()
    unset = grpc.StatusCode.UNKNOWN  # what an exception escaping the handler becomes
    try:
        yield
        unset = grpc.StatusCode.OK
    except asyncio.CancelledError:  # grpc.aio cancels the handler when the caller cancels or its deadline passes
        remaining = context.time_remaining()
        unset = (
            grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED
        )
        raise
    finally:
        # context.abort sets the code before it raises; a handler that returned without one answered OK.
        code = context.code() or unset
        elapsed = time.perf_counter() - started
        RPC_REQUESTS.labels(method, code.name).inc()
        RPC_LATENCY.labels(method).observe(elapsed)
        level = logging.DEBUG if code == grpc.StatusCode.OK else logging.INFO
        log.log(level, "rpc %s %s %.2f ms", method, code.name, elapsed * 1000)
        REQUEST_ID.reset(token)


def _replace_behaviour(handler: grpc.RpcMethodHandler, behaviour: Callable[..., Any]) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(
        behaviour, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )


class ServerTelemetry(grpc.ServerInterceptor):
    """Counts and times every unary RPC, and makes the caller's request id (x-request-id) current for its logs."""

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None], details: Any
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler  # streaming (health Watch, reflection): not ours to time
        inner, method = handler.unary_unary, details.method
        request_id = request_id_from(details.invocation_metadata)

        def observed(request: Any, context: grpc.ServicerContext) -> Any:
            with _observed(method, request_id, context):
                return inner(request, context)

        return _replace_behaviour(handler, observed)


class AioServerTelemetry(grpc.aio.ServerInterceptor):
    """ServerTelemetry for a grpc.aio server (the gateway's front door, whose handlers are coroutines)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner, method = handler.unary_unary, details.method
        request_id = request_id_from(details.invocation_metadata)

        async def observed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            with _observed(method, request_id, context):
                return await inner(request, context)

        return _replace_behaviour(handler, observed)


def serve_metrics(host: str, port: int) -> int | None:
    """Expose /metrics over HTTP on host:port (0 = off); returns the port, or None when off."""
    if port <= 0:
        return None
    start_http_server(port, addr=host)
    log.info("metrics on http://%s:%d/metrics", host, port)
    return port
