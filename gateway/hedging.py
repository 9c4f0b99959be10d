"""Hedged gRPC calls: after the observed p95 latency, send a second copy; take the first good answer.

gRPC Python has no built-in hedging. A Hedger learns a call's latency distribution and says when a
copy is worth sending; a token budget keeps the extra calls under `max_extra_ratio` of all calls,
so a slow backend is never hit with a storm of duplicates. The loser is cancelled.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TypeVar

import grpc
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

    def call(self, start: Callable[[float], grpc.Future], timeout_s: float) -> object:
        """Run start(timeout_s) -> grpc future; hedge once after the learned delay; return the first good result."""
        t0 = time.perf_counter()
        first = start(timeout_s)
        delay = self._delay_s
        if delay is None or delay >= timeout_s:
            result = first.result()
            self.record(time.perf_counter() - t0)
            return result
        try:
            result = first.result(timeout=delay)
            self.record(time.perf_counter() - t0)
            return result
        except grpc.FutureTimeoutError:
            pass
        if not self.take_token():
            result = first.result()
            self.record(time.perf_counter() - t0)
            return result
        second = start(max(0.0, timeout_s - (time.perf_counter() - t0)))
        finished = threading.Event()
        first.add_done_callback(lambda _: finished.set())
        second.add_done_callback(lambda _: finished.set())
        calls = [first, second]
        while True:
            finished.wait(0.005)
            finished.clear()
            for f in calls:
                if f.done() and not f.cancelled() and f.exception() is None:
                    for other in calls:
                        if other is not f:
                            other.cancel()
                    self.record(time.perf_counter() - t0)
                    return f.result()
            if all(f.done() for f in calls):
                return first.result()  # both failed: raise the first call's error
