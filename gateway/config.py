"""GatewayConfig: every knob of the gateway, with defaults that run on a laptop."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from recsys_common.config import ConfigError, check_positive, from_env


@dataclass(frozen=True)
class GatewayConfig:
    bundles_dir: Path = Path("var/bundles")
    # A directory (embedded SQLite store at DIR/events.db) or a store URL (sqlite:///PATH, redis://host:port/db).
    state: str = "var/state"
    # "dev": no keys needed (a pseudonymization key is made once in the state dir);
    # "production": refuses to start without user_key (or user_key_file).
    mode: str = "dev"
    # HMAC key that pseudonymizes user and event ids at rest (>= 32 characters); never logged.
    user_key: str | None = field(default=None, repr=False)
    user_key_file: Path | None = None
    # User state: newest N events kept per user, event-id dedupe window, optional TTL for inactive users.
    max_events_per_user: int = 200
    dedupe_window_s: int = 7 * 86400
    user_ttl_s: int | None = None
    trending_half_life_s: int = 3600
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 50050
    # One address, or the shards' addresses separated by commas (shard i of n at position i).
    retrieval_addr: str = "127.0.0.1:50051"
    ranking_addr: str = "127.0.0.1:50052"
    default_timeout_ms: int = 200
    # Stage budgets: the store read may use this share of the request's budget; the sources this
    # share of what is left; ranking the rest minus reserve_ms kept for assembling the answer.
    store_budget_share: float = 0.25
    sources_budget_share: float = 0.5
    reserve_ms: float = 2.0
    # Candidates asked of each source (its quota in the merge; ANN and popular are raised to k).
    ann_candidates: int = 100  # the exporter trains the ranker on this plan (ExportConfig.cand_ann)
    covisit_candidates: int = 100
    trending_candidates: int = 50
    # The trending list (the same for every user) is re-read from the store at most this often.
    trending_max_age_ms: int = 1000
    coldstart_candidates: int = 50
    popular_candidates: int = 50
    usercf_candidates: int = 50
    # User-based CF (gateway/usercf.py): recently active users kept in this process (0 = source off: the
    # default while the exporter's report, which replays both protocols through it, shows no gain: ML-100K
    # HR@10 loo 0.2280 -> 0.2280, replay 0.2344 -> 0.2342), neighbours asked per request, newest items kept per
    # user, and idle time after which a user is dropped.
    usercf_users: int = 0
    usercf_neighbours: int = 20
    usercf_items_per_user: int = 20
    usercf_max_idle_s: float = 3600.0
    # Merge order, which is also the fallback order when ranking is unavailable.
    source_priority: tuple[str, ...] = ("ann", "covisit", "usercf", "trending", "coldstart", "popular")
    # Answer cache (gateway/cache.py): complete answers kept (0 = off), and for how long at most
    # (bounds how stale trending and user-based CF, which follow other users' events, may be in a hit).
    answer_cache_size: int = 0
    answer_cache_ttl_s: float = 30.0
    # Requests in flight beyond this are refused at once (503 / RESOURCE_EXHAUSTED), not queued. By Little's law
    # the last admitted request waits about max_inflight / throughput: keep that well inside the default budget.
    # More only shares the same CPU among more requests, so all of them overrun their budgets (before batched
    # calls, 32 in flight gave p99 337 ms at 160/s). With batched calls, ML-100K on 2 cores serves ~350/s, so 24
    # wait ~70 ms at most, inside the 200 ms default budget. bench/load.py, 12 vs 24, two rounds each: at 300/s
    # 12 refused 0.2 % of requests in 2 of 4 steps (brief stalls of the shared machine), 24 none in 4, p99
    # 22-30 ms; at 400/s 24 refused 0.6-2.4 % (12: 4.5-10 %) with p99 74-81 ms, once 142 ms, and no answer
    # flagged partial or degraded.
    max_inflight: int = 24
    # Calls to retrieval and ranking made in one turn of the core's loop (concurrent requests) go out as one
    # BatchSearch / BatchRank of at most this many (gateway/batching.py); 1 sends every call on its own.
    max_batch: int = 16
    # No new call to a service leaves while this many are out; the calls made meanwhile wait and leave as one
    # batch when one comes back (0: no limit; batches then form only within one loop turn). bench/load.py, ML-100K,
    # 300 requests/s: 0 gave 1.3 requests per call, 2 gave 1.6 (search) and 1.9 (rank), 1 gave 1.6 and 2.6;
    # 2 keeps one slow call (k=1000, a hedge) from holding everyone's.
    max_calls_in_flight: int = 2
    # Worker threads for blocking store calls (the fan-out itself runs on the core's event loop).
    fanout_threads: int = 64
    # Events read per request: all of them are excluded as seen; the newest history_len feed the models.
    max_history: int = 1000
    health_timeout_ms: int = 500
    # How often CURRENT is checked for a newly published bundle (0 = never: serve the first one).
    # Slower than the services' 1 s, so the gateway usually moves last: retrieval and ranking keep
    # answering for the previous version, which the gateway pins until it swaps itself.
    poll_interval_s: float = 2.0
    # SIGTERM: health NOT_SERVING at once, new connections refused, in-flight requests finish within this.
    grace_s: float = 5.0
    # Authentication (SECURITY.md): off when neither keys nor a JWT key is set (dev mode's default);
    # production mode refuses to start without one. Key files are re-read when they change.
    # Lines of `<sha256-hex> <principal> <scope,scope>` (`recsys keys new-api-key` makes them).
    api_keys_file: Path | None = None
    # JWT bearer tokens: PEM public key(s) (Ed25519, RSA, EC) or HMAC secret(s), one or the other.
    jwt_public_key_file: Path | None = None
    jwt_secret_file: Path | None = None
    # Pinned algorithms; empty = the key type's own (EdDSA, RS256, ES256, HS256). Never taken from the token.
    jwt_algorithms: tuple[str, ...] = ()
    jwt_audience: str = ""
    jwt_issuer: str = ""
    jwt_leeway_s: float = 30.0
    # Per-principal token bucket (per client address with auth off); 0 = no limit. Burst 0 = one second's worth.
    rate_limit_per_s: float = 0.0
    rate_limit_burst: int = 0
    # TLS material and the bundle-verification (Ed25519 public) key: required in production mode.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None
    bundle_public_key_file: Path | None = None

    def __post_init__(self) -> None:
        for name in (
            "default_timeout_ms",
            "ann_candidates",
            "covisit_candidates",
            "trending_candidates",
            "coldstart_candidates",
            "popular_candidates",
            "usercf_candidates",
            "usercf_neighbours",
            "usercf_items_per_user",
            "usercf_max_idle_s",
            "answer_cache_ttl_s",
            "max_events_per_user",
            "dedupe_window_s",
            "trending_half_life_s",
            "max_inflight",
            "max_batch",
            "fanout_threads",
            "max_history",
            "health_timeout_ms",
            "grace_s",
        ):
            check_positive(f"RECSYS_GATEWAY_{name.upper()}", getattr(self, name))
        if self.mode not in ("dev", "production"):
            raise ConfigError(f"Config 'RECSYS_GATEWAY_MODE' has value {self.mode!r}. Must be one of dev, production.")
        for name in (
            "jwt_leeway_s",
            "rate_limit_per_s",
            "rate_limit_burst",
            "usercf_users",
            "answer_cache_size",
            "trending_max_age_ms",
            "max_calls_in_flight",
        ):
            value = getattr(self, name)
            if value < 0:
                raise ConfigError(f"Config 'RECSYS_GATEWAY_{name.upper()}' has value {value!r}. Must be >= 0.")
        if self.jwt_public_key_file and self.jwt_secret_file:
            raise ConfigError(
                "Config 'RECSYS_GATEWAY_JWT_PUBLIC_KEY_FILE' and 'RECSYS_GATEWAY_JWT_SECRET_FILE' are both set. "
                "Use one of them."
            )
        if (self.jwt_public_key_file or self.jwt_secret_file) and not self.jwt_audience:
            raise ConfigError("Config 'RECSYS_GATEWAY_JWT_AUDIENCE' is not set. JWT verification needs an audience.")
        for name in ("store_budget_share", "sources_budget_share"):
            value = getattr(self, name)
            if not 0 < value < 1:
                raise ConfigError(
                    f"Config 'RECSYS_GATEWAY_{name.upper()}' has value {value!r}. Must be between 0 and 1."
                )

    def quota(self, source: str) -> int:
        """Candidates a source may contribute to the merge."""
        return int(getattr(self, f"{source}_candidates", self.ann_candidates))

    @property
    def retrieval_addrs(self) -> list[str]:
        """The retrieval shards' addresses (one when the index is not sharded)."""
        return [a.strip() for a in self.retrieval_addr.split(",") if a.strip()]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> GatewayConfig:
        return from_env(cls, "RECSYS_GATEWAY_", environ)
