"""GatewayConfig: every knob of the gateway, with defaults that run on a laptop."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from recsys_common.config import ConfigError, check_positive, from_env


@dataclass(frozen=True)
class GatewayConfig:
    bundles_dir: Path = Path("var/bundles")
    # A directory (embedded SQLite store at DIR/events.db) or a store URL (sqlite:///PATH).
    state: str = "var/state"
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 50050
    retrieval_addr: str = "127.0.0.1:50051"
    ranking_addr: str = "127.0.0.1:50052"
    default_timeout_ms: int = 200
    max_timeout_ms: int = 60_000
    # Share of the request budget the retrieval call may use; ranking gets what is left.
    retrieval_budget_share: float = 0.6
    # Candidates asked of each source (raised to k when k is larger).
    ann_candidates: int = 200
    covisit_candidates: int = 100
    popular_candidates: int = 50
    # Events read per request: all of them are excluded as seen; the newest history_len feed the models.
    max_history: int = 1000
    health_timeout_ms: int = 500

    def __post_init__(self) -> None:
        for name in (
            "default_timeout_ms",
            "max_timeout_ms",
            "ann_candidates",
            "covisit_candidates",
            "popular_candidates",
            "max_history",
            "health_timeout_ms",
        ):
            check_positive(f"RECSYS_GATEWAY_{name.upper()}", getattr(self, name))
        if not 0 < self.retrieval_budget_share < 1:
            raise ConfigError(
                f"Config 'RECSYS_GATEWAY_RETRIEVAL_BUDGET_SHARE' has value {self.retrieval_budget_share!r}. "
                "Must be between 0 and 1."
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> GatewayConfig:
        return from_env(cls, "RECSYS_GATEWAY_", environ)
