"""The shared user-state store: Redis (redis-py), for several gateway replicas.

Durability: the server must run with ``appendonly yes`` and ``appendfsync always``. Redis then
fsyncs the AOF before it sends the reply to a write, so an append that returned survives a
kill -9 of redis-server (and a power cut). ``appendfsync everysec`` could lose the last second of
acknowledged events; WAITAOF (Redis >= 7.2) would allow everysec plus a per-request wait, but
costs a second round trip and is not in Redis 7.0. On open the store reads CONFIG and refuses a
server without these settings (``?check_durability=false`` skips that, e.g. where CONFIG is
disabled on a managed Redis whose persistence you have checked yourself).

Keys (``{U}`` is the pseudonymized user key, a hash tag: one user's keys share a cluster slot)::

    u:{U}:ev    ZSET  score = event timestamp, member = 16-hex arrival seq + JSON [item, event_id, type]
    u:{U}:dd    ZSET  event_id -> ms first seen (the dedupe window; survives trimming of :ev)
    u:{U}:meta  HASH  seq (arrival counter), epoch (random, set when the user's state is created)
    {trending}:z     ZSET item -> score relative to the epoch (see gateway.trending)
    {trending}:meta  HASH epoch, latest

One Lua script per user checks event ids, appends, trims to the newest N and refreshes TTLs,
atomically; a second one updates trending (another slot, so a separate call: a crash between the
two can miss a trending count, never an event). Trending holds item ids only, nothing per user.
An erased user is gone from the dataset at once, and from the AOF files at the next rewrite
(``BGREWRITEAOF``, or automatically per auto-aof-rewrite-percentage).
"""

from __future__ import annotations

import json
import secrets
import time
from collections import defaultdict
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis

from gateway.store import Event, StoreSettings
from gateway.trending import DROP_BELOW, MAX_FUTURE_S, MAX_ITEMS, RESCALE_HALF_LIVES, decayed
from recsys_common.errors import StoreError

MAX_EVENTS_PER_CALL = 2000  # one script call per user holds at most this many events

_APPEND = """
local now, window, maxn, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. (now - window))
local flags, added, ids = {}, 0, 0
for i = 6, #ARGV, 4 do
  local item, ts, eid, typ = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local new = 1
  if eid ~= '' then
    ids = ids + 1
    new = redis.call('ZADD', KEYS[2], 'NX', now, eid)
  end
  if new == 1 then
    redis.call('HSETNX', KEYS[3], 'epoch', ARGV[5])
    local seq = redis.call('HINCRBY', KEYS[3], 'seq', 1)
    redis.call('ZADD', KEYS[1], ts, string.format('%016x', seq) .. cjson.encode({item, eid, typ}))
    added = added + 1
  end
  flags[#flags + 1] = new
end
if added > 0 then
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(maxn + 1))
  if ttl > 0 then
    redis.call('EXPIRE', KEYS[1], ttl)
    redis.call('EXPIRE', KEYS[3], ttl)
  else
    redis.call('PERSIST', KEYS[1])
    redis.call('PERSIST', KEYS[3])
  end
end
if ids > 0 then
  -- dedupe entries are only needed for the window after the newest one (or the user TTL, if shorter)
  local keep = math.ceil(window / 1000)
  if ttl > 0 and ttl < keep then keep = ttl end
  redis.call('EXPIRE', KEYS[2], keep)
end
return flags
"""

_TRENDING = """
local hl, wall_cap = tonumber(ARGV[1]), tonumber(ARGV[2])
local rescale_after, drop_below, max_items = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local epoch = tonumber(redis.call('HGET', KEYS[2], 'epoch') or '')
local latest = tonumber(redis.call('HGET', KEYS[2], 'latest') or '')
for i = 6, #ARGV, 2 do
  local item, ts = ARGV[i], math.min(tonumber(ARGV[i + 1]), wall_cap)
  if epoch == nil then epoch = ts end
  if ts - epoch > rescale_after * hl then
    local factor = 2 ^ ((epoch - ts) / hl)
    local all = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
    for j = 1, #all, 2 do
      local s = tonumber(all[j + 1]) * factor
      if s < drop_below then
        redis.call('ZREM', KEYS[1], all[j])
      else
        redis.call('ZADD', KEYS[1], s, all[j])
      end
    end
    redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(max_items + 1))
    epoch = ts
  end
  local w = 2 ^ ((ts - epoch) / hl)
  if w >= drop_below then redis.call('ZINCRBY', KEYS[1], w, item) end
  if latest == nil or ts > latest then latest = ts end
end
redis.call('HSET', KEYS[2], 'epoch', string.format('%.17g', epoch), 'latest', string.format('%.17g', latest))
return 1
"""

TRENDING_KEYS = ["{trending}:z", "{trending}:meta"]


def user_keys(user_id: str) -> list[str]:
    """Every key that can hold something of this user (forget() deletes exactly these)."""
    return [f"u:{{{user_id}}}:ev", f"u:{{{user_id}}}:dd", f"u:{{{user_id}}}:meta"]


def _split_url(url: str) -> tuple[str, bool]:
    parts = urlsplit(url)
    query = parse_qsl(parts.query)
    check = True
    kept = []
    for key, value in query:
        if key == "check_durability":
            check = value.lower() not in ("0", "false", "no", "off")
        else:
            kept.append((key, value))
    return urlunsplit(parts._replace(query=urlencode(kept))), check


