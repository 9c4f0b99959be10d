"""RetrievalConfig: every knob of the retrieval service, with defaults that run on a laptop."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from recsys_common.config import check_positive, from_env


@dataclass(frozen=True)
class RetrievalConfig:
    bundles_dir: Path = Path("var/bundles")
    host: str = "127.0.0.1"
    port: int = 50051
    max_workers: int = 8
    # One thread per query: PERF-NOTES measured 2 OpenMP/ORT threads as slower on shared cores.
    search_threads: int = 1
    max_k: int = 10_000
    max_batch: int = 256

    def __post_init__(self) -> None:
        for name in ("max_workers", "search_threads", "max_k", "max_batch"):
            check_positive(f"RECSYS_RETRIEVAL_{name.upper()}", getattr(self, name))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> RetrievalConfig:
        return from_env(cls, "RECSYS_RETRIEVAL_", environ)
