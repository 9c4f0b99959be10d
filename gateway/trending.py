"""Real-time popularity: exponentially decayed item counts, by event timestamp, that never overflow.

Each event of item i at time t adds ``2 ** ((t - epoch) / half_life_s)`` to i's stored score. All
scores share one epoch, so the stored order is the decayed order at any time, and the decayed
count at ``now`` is ``score * 2 ** ((epoch - now) / half_life_s)``. When an event arrives more than
RESCALE_HALF_LIVES half-lives after the epoch, every score is multiplied by ``2 ** (epoch - t)/h``
and the epoch moves to t (the "epoch rescaling trick"): stored scores stay below about
``2 ** RESCALE_HALF_LIVES`` per event, and items whose count decayed below DROP_BELOW fall out,
which makes the table a sliding window. Both backends apply exactly this arithmetic (the Redis
one in Lua, the SQLite one through :class:`TrendingUpdate`).

Timestamps are clamped to the wall clock plus MAX_FUTURE_S, so one event stamped in the far future
cannot push the epoch ahead and wipe the table.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

RESCALE_HALF_LIVES = 32  # stored per-event weight stays below 2**32: far from float64 limits
DROP_BELOW = 1e-6  # decayed count under which an item leaves the table at a rescale
MAX_ITEMS = 100_000  # the table keeps at most this many items (the best ones) at a rescale
MAX_FUTURE_S = 300  # client clock skew tolerated; later timestamps count as now + 300 s


def clamp_ts(ts: int, wall_now_s: float | None = None) -> int:
    wall = time.time() if wall_now_s is None else wall_now_s
    return min(int(ts), int(wall) + MAX_FUTURE_S)


def decay_factor(epoch: float, now: float, half_life_s: float) -> float:
    """What a stored score is multiplied by to give the decayed count at `now`."""
    return 2.0 ** ((epoch - now) / half_life_s)


@dataclass
class TrendingUpdate:
    """The effect of a batch of events on a table with `epoch` (None: empty table).

    After :meth:`add`, apply in order: if `rescale` is set, multiply every stored score by it
    (dropping items below DROP_BELOW); then add `increments`; then store `epoch` and `latest`.
    """

    epoch: float | None
    latest: float | None
    half_life_s: float
    rescale: float | None = None
    increments: dict[str, float] = field(default_factory=dict)

    def add(self, events: Iterable[tuple[str, int]], wall_now_s: float | None = None) -> TrendingUpdate:
        wall = time.time() if wall_now_s is None else wall_now_s
        for item_id, raw_ts in events:
            ts = clamp_ts(raw_ts, wall)
            if self.epoch is None:
                self.epoch = ts
            if ts - self.epoch > RESCALE_HALF_LIVES * self.half_life_s:
                factor = 2.0 ** ((self.epoch - ts) / self.half_life_s)
                self.rescale = factor if self.rescale is None else self.rescale * factor
                self.increments = {k: v * factor for k, v in self.increments.items() if v * factor >= DROP_BELOW}
                self.epoch = ts
            weight = 2.0 ** ((ts - self.epoch) / self.half_life_s)
            if weight >= DROP_BELOW:
                self.increments[item_id] = self.increments.get(item_id, 0.0) + weight
            self.latest = ts if self.latest is None else max(self.latest, ts)
        return self


def decayed(
    rows: Iterable[tuple[str, float]], epoch: float | None, now: float, half_life_s: float
) -> list[tuple[str, float]]:
    """Stored (item, score) rows, best first, as decayed counts at `now`."""
    if epoch is None:
        return []
    factor = decay_factor(epoch, now, half_life_s)
    out = [(item, score * factor) for item, score in rows]
    return [(item, value) for item, value in out if math.isfinite(value)]
