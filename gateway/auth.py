"""Who may call the gateway: API keys (kept only as sha256 digests) and JWT bearer tokens, with scopes.

Pure: no transport. REST (gateway/auth_rest.py) and gRPC (gateway/auth_grpc.py) hand the
``Authorization`` header / ``authorization`` metadata to one Guard, which answers with a Principal or
raises one of::

    RecsysError
    ├── Unauthenticated     UNAUTHENTICATED      401  no, malformed, unknown or invalid credentials
    ├── PermissionDenied    PERMISSION_DENIED    403  valid credentials without the call's scope
    └── RateLimited         RESOURCE_EXHAUSTED   429  the principal's token bucket is empty

An Unauthenticated message is the same whatever failed (a wrong key, a bad signature, an expired
token, a wrong audience); the reason goes to the logs and metrics, never to the caller.

Credentials::

    Authorization: ApiKey rsk_...        a key from `recsys keys new-api-key`; the gateway keeps its sha256
    Authorization: Bearer eyJ...         a JWT: signature (pinned algorithms), exp, aud, sub and scope checked

Why sha256 and not a slow hash (bcrypt, scrypt, argon2) for API keys: a slow hash protects *guessable*
secrets such as passwords from brute force after the digests leak. Our keys are 32 random bytes
(256 bits); nobody can enumerate that space, however fast the hash, so a fast one-way digest loses
nothing, and it keeps each request's check at about a microsecond. The same argument makes a plain
dict lookup on the digest safe from timing attacks: what leaks is a prefix of the digest, which says
nothing about the key that produces it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from gateway.config import GatewayConfig
from gateway.ratelimit import RateLimiter
from recsys_common.config import ConfigError
from recsys_common.errors import RecsysError

RECOMMEND = "recommendations:read"
EVENTS = "events:write"
ERASE = "users:erase"
SCOPES = (RECOMMEND, EVENTS, ERASE)

API_KEY_PREFIX = "rsk_"
# Longer header values are refused before any parsing (a JWT with a few claims is well under 1 KiB).
MAX_CREDENTIAL_CHARS = 8192
MIN_SECRET_BYTES = 32
CHALLENGE = 'Bearer realm="recsys", ApiKey realm="recsys"'
HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
ASYMMETRIC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")

_PRINCIPAL = re.compile(r"[A-Za-z0-9._@-]{1,64}")
_DIGEST = re.compile(r"[0-9a-f]{64}")
_PEM_BLOCK = re.compile(rb"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", re.DOTALL)

log = logging.getLogger(__name__)

T = TypeVar("T")


# -- errors ------------------------------------------------------------------------------------
class Unauthenticated(RecsysError):
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401
    MESSAGE = "missing or invalid credentials"

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(self.MESSAGE)
        # A bounded label for metrics (missing, malformed, unknown_key, invalid_token, expired_token) and,
        # for the log only, what exactly failed.
        self.reason = reason
        self.detail = detail or reason


class PermissionDenied(RecsysError):
    grpc_code = grpc.StatusCode.PERMISSION_DENIED
    http_status = 403

    def __init__(self, scope: str | None) -> None:
        super().__init__(f"the credentials do not allow this call (it needs scope {scope or 'a listed scope'})")
        self.scope = scope
        self.reason = "insufficient_scope"


class RateLimited(RecsysError):
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429

    def __init__(self, retry_after_s: float) -> None:
        self.retry_after = str(max(1, math.ceil(retry_after_s)))  # whole seconds, as Retry-After wants
        super().__init__(f"rate limit exceeded; retry after {self.retry_after} s")
        self.retry_after_s = retry_after_s


# -- principals and scopes ---------------------------------------------------------------------
@dataclass(frozen=True)
class Principal:
    """Who is calling: 'key:<name>' for an API key, 'jwt:<sub>' for a token, 'anon:<address>' with auth off."""

    name: str
    scopes: frozenset[str]

    def allows(self, scope: str | None) -> bool:
        return scope is None or scope in self.scopes


def parse_scopes(text: str, where: str) -> frozenset[str]:
    """'events:write,recommendations:read' -> the set; an unknown scope is an error naming it."""
    scopes = frozenset(s.strip() for s in text.split(",") if s.strip())
    unknown = sorted(scopes - set(SCOPES))
    if unknown or not scopes:
        named = ", ".join(unknown) or repr(text)
        raise ConfigError(f"{where}: unknown or no scopes {named}; known: {', '.join(SCOPES)}")
    return scopes


# -- API keys ----------------------------------------------------------------------------------
def new_api_key() -> str:
    """A fresh key: the prefix (so scanners and people recognise it) and 32 random bytes, base64url."""
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_file_line(key: str, principal: str, scopes: Iterable[str]) -> str:
    """The keys-file line for a key: `<sha256-hex> <principal> <scope,scope>`."""
    if not _PRINCIPAL.fullmatch(principal):
        raise ConfigError(f"principal {principal!r}: use 1 to 64 of A-Z a-z 0-9 . _ @ -")
    return f"{hash_api_key(key)} {principal} {','.join(sorted(parse_scopes(','.join(scopes), 'scopes')))}"


def parse_api_keys(text: str, source: str) -> dict[str, Principal]:
    """A keys file: one `<sha256-hex> <principal> <scope,scope>` per line; blank lines and # comments ignored."""
    keys: dict[str, Principal] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source}:{n}"
        parts = line.split()
        if len(parts) != 3:
            raise ConfigError(f"{where}: expected '<sha256-hex> <principal> <scope,scope>', got {len(parts)} fields")
        digest, name, scopes = parts
        if not _DIGEST.fullmatch(digest):
            raise ConfigError(f"{where}: the first field must be a key's sha256 as 64 lowercase hex digits")
        if not _PRINCIPAL.fullmatch(name):
            raise ConfigError(f"{where}: principal {name!r}: use 1 to 64 of A-Z a-z 0-9 . _ @ -")
        if digest in keys:
            raise ConfigError(f"{where}: this key digest is listed twice")
        keys[digest] = Principal(f"key:{name}", parse_scopes(scopes, where))
    return keys


