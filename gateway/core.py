"""Recommender: the gateway's pure core. Reads the user's events, fans out to candidate sources,
merges, ranks within the request's budget, and says honestly what was left out.

Budget: the request's deadline is split into stages. The store read may use `store_budget_share`
of it; the sources run concurrently and may use `sources_budget_share` of what is left; ranking
gets the rest minus `reserve_ms` for assembling the answer. A late or failed stage is dropped and
named (`missing` for sources and the store, `degraded` for ranking); the popular source is local
and cannot be late, so an answer always comes.

Concurrency: the core runs every request on one asyncio event loop in its own thread ("gateway-core").
The remote sources and ranking are grpc.aio calls on that loop and the local numpy sources run inline
between them, so a request's fan-out costs no thread hand-offs (on a GIL-bound process each hand-off
is a wake-up and a wait for the lock). Only blocking store calls leave the loop, for a worker thread,
so that a frozen store costs its budget and nothing more. Both front doors run on the same loop: REST
(uvicorn) and gRPC (a grpc.aio server); only tests and benchmarks submit from other threads.

The transports (rest.py, servicer.py) only convert and admit; every rule about requests is here.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import numpy as np

from gateway.cache import AnswerCache, AnswerKey
from gateway.clients import RankingClient, RetrievalClient, ShardedRetrievalClient
from gateway.config import GatewayConfig
from gateway.metrics import (
    ANSWER_CACHE_HIT_LATENCY,
    ANSWER_CACHE_NOT_STORED,
    EVENTS,
    OVERLOADED,
    record_answer,
    timed_store,
)
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
from gateway.usercf import ActiveUsers, UserCFSource
from recsys_common.bundle import Bundle
from recsys_common.catalog import Catalog
from recsys_common.errors import InvalidRequest, Overloaded
from recsys_common.features import ItemTables
from recsys_common.snapshot import SnapshotHolder

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_ID_LEN = 256
MAX_EVENTS = 1000
MAX_K = 1000
MAX_TIMESTAMP = 2**53  # beyond this a JSON client loses precision
MAX_TIMEOUT_MS = 60_000
# Requests the gateway makes to itself before serving (they show in its metrics like any other).
WARM_UP_ROUNDS = 2
# Event-loop turns a request yields so its remote calls are sent before the local sources run.
SEND_TURNS = 6


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


@dataclass(frozen=True)
class Merged:
    """The sources' candidates merged: de-duplicated ids in source-priority order; bit j of bits[i] says
    names[j] proposed item_ids[i] (RankRequest's columns), and scores holds each source's own scores."""

    item_ids: list[str]
    bits: list[int]
    names: tuple[str, ...]
    scores: dict[str, dict[str, float]]  # source name -> {item id: that source's score}

    @classmethod
    def of(cls, lists: Sequence[tuple[str, Sequence[str], Sequence[float]]]) -> Merged:
        """From (source name, item ids, scores) in priority order; ids already cut to the source's quota."""
        names = tuple(dict.fromkeys(name for name, _, _ in lists))
        position: dict[str, int] = {}  # item id -> its place in the merge (dicts keep insertion order)
        bits: list[int] = []
        scores: dict[str, dict[str, float]] = {}
        for name, ids, source_scores in lists:  # one pass of dict lookups: 2x faster than numpy's fancy indexing here
            bit = 1 << names.index(name)
            for item_id in ids:
                n = position.get(item_id)
                if n is None:
                    position[item_id] = len(bits)
                    bits.append(bit)
                else:
                    bits[n] |= bit
            scores.setdefault(name, {}).update(zip(ids, source_scores, strict=False))
        return cls(list(position), bits, names, scores)

    def stage_scores(self, item_id: str) -> dict[str, float]:
        """{source: its score} for every source that proposed item_id, in priority order."""
        return {name: self.scores[name][item_id] for name in self.names if item_id in self.scores[name]}


@dataclass
class _UserState:
    """What the store read of a request found: the user's events, or a cached answer for their version."""

    events: list[Event]
    version: str | None = None  # the store's version of the user, read before the events (None: cache off)
    cached: Recommendation | None = None


def _check_id(field_name: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise InvalidRequest(field_name, "must be a non-empty string")
    if len(value) > MAX_ID_LEN:
        raise InvalidRequest(field_name, f"must be at most {MAX_ID_LEN} characters, got {len(value)}")


def check_event_count(count: int) -> None:
    """The batch size rule alone: a transport can apply it before converting a batch of any size."""
    if not 1 <= count <= MAX_EVENTS:
        raise InvalidRequest("events", f"must hold 1..{MAX_EVENTS} events, got {count}")


def validate_events(events: Sequence[Event]) -> None:
    check_event_count(len(events))
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
    if isinstance(exc, TimeoutError):
        return "deadline exceeded"
    if isinstance(exc, grpc.aio.AioRpcError) or (isinstance(exc, grpc.RpcError) and isinstance(exc, grpc.Call)):
        return f"{exc.code().name.lower()}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop  # uvicorn[standard] brings it: a faster loop for the same asyncio code
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class CoreLoop:
    """The event loop the core runs on, in its own thread; other threads and loops submit coroutines to it.

    A submitted coroutine runs in a copy of the submitter's context, so the request id (recsys_common.logs)
    follows a request from the transport to the calls it makes.
    """

    def __init__(self, blocking_threads: int) -> None:
        self.loop = _new_loop()
        # Blocking store calls (asyncio.to_thread) run here; sized so a frozen store cannot starve the rest.
        self.executor = futures.ThreadPoolExecutor(max_workers=blocking_threads, thread_name_prefix="blocking")
        self.loop.set_default_executor(self.executor)
        self.thread = threading.Thread(target=self.loop.run_forever, name="gateway-core", daemon=True)
        self.thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> futures.Future[T]:
        """Run coro on the loop; a concurrent Future of its result (thread-safe, from anywhere)."""
        context = contextvars.copy_context()
        result: futures.Future[T] = futures.Future()

        def start() -> None:
            task = self.loop.create_task(coro, context=context)

            def done(t: asyncio.Task[T]) -> None:
                if t.cancelled():
                    result.cancel()
                elif (exc := t.exception()) is not None:
                    result.set_exception(exc)
                else:
                    result.set_result(t.result())

            task.add_done_callback(done)

        self.loop.call_soon_threadsafe(start, context=context)
        return result

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """From a thread other than the loop's: block until coro, run on the loop, is done."""
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError("CoreLoop.run called on the loop's own thread; await the coroutine instead")
        return self.submit(coro).result()

    async def run_async(self, coro: Coroutine[Any, Any, T]) -> T:
        """From any coroutine: await coro on the core loop (directly when already on it)."""
        if asyncio.get_running_loop() is self.loop:
            return await coro
        return await asyncio.wrap_future(self.submit(coro))

    def close(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=5)
        self.executor.shutdown(wait=False, cancel_futures=True)


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
        self.core = CoreLoop(config.fanout_threads)
        # Remote sources are tasks on the core loop; local (numpy) ones run inline while the remote calls fly.
        self.remote_sources: list[CandidateSource] = [
            AnnSource(retrieval, config.ann_candidates),
            TrendingSource(store, config.trending_candidates, config.trending_max_age_ms / 1000),
        ]
        # User-based CF holds state across bundle versions (the recently active users), so it lives here,
        # and runs as a task under the sources' budget like the remote ones (a search over many users).
        self.active_users: ActiveUsers | None = None
        if config.usercf_users > 0:
            self.active_users = ActiveUsers(config.usercf_users, config.usercf_items_per_user, config.usercf_max_idle_s)
            self.remote_sources.append(
                UserCFSource(self.active_users, bundles.get, config.usercf_candidates, config.usercf_neighbours)
            )
        self.cache: AnswerCache[Recommendation] | None = None
        if config.answer_cache_size > 0:
            self.cache = AnswerCache(config.answer_cache_size, config.answer_cache_ttl_s)

    @property
    def version(self) -> str:
        return self.bundles.get().version

    # -- events ---------------------------------------------------------------------------
    def track(self, events: Sequence[Event]) -> int:
        validate_events(events)
        stored = [self.pseudo.event(e) for e in events]
        with timed_store("append"):
            accepted = self.store.append(stored)
        EVENTS.labels("accepted").inc(accepted)
        EVENTS.labels("duplicate").inc(len(events) - accepted)
        if self.active_users is not None and accepted:
            view = self.bundles.get()
            by_user: dict[str, list[Event]] = {}
            for e in stored:
                by_user.setdefault(e.user_id, []).append(e)
            for user_key, user_events in by_user.items():
                user_events.sort(key=lambda e: e.timestamp)
                self.active_users.append(user_key, [e.item_id for e in user_events], view)
        return accepted

    def forget(self, user_id: str) -> int:
        """Erase everything stored for the user (events and dedupe keys); returns the events erased."""
        _check_id("user_id", user_id)
        user_key = self.pseudo.user_key(user_id)
        with timed_store("forget"):
            erased = self.store.forget(user_key)
        if self.active_users is not None:
            self.active_users.forget(user_key)
        if self.cache is not None:
            self.cache.forget_user(user_key)
        return erased

    # -- recommendations --------------------------------------------------------------------
    def _budget_s(self, req: RecommendRequest, grpc_remaining_s: float | None) -> float:
        budget = (req.timeout_ms or self.config.default_timeout_ms) / 1000
        return min(budget, grpc_remaining_s) if grpc_remaining_s is not None else budget

    async def _read_history(
        self,
        user_id: str,
        deadline: float,
        missing: list[tuple[str, str]],
        lookup: Callable[[str], Recommendation | None] | None = None,
    ) -> _UserState:
        budget = (deadline - time.perf_counter()) * self.config.store_budget_share
        try:
            return await asyncio.wait_for(asyncio.to_thread(self._load_user, user_id, lookup), max(budget, 0.0))
        except Exception as exc:  # a slow or failing store: answer as for a new user, and say so
            missing.append(("store", _reason(exc)))
            return _UserState([])

    def _load_user(self, user_id: str, lookup: Callable[[str], Recommendation | None] | None) -> _UserState:
        if lookup is None:
            return _UserState(self._recent(user_id))
        # The version is read before the events: an event landing in between makes the answer newer
        # than its key says (a later request misses), never older (which a hit could then serve).
        with timed_store("version"):
            version = self.store.version(user_id)
        cached = lookup(version)
        if cached is not None:
            return _UserState([], version, cached)
        return _UserState(self._recent(user_id), version)

    def _recent(self, user_id: str) -> list[Event]:
        with timed_store("recent"):
            return self.store.recent(user_id, self.config.max_history)

    async def _run_sources(
        self,
        view: BundleView,
        query: SourceQuery,
        deadline: float,
        missing: list[tuple[str, str]],
        timings: dict[str, float],
    ) -> list[SourceResult]:
        started = time.perf_counter()
        budget = max(0.0, (deadline - started) * self.config.sources_budget_share)

        async def timed(source: CandidateSource) -> SourceResult:
            t = time.perf_counter()
            try:
                return await source.fetch(query, budget)
            finally:
                timings[source.name] = (time.perf_counter() - t) * 1000

        pending = {asyncio.ensure_future(timed(s)): s.name for s in self.remote_sources}
        # Let the remote calls reach the wire (a few loop turns: task, shard fan-out, the coalescer's flush and
        # send task, hedger, grpc's own task) before the local sources hold the loop for their share of a ms.
        for _ in range(SEND_TURNS):
            await asyncio.sleep(0)
        results: list[SourceResult] = []
        for source in view.local_sources:
            try:
                results.append(await timed(source))
            except Exception as exc:
                log.exception("candidate source %s failed", source.name)
                missing.append((source.name, _reason(exc)))
        left = max(0.0, budget - (time.perf_counter() - started))
        done, late = await asyncio.wait(pending, timeout=left) if pending else (set(), set())
        for task in late:
            task.cancel()
            missing.append((pending[task], f"deadline exceeded after {budget * 1000:.1f} ms"))
            timings[pending[task]] = budget * 1000
        for task in done:
            exc = task.exception()
            if exc is None:
                results.append(task.result())
            else:
                missing.append((pending[task], _reason(exc)))
        for result in results:
            missing.extend(result.missing)
        order = {name: n for n, name in enumerate(self.config.source_priority)}
        return sorted(results, key=lambda r: order.get(r.name, len(order)))

    def _merge(self, results: list[SourceResult]) -> Merged:
        """De-duplicated candidates in source-priority order, each source capped at its quota."""
        return Merged.of([(r.name, r.item_ids[: self.config.quota(r.name)], r.scores) for r in results])

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
        """From a thread (warm-up, tests, benchmarks): the answer, computed on the core loop."""
        return self.core.run(self._recommend(req, grpc_remaining_s))

    async def recommend_async(self, req: RecommendRequest, grpc_remaining_s: float | None = None) -> Recommendation:
        """From a coroutine on any loop (REST runs on the core loop itself: no hand-off at all)."""
        return await self.core.run_async(self._recommend(req, grpc_remaining_s))

    async def _recommend(self, req: RecommendRequest, grpc_remaining_s: float | None) -> Recommendation:
        started = time.perf_counter()
        validate_request(req, MAX_TIMEOUT_MS)
        deadline = started + self._budget_s(req, grpc_remaining_s)
        view = self.bundles.get()  # one bundle version for the whole request
        timings: dict[str, float] = {}
        missing: list[tuple[str, str]] = []

        user_key = self.pseudo.user_key(req.user_id)
        cache = self.cache

        def lookup(version: str) -> Recommendation | None:
            return None if cache is None else cache.get(AnswerKey.of(req, user_key, version, view.version), view)

        state = await self._read_history(user_key, deadline, missing, lookup if cache is not None else None)
        timings["store"] = (time.perf_counter() - started) * 1000
        if state.cached is not None:
            return self._cached_answer(state.cached, req, started, timings)
        events = state.events
        recent_ids = [e.item_id for e in events[-view.history_len :]]
        if self.active_users is not None and events and view is self.bundles.get():
            # The store's history is the truth for this user, whichever replica took their events.
            self.active_users.observe(user_key, [e.item_id for e in events], view)
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
            user_key=user_key,
        )
        t = time.perf_counter()
        results = await self._run_sources(view, query, deadline, missing, timings)
        merged = self._merge(results)
        # The user tower's output as retrieval computed it (same pinned version): ranking need not run it again.
        user_vector = next((r.query_vector for r in results if r.query_vector), ())
        timings["sources"] = (time.perf_counter() - t) * 1000

        t = time.perf_counter()
        candidates = merged.item_ids
        ranker_scores: np.ndarray | None = None
        degraded = ""
        remaining = deadline - t - self.config.reserve_ms / 1000
        if not candidates:
            degraded = "no candidates"
        elif remaining <= 0:
            degraded = "ranking skipped: budget spent before ranking"
        else:
            try:
                scores = await self.ranking.rank(
                    recent_ids, candidates, merged.bits, merged.names, view.version, remaining, user_vector
                )
                if len(scores) == len(candidates):
                    ranker_scores = np.asarray(scores, dtype=np.float64)
                else:
                    degraded = f"ranking failed: {len(scores)} scores for {len(candidates)} candidates"
            except grpc.RpcError as exc:
                degraded = f"ranking failed: {_reason(exc)}"
        timings["ranking"] = (time.perf_counter() - t) * 1000

        # Without ranking: the merge order (sources by priority, each in its own score order).
        fallback = ranker_scores is None
        final = np.linspace(1.0, 0.0, num=len(candidates), endpoint=False) if fallback else ranker_scores
        rankable = np.flatnonzero(np.isfinite(final))  # unknown to the ranker's bundle: -inf, left out
        order = rankable[np.argsort(-final[rankable], kind="stable")]  # ties keep the merge order
        if req.max_per_genre is None:
            order = order[: req.k]
        chosen = self._diversify(view.catalog, [candidates[i] for i in order], req.k, req.max_per_genre)
        position = {candidates[i]: int(i) for i in order}
        items = []
        for item_id in chosen:
            score = float(final[position[item_id]])
            stage = merged.stage_scores(item_id)
            sources = tuple(stage)
            if ranker_scores is not None:
                stage["ranker"] = score
            items.append(RecommendedItem(item_id, score, sources, view.catalog.title_of(item_id), stage))
        timings["total"] = (time.perf_counter() - started) * 1000
        record_answer(timings, missing, degraded)
        if degraded or missing:
            log.warning("answer partial=%s degraded=%r missing=%s", bool(missing), degraded, missing)
        answer = Recommendation(
            items=items,
            bundle_version=view.version,
            partial=bool(missing),
            missing=missing,
            degraded=degraded,
            timings_ms={k: round(v, 3) for k, v in timings.items()} if req.debug else {},
        )
        if cache is not None and state.version is not None:
            # Partial and degraded answers are not kept: the next request may well get the whole answer.
            if missing or degraded:
                ANSWER_CACHE_NOT_STORED.labels("degraded" if degraded else "partial").inc()
            elif view is not self.bundles.get():
                ANSWER_CACHE_NOT_STORED.labels("bundle_swapped").inc()
            else:
                cache.put(AnswerKey.of(req, user_key, state.version, view.version), view, answer)
        return answer

    @staticmethod
    def _cached_answer(
        cached: Recommendation, req: RecommendRequest, started: float, timings: dict[str, float]
    ) -> Recommendation:
        elapsed_s = time.perf_counter() - started
        ANSWER_CACHE_HIT_LATENCY.observe(elapsed_s)
        if not req.debug:
            return cached
        # A hit's own timings (store = the version read and lookup), not those of the request that computed it.
        timings["cache_hit"] = timings["total"] = elapsed_s * 1000
        return dataclasses.replace(cached, timings_ms={k: round(v, 3) for k, v in timings.items()})

    def warm_up(self, rounds: int = WARM_UP_ROUNDS) -> None:
        """Run a few requests for a user nobody has, so the first real request finds the thread pools
        started, the channels connected and every code path loaded. Failures are fine here."""
        for _ in range(rounds):
            try:
                self.recommend(RecommendRequest(user_id="\x00warm-up", k=10, timeout_ms=1000))
            except Exception as exc:
                log.info("warm-up request failed (%s); serving anyway", _reason(exc))

    def ready(self) -> dict[str, bool]:
        timeout_s = self.config.health_timeout_ms / 1000

        async def check() -> tuple[bool, bool]:
            return await asyncio.gather(self.retrieval.healthy(timeout_s), self.ranking.healthy(timeout_s))

        retrieval, ranking = self.core.run(check())
        return {"gateway": not self.draining.is_set(), "retrieval": retrieval, "ranking": ranking}

    def close(self) -> None:
        self.bundles.stop()
        try:
            self.core.run(self._close_clients())
        except Exception as exc:  # closing anyway
            log.info("closing the service channels failed: %s", _reason(exc))
        self.core.close()
        self.store.close()

    async def _close_clients(self) -> None:
        await self.retrieval.close()
        await self.ranking.close()
