"""Recommender: the gateway's pure core. Reads the user's events, fans out to candidate sources,
merges, ranks within the request's budget, and says honestly what was left out.

Budget: the request's deadline is split into stages. The store read may use `store_budget_share`
of it; the sources run concurrently and may use `sources_budget_share` of what is left; ranking
gets the rest minus `reserve_ms` for assembling the answer. A late or failed stage is dropped and
named (`missing` for sources and the store, `degraded` for ranking); the popular source is local
and cannot be late, so an answer always comes.

The transports (rest.py, servicer.py) only convert and admit; every rule about requests is here.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
import numpy as np

from gateway.clients import RankingClient, RetrievalClient, ShardedRetrievalClient
from gateway.config import GatewayConfig
from gateway.metrics import EVENTS, OVERLOADED, record_answer, timed_store
from gateway.privacy import Pseudonymizer
from gateway.sources import (
    AnnSource,
    CandidateSource,
    ColdStartSource,
    CovisitSource,
    PopularSource,
    SourceQuery,
    SourceResult,
    TrendingSource,
)
from gateway.store import Event, UserStore
from recsys_common.bundle import Bundle
from recsys_common.catalog import Catalog
from recsys_common.errors import InvalidRequest, Overloaded
from recsys_common.features import ItemTables
from recsys_common.snapshot import SnapshotHolder

log = logging.getLogger(__name__)

MAX_ID_LEN = 256
MAX_EVENTS = 1000
MAX_K = 1000
MAX_TIMESTAMP = 2**53  # beyond this a JSON client loses precision
MAX_TIMEOUT_MS = 60_000


@dataclass(frozen=True)
class RecommendRequest:
    user_id: str
    k: int = 10
    exclude_seen: bool = True
    exclude_item_ids: Sequence[str] = ()
    timeout_ms: int | None = None
    debug: bool = False
    max_per_genre: int | None = None


@dataclass(frozen=True)
class RecommendedItem:
    item_id: str
    score: float
    sources: tuple[str, ...]
    title: str = ""
    stage_scores: dict[str, float] = field(default_factory=dict)


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


def validate_request(req: RecommendRequest, max_timeout_ms: int = MAX_TIMEOUT_MS) -> None:
    _check_id("user_id", req.user_id)
    if isinstance(req.k, bool) or not 1 <= req.k <= MAX_K:
        raise InvalidRequest("k", f"must be in 1..{MAX_K}, got {req.k}")
    if req.timeout_ms is not None and not 1 <= req.timeout_ms <= max_timeout_ms:
        raise InvalidRequest("timeout_ms", f"must be in 1..{max_timeout_ms}, got {req.timeout_ms}")
    if req.max_per_genre is not None and not 1 <= req.max_per_genre <= MAX_K:
        raise InvalidRequest("max_per_genre", f"must be in 1..{MAX_K}, got {req.max_per_genre}")
    if len(req.exclude_item_ids) > MAX_EVENTS:
        raise InvalidRequest("exclude_item_ids", f"must hold at most {MAX_EVENTS} ids")
    for n, item_id in enumerate(req.exclude_item_ids):
        _check_id(f"exclude_item_ids[{n}]", item_id)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, futures.TimeoutError):
        return "deadline exceeded"
    if isinstance(exc, grpc.RpcError) and isinstance(exc, grpc.Call):
        return f"{exc.code().name.lower()}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


class Admission:
    """Bounded concurrency: a request is admitted at once or refused at once, never queued past its deadline."""

    def __init__(self, max_inflight: int) -> None:
        self.max_inflight = max_inflight
        self._slots = threading.BoundedSemaphore(max_inflight)

    @contextmanager
    def slot(self) -> Iterator[None]:
        if not self._slots.acquire(blocking=False):
            OVERLOADED.inc()
            raise Overloaded(f"the gateway is serving its limit of {self.max_inflight} requests; retry shortly")
        try:
            yield
        finally:
            self._slots.release()


@dataclass(frozen=True)
class BundleView:
    """What the gateway holds of one bundle version; replaced as a whole when a new bundle is published."""

    version: str
    catalog: Catalog
    tables: ItemTables
    history_len: int
    local_sources: tuple[CandidateSource, ...]  # numpy sources over this bundle's tables, run inline

    @classmethod
    def load(cls, bundle: Bundle, config: GatewayConfig) -> BundleView:
        catalog, tables = Catalog.load(bundle), ItemTables.load(bundle)
        return cls(
            version=bundle.version,
            catalog=catalog,
            tables=tables,
            history_len=int(bundle.manifest["history_len"]),
            local_sources=(
                CovisitSource(catalog, tables, config.covisit_candidates),
                ColdStartSource(catalog, tables, config.coldstart_candidates),
                PopularSource(catalog, tables, config.popular_candidates),
            ),
        )


class Recommender:
    """Answers recommendation requests from the user-state store, the bundle's tables and two services.

    Each request takes one BundleView at its start and pins its version in the calls to retrieval
    and ranking, so one answer never mixes two bundle versions.
    """

    def __init__(
        self,
        config: GatewayConfig,
        bundles: SnapshotHolder[BundleView],
        store: UserStore,
        pseudonymizer: Pseudonymizer,
        retrieval: RetrievalClient | ShardedRetrievalClient,
        ranking: RankingClient,
    ) -> None:
        self.config = config
        self.store = store
        # The store only ever sees keyed digests of user and event ids, never the raw ids.
        self.pseudo = pseudonymizer
        self.retrieval = retrieval
        self.ranking = ranking
        self.bundles = bundles
        self.admission = Admission(config.max_inflight)
        # Set on SIGTERM: health turns NOT_SERVING while in-flight requests finish.
        self.draining = threading.Event()
        self._pool = futures.ThreadPoolExecutor(max_workers=config.fanout_threads, thread_name_prefix="fanout")
        # Remote sources run in the pool; local (numpy) ones run inline while the remote calls fly.
        self.remote_sources: list[CandidateSource] = [
            AnnSource(retrieval, config.ann_candidates),
            TrendingSource(store, config.trending_candidates),
        ]

    @property
    def version(self) -> str:
        return self.bundles.get().version

    # -- events ---------------------------------------------------------------------------
    def track(self, events: Sequence[Event]) -> int:
        validate_events(events)
        with timed_store("append"):
            accepted = self.store.append([self.pseudo.event(e) for e in events])
        EVENTS.labels("accepted").inc(accepted)
        EVENTS.labels("duplicate").inc(len(events) - accepted)
        return accepted

    def forget(self, user_id: str) -> int:
        """Erase everything stored for the user (events and dedupe keys); returns the events erased."""
        _check_id("user_id", user_id)
        with timed_store("forget"):
            return self.store.forget(self.pseudo.user_key(user_id))

    # -- recommendations --------------------------------------------------------------------
    def _budget_s(self, req: RecommendRequest, grpc_remaining_s: float | None) -> float:
        budget = (req.timeout_ms or self.config.default_timeout_ms) / 1000
        return min(budget, grpc_remaining_s) if grpc_remaining_s is not None else budget

    def _read_history(self, user_id: str, deadline: float, missing: list[tuple[str, str]]) -> list[Event]:
        budget = (deadline - time.perf_counter()) * self.config.store_budget_share
        future = self._pool.submit(self._recent, user_id)
        try:
            return future.result(timeout=max(budget, 0.0))
        except Exception as exc:  # a slow or failing store: answer as for a new user, and say so
            missing.append(("store", _reason(exc)))
            return []

    def _recent(self, user_id: str) -> list[Event]:
        with timed_store("recent"):
            return self.store.recent(user_id, self.config.max_history)

    def _run_sources(
        self,
        view: BundleView,
        query: SourceQuery,
        deadline: float,
        missing: list[tuple[str, str]],
        timings: dict[str, float],
    ) -> list[SourceResult]:
        started = time.perf_counter()
        budget = max(0.0, (deadline - started) * self.config.sources_budget_share)

        def timed(source: CandidateSource) -> SourceResult:
            t = time.perf_counter()
            try:
                return source.fetch(query, budget)
            finally:
                timings[source.name] = (time.perf_counter() - t) * 1000

        # Each remote call runs in a copy of this request's context, so it carries the request id downstream.
        pending = {self._pool.submit(contextvars.copy_context().run, timed, s): s.name for s in self.remote_sources}
        results: list[SourceResult] = []
        for source in view.local_sources:
            try:
                results.append(timed(source))
            except Exception as exc:
                log.exception("candidate source %s failed", source.name)
                missing.append((source.name, _reason(exc)))
        done, late = futures.wait(pending, timeout=max(0.0, budget - (time.perf_counter() - started)))
        for future in late:
            future.cancel()
            missing.append((pending[future], f"deadline exceeded after {budget * 1000:.1f} ms"))
            timings[pending[future]] = budget * 1000
        for future in done:
            try:
                results.append(future.result())
            except Exception as exc:
                missing.append((pending[future], _reason(exc)))
        for result in results:
            missing.extend(result.missing)
        order = {name: n for n, name in enumerate(self.config.source_priority)}
        return sorted(results, key=lambda r: order.get(r.name, len(order)))

    def _merge(self, results: list[SourceResult]) -> dict[str, dict[str, float]]:
        """item id -> {source: score}, in source-priority order, each source capped at its quota."""
        merged: dict[str, dict[str, float]] = {}
        for result in results:
            quota = self.config.quota(result.name)
            for item_id, score in zip(result.item_ids[:quota], result.scores[:quota], strict=False):
                merged.setdefault(item_id, {})[result.name] = score
        return merged

    @staticmethod
    def _diversify(catalog: Catalog, ranked: list[str], k: int, max_per_genre: int | None) -> list[str]:
        if max_per_genre is None:
            return ranked[:k]
        counts: dict[str, int] = {}
        chosen = []
        for item_id in ranked:
            index = catalog.index_of(item_id)
            genres = catalog.genres[index - 1] if index else ()
            if any(counts.get(g, 0) >= max_per_genre for g in genres):
                continue
            for g in genres:
                counts[g] = counts.get(g, 0) + 1
            chosen.append(item_id)
            if len(chosen) == k:
                break
        return chosen

    def recommend(self, req: RecommendRequest, grpc_remaining_s: float | None = None) -> Recommendation:
        started = time.perf_counter()
        validate_request(req, MAX_TIMEOUT_MS)
        deadline = started + self._budget_s(req, grpc_remaining_s)
        view = self.bundles.get()  # one bundle version for the whole request
        timings: dict[str, float] = {}
        missing: list[tuple[str, str]] = []

        events = self._read_history(self.pseudo.user_key(req.user_id), deadline, missing)
        timings["store"] = (time.perf_counter() - started) * 1000
        recent_ids = [e.item_id for e in events[-view.history_len :]]
        seen = [e.item_id for e in events] if req.exclude_seen else []
        excluded_ids = list(dict.fromkeys([*seen, *req.exclude_item_ids]))
        query = SourceQuery(
            recent_ids=recent_ids,
            history_idx=view.catalog.known(recent_ids),
            excluded_ids=excluded_ids,
            excluded_idx=view.catalog.known(excluded_ids),
            k=req.k,
            bundle_version=view.version,
            catalog=view.catalog,
        )
        t = time.perf_counter()
        merged = self._merge(self._run_sources(view, query, deadline, missing, timings))
        timings["sources"] = (time.perf_counter() - t) * 1000

        t = time.perf_counter()
        candidates = list(merged)
        ranker_scores: np.ndarray | None = None
        degraded = ""
        remaining = deadline - t - self.config.reserve_ms / 1000
        if not candidates:
            degraded = "no candidates"
        elif remaining <= 0:
            degraded = "ranking skipped: budget spent before ranking"
        else:
            try:
                names = self.config.source_priority
                bit = {name: 1 << j for j, name in enumerate(names)}
                bits = [sum(bit.get(s, 0) for s in merged[item_id]) for item_id in candidates]
                scores = self.ranking.rank(recent_ids, candidates, bits, names, view.version, remaining)
                ranker_scores = np.asarray(scores)
            except grpc.RpcError as exc:
                degraded = f"ranking failed: {_reason(exc)}"
        timings["ranking"] = (time.perf_counter() - t) * 1000

        if ranker_scores is None:
            # Fallback order: the merge order (sources by priority, each in its own score order).
            fallback = np.linspace(1.0, 0.0, num=len(candidates), endpoint=False).tolist()
            final = dict(zip(candidates, fallback, strict=True))
        else:
            final = {c: float(s) for c, s in zip(candidates, ranker_scores.tolist(), strict=True) if np.isfinite(s)}
        ranked = sorted(final, key=final.__getitem__, reverse=True)
        chosen = self._diversify(view.catalog, ranked, req.k, req.max_per_genre)
        items = []
        for item_id in chosen:
            stage = dict(merged[item_id])
            if ranker_scores is not None:
                stage["ranker"] = final[item_id]
            items.append(
                RecommendedItem(item_id, final[item_id], tuple(merged[item_id]), view.catalog.title_of(item_id), stage)
            )
        timings["total"] = (time.perf_counter() - started) * 1000
        record_answer(timings, missing, degraded)
        if degraded or missing:
            log.warning("answer partial=%s degraded=%r missing=%s", bool(missing), degraded, missing)
        return Recommendation(
            items=items,
            bundle_version=view.version,
            partial=bool(missing),
            missing=missing,
            degraded=degraded,
            timings_ms={k: round(v, 3) for k, v in timings.items()} if req.debug else {},
        )

    def warm_up(self, rounds: int = 2) -> None:
        """Run a few requests for a user nobody has, so the first real request finds the thread pools
        started, the channels connected and every code path loaded. Failures are fine here."""
        for _ in range(rounds):
            try:
                self.recommend(RecommendRequest(user_id="\x00warm-up", k=10, timeout_ms=1000))
            except Exception as exc:
                log.info("warm-up request failed (%s); serving anyway", _reason(exc))

    def ready(self) -> dict[str, bool]:
        timeout_s = self.config.health_timeout_ms / 1000
        return {
            "gateway": not self.draining.is_set(),
            "retrieval": self.retrieval.healthy(timeout_s),
            "ranking": self.ranking.healthy(timeout_s),
        }

    def close(self) -> None:
        self.bundles.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.store.close()