class RedisStore:
    """User state in Redis: shared by every gateway replica, durable with appendfsync always."""

    def __init__(self, url: str, settings: StoreSettings | None = None) -> None:
        self.settings = settings or StoreSettings()
        clean_url, check = _split_url(url)
        parts = urlsplit(clean_url)
        self.url = f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"  # for messages: no password
        self._r = redis.Redis.from_url(clean_url, decode_responses=True, socket_timeout=30)
        self._append = self._r.register_script(_APPEND)
        self._trend = self._r.register_script(_TRENDING)
        try:
            if check:
                self._check_durability()
        except redis.RedisError as exc:
            raise StoreError(f"user-state store {self.url}: {exc}") from exc

    def _check_durability(self) -> None:
        try:
            config = self._r.config_get("append*")
        except redis.ResponseError as exc:  # CONFIG disabled (managed Redis): say so, do not guess
            raise StoreError(
                f"user-state store {self.url}: cannot read CONFIG to check persistence ({exc}); "
                "add ?check_durability=false once you have checked appendonly yes / appendfsync always"
            ) from exc
        if config.get("appendonly") != "yes" or config.get("appendfsync") != "always":
            raise StoreError(
                f"user-state store {self.url} runs with appendonly={config.get('appendonly')!r}, "
                f"appendfsync={config.get('appendfsync')!r}: acknowledged events could be lost. "
                "Run redis-server with --appendonly yes --appendfsync always "
                "(or add ?check_durability=false to accept that)"
            )

    def _error(self, exc: Exception) -> StoreError:
        return StoreError(f"user-state store {self.url}: {type(exc).__name__}: {exc}")

    # -- the contract ------------------------------------------------------------------------------
    def append(self, events: list[Event]) -> int:
        if not events:
            return 0
        s = self.settings
        by_user: dict[str, list[Event]] = defaultdict(list)
        for e in events:
            by_user[e.user_id].append(e)
        now_ms = int(time.time() * 1000)
        # The epoch nonce makes version() unique across a forget() or TTL expiry, which restart seq at 1.
        head: list[str | int] = [now_ms, s.dedupe_window_s * 1000, s.max_events_per_user, s.user_ttl_s or 0]
        head.append(secrets.token_hex(8))
        calls: list[list[Event]] = []
        try:
            pipe = self._r.pipeline(transaction=False)
            for user_id, user_events in by_user.items():
                for lo in range(0, len(user_events), MAX_EVENTS_PER_CALL):
                    chunk = user_events[lo : lo + MAX_EVENTS_PER_CALL]
                    args: list[str | int] = [*head]
                    for e in chunk:
                        args += [e.item_id, int(e.timestamp), e.event_id, e.type]
                    self._append(keys=user_keys(user_id), args=args, client=pipe)
                    calls.append(chunk)
            results = pipe.execute()
            new = [(e.item_id, int(e.timestamp)) for chunk, flags in zip(calls, results, strict=True)
                   for e, flag in zip(chunk, flags, strict=True) if flag == 1]  # fmt: skip
            if new:
                self._feed_trending(new)
        except redis.RedisError as exc:
            raise self._error(exc) from exc
        return len(new)

    def _feed_trending(self, new: list[tuple[str, int]]) -> None:
        s = self.settings
        head = [s.trending_half_life_s, int(time.time()) + MAX_FUTURE_S, RESCALE_HALF_LIVES, DROP_BELOW, MAX_ITEMS]
        pipe = self._r.pipeline(transaction=False)
        for lo in range(0, len(new), 5000):
            args: list[str | int | float] = [*head]
            for item_id, ts in new[lo : lo + 5000]:
                args += [item_id, ts]
            self._trend(keys=TRENDING_KEYS, args=args, client=pipe)
        pipe.execute()

    def recent(self, user_id: str, n: int) -> list[Event]:
        if n <= 0:
            return []
        try:
            rows = self._r.zrange(user_keys(user_id)[0], -n, -1, withscores=True)
        except redis.RedisError as exc:
            raise self._error(exc) from exc
        out = []
        for member, score in rows:
            item_id, event_id, type_ = json.loads(member[16:])
            out.append(Event(user_id, item_id, int(score), event_id, type_))
        return out

    def version(self, user_id: str) -> str:
        """epoch:seq from the user's meta hash, which the append script updates atomically with the events."""
        try:
            epoch, seq = self._r.hmget(user_keys(user_id)[2], ["epoch", "seq"])
        except redis.RedisError as exc:
            raise self._error(exc) from exc
        return "0" if seq is None else f"{epoch or ''}:{seq}"

    def forget(self, user_id: str) -> int:
        keys = user_keys(user_id)
        try:
            pipe = self._r.pipeline(transaction=True)
            pipe.zcard(keys[0])
            pipe.delete(*keys)
            erased, _ = pipe.execute()
        except redis.RedisError as exc:
            raise self._error(exc) from exc
        return int(erased)

    def trending(self, n: int, now: int | None = None) -> list[tuple[str, float]]:
        if n <= 0:
            return []
        try:
            pipe = self._r.pipeline(transaction=True)
            pipe.hmget(TRENDING_KEYS[1], ["epoch", "latest"])
            pipe.zrange(TRENDING_KEYS[0], 0, n - 1, desc=True, withscores=True)
            (epoch, latest), rows = pipe.execute()
        except redis.RedisError as exc:
            raise self._error(exc) from exc
        if epoch is None:
            return []
        at = now if now is not None else float(latest)
        return decayed(rows, float(epoch), at, self.settings.trending_half_life_s)

    def close(self) -> None:
        self._r.close()
        self._r.connection_pool.disconnect()
