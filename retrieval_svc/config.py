"""RetrievalConfig: every knob of the retrieval service, with defaults that run on a laptop.

Threads (documented choice, see bench/README.md): each search runs on ONE thread (FAISS OpenMP and ONNX
Runtime intra-op both 1; PERF-NOTES measured 2 threads per query as 2x slower on shared cores), and
queries run in parallel across gRPC worker threads instead, because FAISS and ONNX Runtime release the
GIL. max_workers of about 2 per core keeps the cores busy while one worker parses protobuf under the
GIL without stacking up a queue; max_concurrent_rpcs bounds what is admitted beyond that (the rest get
RESOURCE_EXHAUSTED at once instead of waiting past their deadline).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from recsys_common.config import ConfigError, check_positive, from_env
from recsys_common.service_config import ServiceSettings
from recsys_common.tls import check_service_security


@dataclass(frozen=True)
class RetrievalConfig(ServiceSettings):
    bundles_dir: Path = Path("var/bundles")
    host: str = "127.0.0.1"
    port: int = 50051
    max_workers: int = 4
    max_concurrent_rpcs: int = 64
    # One thread per query: PERF-NOTES measured 2 OpenMP/ORT threads as slower on shared cores.
    search_threads: int = 1
    max_k: int = 10_000
    max_batch: int = 256
    # Sum of k over one BatchSearch: bounds the response size (about 20 bytes per item).
    max_batch_items: int = 200_000
    # Ids per exclude list or context.
    max_exclude: int = 100_000
    # "i/n": serve shard i of n (items whose index j has (j - 1) % n == i); "0/1" = the whole index.
    shard: str = "0/1"
    # How often CURRENT is checked for a new bundle (hot swap); 0 disables watching.
    poll_interval_s: float = 1.0
    # Approximate indexes answer by exact search over the eligible items when filters leave this few ...
    exact_max_eligible: int = 8192
    # ... or exclude this share of the index (see retrieval_svc/ann.py).
    exact_min_ratio: float = 0.9
    # gRPC message limits: requests are small (ids, one vector); answers hold up to max_batch_items items.
    max_receive_bytes: int = 4 << 20
    max_send_bytes: int = 16 << 20

    def __post_init__(self) -> None:
        check_service_security("RECSYS_RETRIEVAL_", self)
        for name in (
            "max_workers",
            "max_concurrent_rpcs",
            "search_threads",
            "max_k",
            "max_batch",
            "max_batch_items",
            "max_exclude",
            "max_receive_bytes",
            "max_send_bytes",
            "grace_s",
        ):
            check_positive(f"RECSYS_RETRIEVAL_{name.upper()}", getattr(self, name))
        if self.poll_interval_s < 0:
            raise ConfigError(
                f"Config 'RECSYS_RETRIEVAL_POLL_INTERVAL_S' has value {self.poll_interval_s!r}. Must be >= 0."
            )
        if not 0 < self.exact_min_ratio <= 1:
            raise ConfigError(
                f"Config 'RECSYS_RETRIEVAL_EXACT_MIN_RATIO' has value {self.exact_min_ratio!r}. Must be in (0, 1]."
            )
        parts = self.shard.split("/")
        if len(parts) != 2 or not all(p.isdigit() for p in parts) or not 0 <= int(parts[0]) < int(parts[1]):
            raise ConfigError(f"Config 'RECSYS_RETRIEVAL_SHARD' has value {self.shard!r}. Must be i/n with 0 <= i < n.")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> RetrievalConfig:
        return from_env(cls, "RECSYS_RETRIEVAL_", environ)
