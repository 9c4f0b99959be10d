"""Recommender: the gateway's pure core. Reads the user's events, fans out to candidate sources,
merges, ranks within the request's budget, and says honestly what was left out.

The transports (rest.py, servicer.py) only convert; every rule about requests lives here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np

from gateway.clients import RankingClient, RetrievalClient
from gateway.config import GatewayConfig
from gateway.store import Event, UserStore
from recsys_common.bundle import Bundle
from recsys_common.catalog import Catalog
from recsys_common.errors import InvalidRequest
from recsys_common.features import ItemTables, covisit_candidates, popular_candidates

log = logging.getLogger(__name__)

MAX_ID_LEN = 256
MAX_EVENTS = 1000
MAX_K = 1000
MAX_TIMESTAMP = 2**53  # beyond this a JSON client loses precision


@dataclass(frozen=True)
class RecommendRequest:
    user_id: str
    k: int = 10
    exclude_seen: bool = True
    exclude_item_ids: Sequence[str] = ()
    timeout_ms: int | None = None
    debug: bool = False


@dataclass(frozen=True)
class RecommendedItem:
    item_id: str
    score: float
    sources: tuple[str, ...]
    title: str = ""


@dataclass(frozen=True)
class Recommendation:
    items: list[RecommendedItem]
    bundle_version: str
    partial: bool = False
    missing: list[tuple[str, str]] = field(default_factory=list)  # (stage, reason)
    degraded: str = ""  # non-empty: not in ranked order, and why
    timings_ms: dict[str, float] = field(default_factory=dict)


def _check_id(field_name: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise InvalidRequest(field_name, "must be a non-empty string")
    if len(value) > MAX_ID_LEN:
        raise InvalidRequest(field_name, f"must be at most {MAX_ID_LEN} characters, got {len(value)}")


def validate_events(events: Sequence[Event]) -> None:
    if not 1 <= len(events) <= MAX_EVENTS:
        raise InvalidRequest("events", f"must hold 1..{MAX_EVENTS} events, got {len(events)}")
    for n, e in enumerate(events):
        _check_id(f"events[{n}].user_id", e.user_id)
        _check_id(f"events[{n}].item_id", e.item_id)
        if isinstance(e.timestamp, bool) or not isinstance(e.timestamp, int) or not 0 <= e.timestamp < MAX_TIMESTAMP:
            raise InvalidRequest(f"events[{n}].timestamp", f"must be Unix seconds in 0..2^53, got {e.timestamp!r}")
        if len(e.event_id) > MAX_ID_LEN:
            raise InvalidRequest(f"events[{n}].event_id", f"must be at most {MAX_ID_LEN} characters")
        if len(e.type) > 64:
            raise InvalidRequest(f"events[{n}].type", "must be at most 64 characters")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError) and isinstance(exc, grpc.Call):
        return f"{exc.code().name.lower()}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


class Recommender:
    """Answers recommendation requests from the user-state store, the bundle's tables and two services."""

    def __init__(
        self,
        config: GatewayConfig,
        bundle: Bundle,
        store: UserStore,
        retrieval: RetrievalClient,
        ranking: RankingClient,
    ) -> None:
        self.config = config
        self.store = store
        self.retrieval = retrieval
        self.ranking = ranking
        self.version = bundle.version
        self.catalog = Catalog.load(bundle)
        self.tables = ItemTables.load(bundle)
        self.history_len = int(bundle.manifest["history_len"])

    # -- events ---------------------------------------------------------------------------
    def track(self, events: Sequence[Event]) -> int:
        validate_events(events)
        return self.store.append(list(events))

    def history(self, user_id: str) -> list[Event]:
        _check_id("user_id", user_id)
        return self.store.recent(user_id, self.config.max_history)

    # -- recommendations --------------------------------------------------------------------
    def _budget_s(self, req: RecommendRequest, grpc_remaining_s: float | None) -> float:
        if req.timeout_ms is not None and not 1 <= req.timeout_ms <= self.config.max_timeout_ms:
            raise InvalidRequest("timeout_ms", f"must be in 1..{self.config.max_timeout_ms}, got {req.timeout_ms}")
        budget = (req.timeout_ms or self.config.default_timeout_ms) / 1000
        return min(budget, grpc_remaining_s) if grpc_remaining_s is not None else budget

    def recommend(self, req: RecommendRequest, grpc_remaining_s: float | None = None) -> Recommendation:
        started = time.perf_counter()
        _check_id("user_id", req.user_id)
        if isinstance(req.k, bool) or not 1 <= req.k <= MAX_K:
            raise InvalidRequest("k", f"must be in 1..{MAX_K}, got {req.k}")
        for n, item_id in enumerate(req.exclude_item_ids):
            _check_id(f"exclude_item_ids[{n}]", item_id)
        deadline = started + self._budget_s(req, grpc_remaining_s)
        timings: dict[str, float] = {}

        events = self.store.recent(req.user_id, self.config.max_history)
        timings["store"] = (time.perf_counter() - started) * 1000
        recent_ids = [e.item_id for e in events[-self.history_len :]]
        excluded_ids = list(dict.fromkeys([*(e.item_id for e in events if req.exclude_seen), *req.exclude_item_ids]))
        history_idx = self.catalog.known(recent_ids)
        excluded_idx = self.catalog.known(excluded_ids)
        missing: list[tuple[str, str]] = []

        # ANN retrieval runs remotely while the local sources are computed.
        t = time.perf_counter()
        n_ann = max(self.config.ann_candidates, req.k)
        ann_budget = max(0.0, (deadline - t) * self.config.retrieval_budget_share)
        ann_future = self.retrieval.search_future(recent_ids, n_ann, excluded_ids, self.version, ann_budget)
        n_pop = max(self.config.popular_candidates, req.k)
        cov_idx, _ = covisit_candidates(self.tables, history_idx, self.config.covisit_candidates, excluded_idx)
        pop_idx, _ = popular_candidates(self.tables, n_pop, excluded_idx)
        timings["local_sources"] = (time.perf_counter() - t) * 1000

        sources: dict[str, list[str]] = {}
        try:
            ann = self.retrieval.result(ann_future)
            for item_id in ann.item_ids:
                sources.setdefault(item_id, []).append("ann")
        except grpc.RpcError as exc:
            missing.append(("ann", _reason(exc)))
        timings["ann"] = (time.perf_counter() - t) * 1000
        for name, idx in (("covisit", cov_idx), ("popular", pop_idx)):
            for i in idx.tolist():
                sources.setdefault(self.catalog.id_of(i), []).append(name)

        candidates = list(sources.items())
        degraded = ""
        t = time.perf_counter()
        remaining = deadline - t
        scores: np.ndarray | None = None
        if not candidates:
            degraded = "no candidates"
        elif remaining <= 0:
            degraded = "ranking skipped: budget spent before ranking"
        else:
            try:
                scores = np.asarray(self.ranking.rank(recent_ids, candidates, self.version, remaining))
            except grpc.RpcError as exc:
                degraded = f"ranking failed: {_reason(exc)}"
        timings["ranking"] = (time.perf_counter() - t) * 1000

        if scores is None:
            # Fallback order: the merge order (ANN by score, then co-visitation, then popularity).
            order = np.arange(len(candidates))[: req.k]
            fallback = np.linspace(1.0, 0.0, num=len(candidates), endpoint=False, dtype=np.float32)
            chosen = [(candidates[i], float(fallback[i])) for i in order]
        else:
            order = np.argsort(-scores, kind="stable")[: req.k]
            chosen = [(candidates[i], float(scores[i])) for i in order if np.isfinite(scores[i])]
        timings["total"] = (time.perf_counter() - started) * 1000
        if degraded:
            log.warning("degraded answer: %s", degraded)
        return Recommendation(
            items=[
                RecommendedItem(item_id, score, tuple(src), self.catalog.title_of(item_id))
                for (item_id, src), score in chosen
            ],
            bundle_version=self.version,
            partial=bool(missing),
            missing=missing,
            degraded=degraded,
            timings_ms={k: round(v, 3) for k, v in timings.items()} if req.debug else {},
        )

    def ready(self) -> dict[str, bool]:
        timeout_s = self.config.health_timeout_ms / 1000
        return {
            "gateway": True,
            "retrieval": self.retrieval.healthy(timeout_s),
            "ranking": self.ranking.healthy(timeout_s),
        }
