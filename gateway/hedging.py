"""Hedged gRPC calls: after the observed p95 latency, send a second copy; take the first good answer.

gRPC Python has no built-in hedging. A Hedger learns a call's latency distribution and says when a
copy is worth sending; a token budget keeps the extra calls under `max_extra_ratio` of all calls,
so a slow backend is never hit with a storm of duplicates. The loser is cancelled.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

import numpy as np

T = TypeVar("T")


class Hedger:
    def __init__(
        self, quantile: float = 0.95, window: int = 512, min_samples: int = 64, max_extra_ratio: float = 0.05
    ) -> None:
        self.quantile = quantile
        self.min_samples = min_samples
        self.max_extra_ratio = max_extra_ratio
        self._latencies: deque[float] = deque(maxlen=window)
        self._lock = threading.Lock()
        self._delay_s: float | None = None
        self._tokens = 0.0
        self.calls = 0
        self.hedged = 0

    def delay_s(self) -> float | None:
        """Seconds to wait before hedging; None while too few latencies have been seen."""
        return self._delay_s

    def record(self, latency_s: float) -> None:
        with self._lock:
            self._latencies.append(latency_s)
            self.calls += 1
            # Each call earns a fraction of a hedge; a hedge spends one whole token.
            self._tokens = min(self._tokens + self.max_extra_ratio, 10.0)
            if len(self._latencies) >= self.min_samples and self.calls % 16 == 0:
                self._delay_s = float(np.quantile(np.fromiter(self._latencies, float), self.quantile))

    def take_token(self) -> bool:
        with self._lock:
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                self.hedged += 1
                return True
            return False

    async def call(self, start: Callable[[float], Awaitable[T]], timeout_s: float) -> T:
        """Await start(timeout_s) (one call); hedge once after the learned delay; return the first good result.

        Runs on the event loop that owns the channel: no thread is involved, and the loser is cancelled.
        """
        t0 = time.perf_counter()
        first = asyncio.ensure_future(start(timeout_s))
        try:
            delay = self._delay_s
            if delay is not None and delay < timeout_s:
                done, _ = await asyncio.wait({first}, timeout=delay)
                if not done and self.take_token():
                    return await self._race(first, start, timeout_s, t0)
            result = await first
            self.record(time.perf_counter() - t0)
            return result
        finally:
            first.cancel()  # only if we were cancelled (the caller's budget ran out): the call must not outlive it

    async def _race(
        self, first: asyncio.Future[T], start: Callable[[float], Awaitable[T]], timeout_s: float, t0: float
    ) -> T:
        second = asyncio.ensure_future(start(max(0.0, timeout_s - (time.perf_counter() - t0))))
        pending = {first, second}
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for call in done:
                    if call.exception() is None:
                        self.record(time.perf_counter() - t0)
                        return call.result()
            return first.result()  # both failed: raise the first call's error
        finally:
            for call in (first, second):
                call.cancel()  # the loser (a no-op on the winner)