class WatchedFile(Generic[T]):
    """A parsed file, re-read when it changes (checked at most every check_interval_s): keys rotate without a
    restart. A change that does not parse keeps the previous value and logs why."""

    def __init__(
        self,
        path: Path,
        parse: Callable[[bytes, str], T],
        check_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self._parse = parse
        self._interval = check_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._value = parse(self._read(), str(path))
        self._checked = clock()

    def _stat(self) -> tuple[int, int, int]:
        try:
            st = self.path.stat()
        except OSError as exc:
            raise ConfigError(f"{self.path}: {exc.strerror or exc}") from exc
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _read(self) -> bytes:
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{self.path}: {exc.strerror or exc}") from exc
        if self.path.stat().st_mode & 0o022:
            log.warning("%s is writable by group or others, who could grant themselves access", self.path)
        return data

    def get(self) -> T:
        now = self._clock()
        if now - self._checked < self._interval:
            return self._value
        with self._lock:
            if now - self._checked >= self._interval:
                self._checked = now
                try:
                    stamp = self._stat()
                    if stamp != self._stamp:
                        self._value = self._parse(self._read(), str(self.path))
                        self._stamp = stamp
                        log.info("reloaded %s", self.path)
                except ConfigError as exc:
                    log.error("keeping the previous keys: %s", exc)
        return self._value


class ApiKeyStore:
    """Principals by key digest; the keys themselves are never stored."""

    def __init__(self, keys: Mapping[str, Principal] | WatchedFile[dict[str, Principal]]) -> None:
        self._keys = keys

    @classmethod
    def from_file(cls, path: Path) -> ApiKeyStore:
        return cls(WatchedFile(path, lambda data, source: parse_api_keys(data.decode("utf-8", "replace"), source)))

    def lookup(self, key: str) -> Principal | None:
        keys = self._keys.get() if isinstance(self._keys, WatchedFile) else self._keys
        return keys.get(hash_api_key(key))


# -- JWT ---------------------------------------------------------------------------------------
def _algorithms_for(key: Any) -> tuple[str, ...]:
    if isinstance(key, bytes):
        return HMAC_ALGORITHMS
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return ("EdDSA",)
    if isinstance(key, rsa.RSAPublicKey):
        return ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
    if isinstance(key, ec.EllipticCurvePublicKey):
        return {"secp256r1": ("ES256",), "secp384r1": ("ES384",), "secp521r1": ("ES512",)}.get(key.curve.name, ())
    return ()


def _default_algorithm(key: Any) -> str:
    if isinstance(key, bytes):
        return "HS256"
    algorithms = _algorithms_for(key)
    return algorithms[0] if algorithms else ""


def parse_public_keys(data: bytes, source: str) -> list[Any]:
    """Every PEM `PUBLIC KEY` block in the file (two during a rotation)."""
    blocks = _PEM_BLOCK.findall(data)
    if not blocks:
        raise ConfigError(f"{source}: no '-----BEGIN PUBLIC KEY-----' block")
    keys = []
    for block in blocks:
        try:
            key = serialization.load_pem_public_key(block)
        except ValueError as exc:
            raise ConfigError(f"{source}: a public key does not load: {exc}") from exc
        if not _algorithms_for(key):
            raise ConfigError(f"{source}: {type(key).__name__} keys are not supported (use Ed25519, RSA or EC P-256)")
        keys.append(key)
    return keys


def parse_secrets(data: bytes, source: str) -> list[Any]:
    """HMAC secrets, one a line (two during a rotation), each at least 32 bytes."""
    secrets_ = [line.strip() for line in data.splitlines() if line.strip()]
    if not secrets_:
        raise ConfigError(f"{source}: no secret")
    if any(len(s) < MIN_SECRET_BYTES for s in secrets_):
        raise ConfigError(f"{source}: every secret must have at least {MIN_SECRET_BYTES} bytes")
    return secrets_


class JwtVerifier:
    """Checks a bearer token's signature against the configured keys with pinned algorithms (the token's own
    `alg` header only selects among them; `none` is never among them), then exp, nbf, aud, iss, sub, scope."""

    def __init__(
        self,
        keys: Sequence[Any] | WatchedFile[list[Any]],
        audience: str,
        algorithms: Sequence[str] = (),
        issuer: str = "",
        leeway_s: float = 30.0,
    ) -> None:
        if not audience:
            raise ConfigError("Config 'RECSYS_GATEWAY_JWT_AUDIENCE' is not set. JWT verification needs an audience.")
        self._keys = keys
        self.audience = audience
        self.algorithms = tuple(algorithms)
        bad = [a for a in self.algorithms if a not in HMAC_ALGORITHMS + ASYMMETRIC_ALGORITHMS]
        if bad:
            raise ConfigError(
                f"Config 'RECSYS_GATEWAY_JWT_ALGORITHMS' has value {','.join(bad)!r}. "
                f"Use some of {', '.join(HMAC_ALGORITHMS + ASYMMETRIC_ALGORITHMS)}."
            )
        self.issuer = issuer
        self.leeway_s = leeway_s
        for key in self._current_keys():  # every configured key must be usable with the pinned algorithms
            if not self._pinned(key):
                raise ConfigError(
                    f"Config 'RECSYS_GATEWAY_JWT_ALGORITHMS' ({','.join(self.algorithms)}) allows no algorithm for a "
                    f"{'secret' if isinstance(key, bytes) else type(key).__name__} key"
                )

    def _current_keys(self) -> Sequence[Any]:
        return self._keys.get() if isinstance(self._keys, WatchedFile) else self._keys

    def _pinned(self, key: Any) -> list[str]:
        """The algorithms this key may verify: the configured ones that fit its type, else its type's default."""
        if self.algorithms:
            return [a for a in self.algorithms if a in _algorithms_for(key)]
        return [_default_algorithm(key)]

    def verify(self, token: str) -> Principal:
        for key in self._current_keys():
            try:
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=self._pinned(key),
                    audience=self.audience,
                    issuer=self.issuer or None,
                    leeway=self.leeway_s,
                    options={"require": ["exp", "aud", "sub"]},
                )
            except (jwt.InvalidSignatureError, jwt.InvalidAlgorithmError, jwt.InvalidKeyError):
                continue  # not this key (or not its algorithm): try the next one
            except jwt.ExpiredSignatureError as exc:
                raise Unauthenticated("expired_token", f"jwt: {exc}") from None
            except jwt.PyJWTError as exc:
                raise Unauthenticated("invalid_token", f"jwt: {type(exc).__name__}: {exc}") from None
            return Principal(f"jwt:{claims['sub']}", _token_scopes(claims))
        raise Unauthenticated("invalid_token", "jwt: signature or algorithm matches no configured key")


