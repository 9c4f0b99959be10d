"""RankingConfig: every knob of the ranking service, with defaults that run on a laptop."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from recsys_common.config import check_positive, from_env
from recsys_common.service_config import ServiceSettings
from recsys_common.tls import check_service_security


@dataclass(frozen=True)
class RankingConfig(ServiceSettings):
    bundles_dir: Path = Path("var/bundles")
    host: str = "127.0.0.1"
    port: int = 50052
    max_workers: int = 8
    # ORT on one thread: on shared cores two threads were slower and spikier (PERF-NOTES).
    intra_op_threads: int = 1
    max_candidates: int = 5000
    # How often CURRENT is checked for a newly published bundle (0 = never: serve the first one).
    poll_interval_s: float = 1.0
    # Fault drills: added latency on every Rank call (0 = off). Lets a test or a game day show how
    # the gateway answers when ranking is late, against the real process.
    fault_delay_ms: int = 0

    def __post_init__(self) -> None:
        check_service_security("RECSYS_RANKING_", self)
        for name in ("max_workers", "intra_op_threads", "max_candidates", "grace_s"):
            check_positive(f"RECSYS_RANKING_{name.upper()}", getattr(self, name))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> RankingConfig:
        return from_env(cls, "RECSYS_RANKING_", environ)
