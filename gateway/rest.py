"""The REST transport: FastAPI routes that convert JSON to the core's values and back.

Errors: every RecsysError maps to its HTTP status with ``{"error": {"code", "message", "field"}}``;
request validation errors are 422 in the same shape, naming the field. Never a 500 for bad input.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.core import MAX_EVENTS, MAX_ID_LEN, MAX_K, MAX_TIMEOUT_MS, MAX_TIMESTAMP, Recommender, RecommendRequest
from gateway.limits import BodySizeLimit
from gateway.metrics import RestTelemetry
from gateway.store import Event
from recsys_common.errors import InvalidRequest, Overloaded, RecsysError

MAX_BODY_BYTES = 256 * 1024


Id = Annotated[StrictStr, Field(min_length=1, max_length=MAX_ID_LEN)]


def _json_integer(value: object) -> object:
    """JSON integers are numbers: 3 and 3.0 (JSON Schema counts both) pass on; strings and booleans do not."""
    if isinstance(value, bool | str):
        raise ValueError("Input should be a valid integer")
    return value


class EventIn(BaseModel):
    user_id: Id = Field(description="opaque user id")
    item_id: Id = Field(description="opaque item id")
    timestamp: int = Field(ge=0, lt=MAX_TIMESTAMP, description="Unix seconds")
    event_id: Annotated[StrictStr, Field(max_length=MAX_ID_LEN)] | None = Field(
        None, description="client-chosen id; a re-sent id is not counted again"
    )
    type: Annotated[StrictStr, Field(max_length=64)] | None = Field(
        None, description='kind of interaction, e.g. "click"'
    )

    _integers = field_validator("timestamp", mode="before")(_json_integer)


class EventsIn(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"events": [{"user_id": "u42", "item_id": "i0007", "timestamp": 1764000000, "event_id": "e-1"}]}
            ]
        }
    )
    events: list[EventIn] = Field(min_length=1, max_length=MAX_EVENTS, description=f"1 to {MAX_EVENTS} events")


class EventsOut(BaseModel):
    accepted: int = Field(description="events newly stored; a re-sent event_id is not counted again")


class ForgetOut(BaseModel):
    erased: int = Field(description="events erased")


class RecommendIn(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"user_id": "u42", "k": 10}]})
    user_id: Id = Field(description="opaque user id; unknown users get a cold-start answer")
    k: int = Field(10, ge=1, le=MAX_K, description="number of items")
    exclude_seen: StrictBool = Field(True, description="leave out items the user already interacted with")
    timeout_ms: int | None = Field(
        None, ge=1, le=MAX_TIMEOUT_MS, description="budget in ms; the server default when absent"
    )
    exclude_item_ids: list[Id] = Field([], max_length=MAX_EVENTS, description="items that must not be returned")
    max_per_genre: int | None = Field(None, ge=1, le=MAX_K, description="diversity: at most N items per genre")
    debug: StrictBool = Field(False, description="include per-stage timings")

    _integers = field_validator("k", "timeout_ms", "max_per_genre", mode="before")(_json_integer)


class ItemOut(BaseModel):
    item_id: str
    score: float
    sources: list[str] = Field(description="candidate sources that proposed the item")
    stage_scores: dict[str, float] = Field(description="each source's own score, and the ranker's")
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


class ErrorBody(BaseModel):
    code: str
    message: str
    field: str | None


class ErrorOut(BaseModel):
    error: ErrorBody


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorOut, "description": "the body could not be read (not UTF-8 JSON)"},
    413: {"model": ErrorOut, "description": f"body larger than {MAX_BODY_BYTES} bytes"},
    422: {"model": ErrorOut, "description": "invalid input; `field` names it"},
    503: {"model": ErrorOut, "description": "overloaded or no bundle loaded; retry"},
}


def _error(
    status: int, code: str, message: str, field: str | None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "field": field}}
    return JSONResponse(status_code=status, content=body, headers=headers)


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
        title="recsys gateway",
        version="1",
        description="Real-time recommendations: post user events, get recommendations that reflect them.",
        lifespan=lifespan,
    )
    app.add_middleware(BodySizeLimit, max_bytes=MAX_BODY_BYTES)
    app.add_middleware(RestTelemetry)  # outermost: counts and ids every request, refused ones too

    @app.exception_handler(RecsysError)
    async def recsys_error(_: Request, err: RecsysError) -> JSONResponse:
        field = err.field if isinstance(err, InvalidRequest) else None
        headers = {"Retry-After": "1"} if isinstance(err, Overloaded) else None
        return _error(err.http_status, err.grpc_code.name.lower(), str(err), field, headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        code = "invalid_argument" if 400 <= err.status_code < 500 else "unavailable"
        field = "body" if err.status_code == 400 else None
        return _error(err.status_code, code, str(err.detail), field, dict(err.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        field = _loc(tuple(first.get("loc", ())))
        return _error(422, "invalid_argument", f"{field}: {first.get('msg', 'invalid')}", field)

    @app.get("/healthz", responses={503: {"description": "a service has not loaded a bundle yet"}})
    def healthz() -> JSONResponse:
        services = recommender.ready()
        ok = all(services.values())
        body = {"status": "ok" if ok else "unavailable", "bundle_version": recommender.version, "services": services}
        return JSONResponse(status_code=200 if ok else 503, content=body)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        """Prometheus text format: requests and latency per route and RPC, stages, partial/degraded answers."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/events", response_model=EventsOut, responses=ERRORS)
    def post_events(body: EventsIn) -> EventsOut:
        """Store events durably; answers only after they are stored."""
        events = [Event(e.user_id, e.item_id, e.timestamp, e.event_id or "", e.type or "") for e in body.events]
        return EventsOut(accepted=recommender.track(events))

    @app.delete("/v1/users/{user_id}", response_model=ForgetOut, responses=ERRORS)
    def forget_user(user_id: Annotated[str, Path(min_length=1, max_length=MAX_ID_LEN)]) -> ForgetOut:
        """Erase everything stored about the user: events and idempotency keys."""
        return ForgetOut(erased=recommender.forget(user_id))

    @app.post("/v1/recommendations", response_model=RecommendOut, responses=ERRORS)
    async def post_recommendations(body: RecommendIn) -> RecommendOut:
        """Top-k items for the user as of now; within the budget, flagged partial/degraded when a stage failed."""
        request = RecommendRequest(
            user_id=body.user_id,
            k=body.k,
            exclude_seen=body.exclude_seen,
            exclude_item_ids=tuple(body.exclude_item_ids),
            timeout_ms=body.timeout_ms,
            debug=body.debug,
            max_per_genre=body.max_per_genre,
        )
        # Admission happens here, on the event loop, so a refused request never waits for a thread.
        with recommender.admission.slot():
            rec = await run_in_threadpool(recommender.recommend, request)
        return RecommendOut(
            items=[
                ItemOut(
                    item_id=i.item_id,
                    score=i.score,
                    sources=list(i.sources),
                    stage_scores=i.stage_scores,
                    title=i.title,
                )
                for i in rec.items
            ],
            bundle_version=rec.bundle_version,
            partial=rec.partial,
            missing=[MissingOut(stage=s, reason=r) for s, r in rec.missing],
            degraded=rec.degraded or None,
            timings_ms=rec.timings_ms or None,
        )

    return app