def _token_scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    """RFC 9068 `scope` (space-separated string), or `scp` (a list); our scopes only, others ignored."""
    if not isinstance(claims["sub"], str) or not claims["sub"]:
        raise Unauthenticated("invalid_token", "jwt: sub is not a non-empty string")
    scope = claims.get("scope", claims.get("scp"))
    if isinstance(scope, str):
        names = scope.split()
    elif isinstance(scope, list) and all(isinstance(s, str) for s in scope):
        names = scope
    else:
        raise Unauthenticated("invalid_token", "jwt: no scope claim (a space-separated string) or scp (a list)")
    return frozenset(names) & frozenset(SCOPES)


# -- the guard ---------------------------------------------------------------------------------
class Authenticator:
    """Reads an Authorization value (`ApiKey <key>` or `Bearer <jwt>`) into a Principal, or raises Unauthenticated."""

    def __init__(self, api_keys: ApiKeyStore | None = None, jwt_verifier: JwtVerifier | None = None) -> None:
        if api_keys is None and jwt_verifier is None:
            raise ValueError("an Authenticator needs API keys, a JWT verifier, or both")
        self.api_keys = api_keys
        self.jwt = jwt_verifier

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization or not authorization.strip():
            raise Unauthenticated("missing")
        if len(authorization) > MAX_CREDENTIAL_CHARS:
            raise Unauthenticated("malformed", f"credential longer than {MAX_CREDENTIAL_CHARS} characters")
        scheme, _, credential = authorization.strip().partition(" ")
        credential = credential.strip()
        if not credential or any(c.isspace() for c in credential):
            raise Unauthenticated("malformed", "expected '<scheme> <credential>'")
        scheme = scheme.lower()  # auth schemes are case-insensitive (RFC 9110 11.1)
        if scheme == "apikey" and self.api_keys is not None:
            principal = self.api_keys.lookup(credential)
            if principal is None:
                raise Unauthenticated("unknown_key")
            return principal
        if scheme == "bearer" and self.jwt is not None:
            return self.jwt.verify(credential)
        raise Unauthenticated("malformed", f"scheme {scheme[:16]!r} is not accepted here")


