"""gRPC side of the Guard: wraps the Gateway servicer so every RPC is admitted before it runs.

Credentials come in the `authorization` metadata, as on REST: ``ApiKey <key>`` or ``Bearer <jwt>``.
Refusals are UNAUTHENTICATED, PERMISSION_DENIED, or RESOURCE_EXHAUSTED with a `retry-after` trailer
(whole seconds). An RPC missing from METHOD_SCOPES needs an authenticated caller with any scope (and
tests/test_auth.py fails until a new RPC is listed). grpc.health.v1 is a separate service: never checked.

Usage::

    gateway_pb2_grpc.add_GatewayServicer_to_server(guard_servicer(servicer, guard), server)
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc
import grpc.aio

from gateway.auth import ERASE, EVENTS, RECOMMEND, Guard, PermissionDenied, RateLimited, Unauthenticated
from gateway.metrics import AUTH_REFUSED, RATE_LIMITED

METHOD_SCOPES: dict[str, str] = {"Recommend": RECOMMEND, "Track": EVENTS, "ForgetUser": ERASE}

log = logging.getLogger(__name__)


def peer_host(peer: str) -> str:
    """'ipv4:127.0.0.1:5123' -> '127.0.0.1'; 'ipv6:[::1]:5123' -> '[::1]'; anything else as it is."""
    kind, _, rest = peer.partition(":")
    return rest.rpartition(":")[0] if kind in ("ipv4", "ipv6") else peer


class GuardedServicer:
    """The (grpc.aio) servicer with each public method behind the Guard; the generated add_*_to_server reads its methods
    by name, so it cannot tell the difference."""

    def __init__(self, inner: Any, guard: Guard, scopes: Mapping[str, str] = METHOD_SCOPES) -> None:
        self._inner = inner
        self._guard = guard
        self._scopes = scopes

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._inner, name)
        if name.startswith("_") or not callable(method):
            return method
        return self._guarded(method, self._scopes.get(name))

    def _guarded(
        self, method: Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]], scope: str | None
    ) -> Callable[..., Any]:
        @functools.wraps(method)
        async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            authorization = next((v for k, v in context.invocation_metadata() or () if k == "authorization"), None)
            try:
                self._guard.check(
                    authorization if isinstance(authorization, str) else None, scope, peer_host(context.peer())
                )
            except (Unauthenticated, PermissionDenied) as err:
                AUTH_REFUSED.labels("grpc", err.reason).inc()
                log.info("refused %s: %s", method.__name__, getattr(err, "detail", err.reason))
                await context.abort(err.grpc_code, str(err))
            except RateLimited as err:
                RATE_LIMITED.labels("grpc").inc()
                context.set_trailing_metadata((("retry-after", err.retry_after),))
                await context.abort(err.grpc_code, str(err))
            return await method(request, context)

        return guarded


def guard_servicer(servicer: Any, guard: Guard) -> Any:
    """The servicer behind the guard, or the servicer itself when there is nothing to check."""
    return GuardedServicer(servicer, guard) if guard.active else servicer
