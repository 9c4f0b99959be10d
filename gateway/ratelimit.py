"""Per-key rate limits: one token bucket per API key or token subject, refilled on the monotonic clock.

Usage::

    limiter = RateLimiter(rate_per_s=50, burst=10)
    wait_s = limiter.acquire("key:batch-job")
    if wait_s:  # refused: a token is available again in wait_s seconds (the Retry-After)
        ...

A bucket holds at most ``burst`` tokens and gains ``rate_per_s`` tokens a second; a call takes one.
A key that has been idle long enough for its bucket to refill is indistinguishable from a key never
seen, so full buckets can be dropped at any time: that is how memory stays bounded however many
keys (or token subjects) call.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

_EPSILON = 1e-9


class _Bucket:
    __slots__ = ("tokens", "updated")

    def __init__(self, tokens: float, updated: float) -> None:
        self.tokens = tokens
        self.updated = updated


class RateLimiter:
    """Token buckets by key, safe to share between threads (REST and gRPC handlers use one limiter)."""

    def __init__(
        self,
        rate_per_s: float,
        burst: int = 0,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 100_000,
    ) -> None:
        if not rate_per_s > 0:
            raise ValueError(f"rate_per_s must be > 0, got {rate_per_s!r}")
        if burst < 0:
            raise ValueError(f"burst must be >= 0, got {burst!r}")
        self.rate_per_s = float(rate_per_s)
        # 0 = one second's worth of calls (at least one, or no call could ever pass).
        self.burst = burst or max(1, math.ceil(rate_per_s))
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        # One lock for all keys: a check is a few arithmetic operations, far cheaper than the request it guards.
        self._lock = threading.Lock()

    def acquire(self, key: str) -> float:
        """Take one token from key's bucket: 0.0 when admitted, else the seconds until a token is available."""
        with self._lock:
            now = self._clock()
            bucket = self._buckets.get(key)
            if bucket is None:
                if len(self._buckets) >= self.max_keys:
                    self._shrink(now)
                bucket = self._buckets[key] = _Bucket(float(self.burst), now)
            else:
                bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate_per_s)
                bucket.updated = now
            if bucket.tokens >= 1.0 - _EPSILON:  # a token that is whole but for float rounding counts
                bucket.tokens = max(0.0, bucket.tokens - 1.0)
                return 0.0
            return (1.0 - bucket.tokens) / self.rate_per_s

    def __len__(self) -> int:
        return len(self._buckets)

    def _shrink(self, now: float) -> None:
        """Drop the buckets that have refilled; if every key is busy, drop the least recently used half."""
        full = [
            k for k, b in self._buckets.items() if b.tokens + (now - b.updated) * self.rate_per_s >= self.burst
        ]
        for k in full:
            del self._buckets[k]
        if len(self._buckets) >= self.max_keys:
            # A dropped busy key merely gets a fresh burst: a bounded leak, unlike unbounded memory.
            oldest = sorted(self._buckets, key=lambda k: self._buckets[k].updated)
            for k in oldest[: len(oldest) // 2 + 1]:
                del self._buckets[k]
