"""Pseudonymization at rest: user ids and event ids become keyed HMAC-SHA256 digests (hex).

The store only ever sees these keys; whoever holds the store but not the key cannot tell which
person a history belongs to, nor test a guessed user id against it. Forgetting a user is
``store.forget(pseudonymizer.user_key(user_id))``.

Usage::

    pseudo = Pseudonymizer(load_user_key(os.environ.get(USER_KEY_ENV), Path("var/state"), "dev"))
    store.append([pseudo.event(e) for e in events])
    store.recent(pseudo.user_key("alice"), 50)

The key comes from config (the environment variable RECSYS_GATEWAY_USER_KEY, or a key file); in
production mode a missing key is an error. In dev mode a random key is made once and kept in the
state directory as ``user.key`` (0600). With a Redis store there is no local state directory to
share between replicas, so dev mode needs the key too (a per-process key would split one user's
history into several).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

from gateway.store import Event
from recsys_common.config import ConfigError

USER_KEY_ENV = "RECSYS_GATEWAY_USER_KEY"
KEY_FILE_NAME = "user.key"
MIN_KEY_CHARS = 32
MODES = ("dev", "production")

log = logging.getLogger(__name__)


class Pseudonymizer:
    """Maps raw ids to stable keyed digests; user and event ids live in separate domains."""

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_KEY_CHARS // 2:
            raise ValueError(f"pseudonymization key must be at least {MIN_KEY_CHARS // 2} bytes, got {len(key)}")
        self._user = hmac.new(key, b"recsys/user\x00", hashlib.sha256)
        self._event = hmac.new(key, b"recsys/event\x00", hashlib.sha256)

    def user_key(self, user_id: str) -> str:
        h = self._user.copy()
        h.update(user_id.encode())
        return h.hexdigest()

    def event_key(self, event_id: str) -> str:
        """An empty event id (no idempotency asked for) stays empty."""
        if not event_id:
            return ""
        h = self._event.copy()
        h.update(event_id.encode())
        return h.hexdigest()

    def event(self, event: Event) -> Event:
        """The event as the store may keep it: user_id and event_id replaced by their keys."""
        return dataclasses.replace(event, user_id=self.user_key(event.user_id), event_id=self.event_key(event.event_id))


def _check_value(value: str, source: str) -> bytes:
    value = value.strip()
    if len(value) < MIN_KEY_CHARS:
        raise ConfigError(
            f"Config {source!r} holds a key of {len(value)} characters. It must have at least {MIN_KEY_CHARS} "
            "(make one with: python -c 'import secrets; print(secrets.token_hex(32))')."
        )
    return value.encode()


def read_key_file(path: Path) -> bytes:
    """A key file holds the key as text (trailing whitespace ignored)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"user key file {path}: {exc.strerror or exc}") from exc
    if Path(path).stat().st_mode & 0o077:
        log.warning("user key file %s is readable by group or others; chmod 600 it", path)
    return _check_value(text, str(path))


def key_dir(state: str) -> Path | None:
    """Where a dev-mode key lives for a store URL: its directory for SQLite, none for Redis."""
    if state.startswith(("redis://", "rediss://")):
        return None
    if state.startswith("sqlite://"):
        return Path(state.removeprefix("sqlite://")).parent
    return Path(state)


def load_user_key(config_value: str | None, state_dir: Path | None, mode: str) -> bytes:
    """The HMAC key: the configured value, else (dev mode only) the state dir's persisted random key.

    config_value is the key itself as text (e.g. RECSYS_GATEWAY_USER_KEY), at least 32 characters.
    """
    if mode not in MODES:
        raise ConfigError(f"Config 'RECSYS_GATEWAY_MODE' has value {mode!r}. Must be one of {', '.join(MODES)}.")
    if config_value:
        return _check_value(config_value, USER_KEY_ENV)
    if mode == "production":
        raise ConfigError(
            f"Config {USER_KEY_ENV!r} is not set. Production mode refuses to start without the key that "
            "pseudonymizes user ids (or give --user-key-file)."
        )
    if state_dir is None:
        raise ConfigError(
            f"Config {USER_KEY_ENV!r} is not set and there is no local state directory to keep a dev key in "
            "(Redis store): set it, with the same value on every replica."
        )
    state_dir = Path(state_dir)
    path = state_dir / KEY_FILE_NAME
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp = state_dir / f".{KEY_FILE_NAME}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(secrets.token_hex(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            # link() never replaces: two processes starting at once agree on the first key written.
            os.link(tmp, path)
            log.warning("dev mode: made a new user pseudonymization key in %s", path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return read_key_file(path)
