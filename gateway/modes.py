"""What each mode requires before the gateway starts (SECURITY.md, "Modes").

dev (the default): nothing; auth is enforced only if keys are configured, and the default bind
address is loopback. production: authentication keys, the user-id HMAC key, TLS material and the
bundle-verification key must all be configured and readable, or the gateway refuses to start with
one message that names everything missing.
"""

from __future__ import annotations

import os
from pathlib import Path

from gateway.config import GatewayConfig

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _env(field: str) -> str:
    return f"RECSYS_GATEWAY_{field.upper()}"


def _unreadable(path: Path) -> bool:
    return not (Path(path).is_file() and os.access(path, os.R_OK))


def production_problems(config: GatewayConfig) -> list[str]:
    """Everything production mode misses in config, one phrase each; empty when it may start (or in dev mode)."""
    if config.mode != "production":
        return []
    problems = []
    auth_fields = ("api_keys_file", "jwt_public_key_file", "jwt_secret_file")
    if not any(getattr(config, f) for f in auth_fields):
        names = [_env(f) for f in auth_fields]
        problems.append(f"authentication keys ({names[0]}, or {names[1]} / {names[2]})")
    if not config.user_key and not config.user_key_file:
        problems.append(f"the user-id HMAC key ({_env('user_key')} or {_env('user_key_file')})")
    labels = {
        "tls_cert_file": "the TLS certificate",
        "tls_key_file": "the TLS private key",
        "tls_ca_file": "the TLS CA certificate",
        "bundle_public_key_file": "the bundle-verification public key",
    }
    for name, label in labels.items():
        if getattr(config, name) is None:
            problems.append(f"{label} ({_env(name)})")
    for name in (*auth_fields, "user_key_file", *labels):
        path = getattr(config, name)
        if path is not None and _unreadable(path):
            problems.append(f"{_env(name)}={path} (not a readable file)")
    return problems


def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")
