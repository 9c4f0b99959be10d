"""REST side of the Guard: ASGI middleware that admits /v1/ calls before their body is read.

Open (never checked): everything outside /v1/ — /healthz, /metrics, /docs, /openapi.json and the web
page with its assets. Each /v1/ route needs the scope in ROUTE_SCOPES; a /v1/ path not listed there
needs an authenticated caller with any scope (and tests/test_auth.py fails until a new route is listed).

Refusals share the API's error shape ``{"error": {"code", "message", "field"}}``:
401 with ``WWW-Authenticate``, 403, and 429 with ``Retry-After`` (whole seconds).
"""

from __future__ import annotations

import json
import logging

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.auth import CHALLENGE, ERASE, EVENTS, RECOMMEND, Guard, PermissionDenied, RateLimited, Unauthenticated
from gateway.metrics import AUTH_REFUSED, RATE_LIMITED

API_PREFIX = "/v1/"
# (method, path or path prefix ending in "/") -> scope
ROUTE_SCOPES: dict[tuple[str, str], str] = {
    ("POST", "/v1/recommendations"): RECOMMEND,
    ("POST", "/v1/events"): EVENTS,
    ("DELETE", "/v1/users/"): ERASE,
    # The catalogue (titles, genres) the try-it page shows: read access, like the recommendations it explains.
    ("GET", "/v1/items"): RECOMMEND,
    ("GET", "/v1/items/"): RECOMMEND,
}

log = logging.getLogger(__name__)


def required_scope(method: str, path: str) -> str | None:
    """The scope a /v1/ call needs; None = any authenticated caller."""
    method = "GET" if method == "HEAD" else method
    scope = ROUTE_SCOPES.get((method, path))
    if scope is not None:
        return scope
    for (m, prefix), scope in ROUTE_SCOPES.items():
        if m == method and prefix.endswith("/") and path.startswith(prefix) and len(path) > len(prefix):
            return scope
    return None


class AuthMiddleware:
    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.guard.active or not scope["path"].startswith(API_PREFIX):
            await self.app(scope, receive, send)
            return
        authorization = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
        client = scope["client"][0] if scope.get("client") else ""
        try:
            # Cheap enough for the event loop: a sha256, or one signature check (tens of microseconds).
            principal = self.guard.check(authorization, required_scope(scope["method"], scope["path"]), client)
        except Unauthenticated as err:
            AUTH_REFUSED.labels("rest", err.reason).inc()
            log.info("refused %s %s: %s", scope["method"], scope["path"].split("/")[2], err.detail)
            await _refuse(send, err.http_status, "unauthenticated", str(err), {"WWW-Authenticate": CHALLENGE})
            return
        except PermissionDenied as err:
            AUTH_REFUSED.labels("rest", err.reason).inc()
            log.info("refused %s %s: no scope %s", scope["method"], scope["path"].split("/")[2], err.scope)
            challenge = f'Bearer realm="recsys", error="insufficient_scope", scope="{err.scope or ""}"'
            await _refuse(send, err.http_status, "permission_denied", str(err), {"WWW-Authenticate": challenge})
            return
        except RateLimited as err:
            RATE_LIMITED.labels("rest").inc()
            await _refuse(send, err.http_status, "resource_exhausted", str(err), {"Retry-After": err.retry_after})
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


async def _refuse(send: Send, status: int, code: str, message: str, headers: dict[str, str]) -> None:
    body = json.dumps({"error": {"code": code, "message": message, "field": None}}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
