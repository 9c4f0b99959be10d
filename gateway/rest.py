"""The REST transport: FastAPI routes that convert JSON to the core's values and back.

Errors: every RecsysError maps to its HTTP status with ``{"error": {"code", "message", "field"}}``;
request validation errors are 422 in the same shape, naming the field. Never a 500 for bad input.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, StrictBool, StrictInt, StrictStr

from gateway.core import Recommender, RecommendRequest
from gateway.store import Event
from recsys_common.errors import InvalidRequest, RecsysError


class EventIn(BaseModel):
    user_id: StrictStr
    item_id: StrictStr
    timestamp: StrictInt
    event_id: StrictStr | None = None
    type: StrictStr | None = None


class EventsIn(BaseModel):
    events: list[EventIn] = Field(description="1 to 1000 events")


class EventsOut(BaseModel):
    accepted: int = Field(description="events newly stored; a re-sent event_id is not counted again")


class RecommendIn(BaseModel):
    user_id: StrictStr
    k: StrictInt = Field(10, description="1..1000")
    exclude_seen: StrictBool = True
    timeout_ms: StrictInt | None = Field(None, description="budget; the server default when absent")
    exclude_item_ids: list[StrictStr] = []
    debug: StrictBool = False


class ItemOut(BaseModel):
    item_id: str
    score: float
    sources: list[str]
    title: str


class MissingOut(BaseModel):
    stage: str
    reason: str


class RecommendOut(BaseModel):
    items: list[ItemOut]
    bundle_version: str
    partial: bool = Field(description="true when some candidate sources were missing (see missing)")
    missing: list[MissingOut]
    degraded: str | None = Field(description="set when the answer is not in ranked order, with the reason")
    timings_ms: dict[str, float] | None = None


def _error(status: int, code: str, message: str, field: str | None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"code": code, "message": message, "field": field}})


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def create_app(recommender: Recommender, on_ready: Callable[[], None] | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if on_ready is not None:
            on_ready()
        yield

    app = FastAPI(
        title="recsys gateway", version="1", description="Real-time recommendations over REST.", lifespan=lifespan
    )

    @app.exception_handler(RecsysError)
    async def recsys_error(_: Request, err: RecsysError) -> JSONResponse:
        field = err.field if isinstance(err, InvalidRequest) else None
        return _error(err.http_status, err.grpc_code.name.lower(), str(err), field)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        field = _loc(tuple(first.get("loc", ())))
        return _error(422, "invalid_argument", f"{field}: {first.get('msg', 'invalid')}", field)

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        services = recommender.ready()
        ok = all(services.values())
        body = {"status": "ok" if ok else "unavailable", "bundle_version": recommender.version, "services": services}
        return JSONResponse(status_code=200 if ok else 503, content=body)

    @app.post("/v1/events", response_model=EventsOut)
    def post_events(body: EventsIn) -> EventsOut:
        events = [Event(e.user_id, e.item_id, e.timestamp, e.event_id or "", e.type or "") for e in body.events]
        return EventsOut(accepted=recommender.track(events))

    @app.post("/v1/recommendations", response_model=RecommendOut)
    def post_recommendations(body: RecommendIn) -> RecommendOut:
        rec = recommender.recommend(
            RecommendRequest(
                user_id=body.user_id,
                k=body.k,
                exclude_seen=body.exclude_seen,
                exclude_item_ids=tuple(body.exclude_item_ids),
                timeout_ms=body.timeout_ms,
                debug=body.debug,
            )
        )
        return RecommendOut(
            items=[
                ItemOut(item_id=i.item_id, score=i.score, sources=list(i.sources), title=i.title) for i in rec.items
            ],
            bundle_version=rec.bundle_version,
            partial=rec.partial,
            missing=[MissingOut(stage=s, reason=r) for s, r in rec.missing],
            degraded=rec.degraded or None,
            timings_ms=rec.timings_ms or None,
        )

    return app
