"""The REST transport: FastAPI routes that convert JSON to the core's values and back.

Errors: every RecsysError maps to its HTTP status with ``{"error": {"code", "message", "field"}}``;
request validation errors are 422 in the same shape, naming the field. Never a 500 for bad input.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path as FilePath
from typing import Annotated, Any

from fastapi import FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from gateway.auth import Guard
from gateway.auth_rest import AuthMiddleware
from gateway.core import MAX_EVENTS, MAX_ID_LEN, MAX_K, MAX_TIMEOUT_MS, MAX_TIMESTAMP, Recommender, RecommendRequest
from gateway.items import DEFAULT_LIMIT, MAX_IDS, MAX_LIMIT, MAX_QUERY_LEN, ItemIndex, ItemIndexes, ItemInfo
from gateway.limits import BodySizeLimit
from gateway.metrics import RestTelemetry
from gateway.store import Event
from recsys_common.errors import InvalidRequest, Overloaded, RecsysError

MAX_BODY_BYTES = 256 * 1024
# The try-it page (gateway/web): plain files shipped in the package; the page may load nothing from elsewhere.
WEB_DIR = FilePath(__file__).with_name("web")
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; base-uri 'none'; frame-ancestors 'none'",
    "Cache-Control": "no-cache",
}


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


class CatalogItemOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"item_id": "50", "title": "Star Wars (1977)", "genres": ["Action", "Sci-Fi"]}]}
    )
    item_id: str
    title: str = Field(description="human-readable title; empty when the bundle has none")
    genres: list[str]

    @classmethod
    def of(cls, info: ItemInfo) -> CatalogItemOut:
        return cls(item_id=info.item_id, title=info.title, genres=list(info.genres))


class CatalogItemsOut(BaseModel):
    items: list[CatalogItemOut]
    bundle_version: str


class ErrorBody(BaseModel):
    code: str
    message: str
    field: str | None


class ErrorOut(BaseModel):
    error: ErrorBody


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorOut, "description": "the body could not be read (not UTF-8 JSON)"},
    401: {"model": ErrorOut, "description": "missing or invalid credentials (when authentication is configured)"},
    403: {"model": ErrorOut, "description": "the credentials lack the scope this call needs"},
    413: {"model": ErrorOut, "description": f"body larger than {MAX_BODY_BYTES} bytes"},
    422: {"model": ErrorOut, "description": "invalid input; `field` names it"},
    429: {"model": ErrorOut, "description": "rate limit exceeded (when configured); see Retry-After"},
    503: {"model": ErrorOut, "description": "overloaded or no bundle loaded; retry"},
}


def _error(
    status: int, code: str, message: str, field: str | None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "field": field}}
    return JSONResponse(status_code=status, content=body, headers=headers)


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path") else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def create_app(
    recommender: Recommender, on_ready: Callable[[], None] | None = None, guard: Guard | None = None
) -> FastAPI:
    """The REST app; guard (default: built from recommender.config) admits /v1/ calls (gateway/auth_rest.py)."""

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
    # Credentials and rate limit are checked before the body is read; /healthz, /metrics and the page stay open.
    app.add_middleware(AuthMiddleware, guard=guard if guard is not None else Guard.from_config(recommender.config))
    app.add_middleware(RestTelemetry)  # outermost: counts and ids every request, refused ones too
    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")
    item_indexes = ItemIndexes()

    def items_now() -> ItemIndex:
        view = recommender.bundles.get()
        return item_indexes.for_version(view.version, view.catalog, view.tables.popularity)

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

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        """The try-it page: pick a user, click items, watch the recommendations change (gateway/web)."""
        return FileResponse(WEB_DIR / "index.html", headers=PAGE_HEADERS)

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

    @app.get("/v1/items", response_model=CatalogItemsOut, responses=ERRORS)
    def list_items(
        query: Annotated[
            str,
            Query(
                max_length=MAX_QUERY_LEN,
                description="words that must all appear in the title (case-insensitive); empty matches every item",
                openapi_examples={"search": {"summary": "titles containing 'star'", "value": "star"}},
            ),
        ] = "",
        ids: Annotated[
            list[Annotated[StrictStr, Field(min_length=1, max_length=MAX_ID_LEN)]],
            Query(
                max_length=MAX_IDS,
                description=f"only these items, in this order (repeat the parameter, up to {MAX_IDS}); unknown ids "
                "are left out",
                openapi_examples={"batch": {"summary": "two items by id", "value": ["50", "181"]}},
            ),
        ] = [],  # noqa: B006 (read only, never mutated)
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="at most this many items")] = DEFAULT_LIMIT,
    ) -> CatalogItemsOut:
        """Find items by title, or fetch several by id: what the bundle knows of them (title, genres).

        Without `ids`, title matches come first, then the more popular items; without a query either,
        this lists the most popular items.
        """
        index = items_now()
        found = index.search(query, ids, limit)
        return CatalogItemsOut(items=[CatalogItemOut.of(i) for i in found], bundle_version=index.version)

    @app.get(
        "/v1/items/{item_id}",
        response_model=CatalogItemOut,
        responses={**ERRORS, 404: {"model": ErrorOut, "description": "the bundle being served has no such item"}},
    )
    def get_item(item_id: Annotated[str, Path(min_length=1, max_length=MAX_ID_LEN)]) -> CatalogItemOut:
        """One item's title and genres, from the bundle being served."""
        return CatalogItemOut.of(items_now().get(item_id))

    @app.post("/v1/recommendations", response_model=RecommendOut, responses=ERRORS)
    async def post_recommendations(body: RecommendIn) -> Response:
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
        # Admission happens here, on the event loop, so a refused request never waits at all.
        with recommender.admission.slot():
            rec = await recommender.recommend_async(request)
        answer = RecommendOut(
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
        # Serialized once, by pydantic-core: returned as a model, FastAPI would validate it a second time against
        # response_model (which still documents the schema) and encode it through jsonable_encoder.
        return Response(answer.model_dump_json(), media_type="application/json")

    return app