class Guard:
    """One admission check per API call, shared by REST and gRPC: authenticate, authorize, then rate-limit.

    With neither credentials nor a rate limit configured (dev mode's default) it lets everything through.
    With only a rate limit, callers are limited by their network address.
    """

    def __init__(self, authenticator: Authenticator | None = None, limiter: RateLimiter | None = None) -> None:
        self.authenticator = authenticator
        self.limiter = limiter

    @property
    def active(self) -> bool:
        return self.authenticator is not None or self.limiter is not None

    @classmethod
    def from_config(cls, config: GatewayConfig) -> Guard:
        api_keys = ApiKeyStore.from_file(config.api_keys_file) if config.api_keys_file else None
        keys: WatchedFile[list[Any]] | None = None
        if config.jwt_public_key_file:
            keys = WatchedFile(config.jwt_public_key_file, parse_public_keys)
        elif config.jwt_secret_file:
            keys = WatchedFile(config.jwt_secret_file, parse_secrets)
        verifier = None
        if keys is not None:
            verifier = JwtVerifier(
                keys, config.jwt_audience, config.jwt_algorithms, config.jwt_issuer, config.jwt_leeway_s
            )
        authenticator = Authenticator(api_keys, verifier) if api_keys or verifier else None
        limiter = RateLimiter(config.rate_limit_per_s, config.rate_limit_burst) if config.rate_limit_per_s else None
        return cls(authenticator, limiter)

    def check(self, authorization: str | None, scope: str | None, client: str) -> Principal:
        """The caller, if it may make a call needing `scope` (None: any authenticated caller) right now."""
        if self.authenticator is None:
            principal = Principal(f"anon:{client}", frozenset(SCOPES))
        else:
            principal = self.authenticator.authenticate(authorization)
            if not principal.allows(scope):
                raise PermissionDenied(scope)
        if self.limiter is not None:
            wait_s = self.limiter.acquire(principal.name)
            if wait_s > 0:
                raise RateLimited(wait_s)
        return principal
