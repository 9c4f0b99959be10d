"""The settings every gRPC service shares (retrieval, ranking): operations and security.

Each service's config dataclass inherits these and adds its own; `from_env` reads them under the
service's prefix (RECSYS_RETRIEVAL_GRACE_S, RECSYS_RANKING_TLS_CERT_FILE, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServiceSettings:
    # Prometheus /metrics on this HTTP port (0 = off).
    metrics_port: int = 0
    # SIGTERM: report NOT_SERVING at once, then let in-flight requests finish for up to this long.
    grace_s: float = 5.0
    # "dev" (default): TLS and bundle signatures only when configured. "production": refuses to start
    # without the TLS files and the bundle public key, and serves only signed bundles (SECURITY.md).
    mode: str = "dev"
    # Mutual TLS (recsys_common/tls.py): this server's certificate and key, and the CA that signs clients.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None
    # Ed25519 public key(s), PEM, that bundles must be signed with (recsys_common/signing.py).
    bundle_public_key_file: Path | None = None
