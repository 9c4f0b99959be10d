"""Authentication and authorization at the gateway: API keys, JWTs, scopes, on REST and gRPC; modes.

Three layers: the pure Authenticator (every rejection case), the REST app in process (httpx's
ASGITransport over a real Recommender), and the three services as real processes (one REST and the
gRPC checks), plus `python -m gateway` in production mode refusing to start.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from fastapi import FastAPI
from fastapi.routing import APIRoute
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway import auth_grpc
from gateway.auth import (
    ERASE,
    EVENTS,
    RECOMMEND,
    SCOPES,
    ApiKeyStore,
    Authenticator,
    Guard,
    JwtVerifier,
    PermissionDenied,
    Principal,
    Unauthenticated,
    WatchedFile,
    hash_api_key,
    key_file_line,
    new_api_key,
    parse_api_keys,
    parse_public_keys,
    parse_secrets,
)
from gateway.auth_rest import required_scope
from gateway.config import GatewayConfig
from gateway.modes import production_problems
from gateway.rest import create_app
from gateway.server import build_recommender
from protos.recsys.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from recsys_cli.main import main as recsys_main
from recsys_cli.stack import Stack
from recsys_common.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
AUDIENCE = "recsys-test"
GENERIC_401 = {"error": {"code": "unauthenticated", "message": Unauthenticated.MESSAGE, "field": None}}


def _pem(private: Any) -> bytes:
    pem, spki = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    return private.public_key().public_bytes(pem, spki)


@dataclass
class Creds:
    """Keys for one test module: API keys by principal, an Ed25519 signing key, and the files the gateway reads."""

    dir: Path
    api_keys: dict[str, str]
    signing: ed25519.Ed25519PrivateKey
    keys_file: Path
    public_key_file: Path

    def token(self, key: Any = None, algorithm: str = "EdDSA", **overrides: Any) -> str:
        now = int(time.time())
        claims = {"sub": "svc-a", "aud": AUDIENCE, "exp": now + 300, "iat": now, "scope": " ".join(SCOPES)}
        claims.update(overrides)
        claims = {k: v for k, v in claims.items() if v is not None}
        return jwt.encode(claims, key if key is not None else self.signing, algorithm=algorithm)

    def env(self) -> dict[str, str]:
        return {
            "RECSYS_GATEWAY_API_KEYS_FILE": str(self.keys_file),
            "RECSYS_GATEWAY_JWT_PUBLIC_KEY_FILE": str(self.public_key_file),
            "RECSYS_GATEWAY_JWT_AUDIENCE": AUDIENCE,
        }


SCOPES_BY_PRINCIPAL = {"reader": [RECOMMEND], "writer": [EVENTS], "eraser": [ERASE], "admin": list(SCOPES)}


def make_creds(path: Path) -> Creds:
    api_keys = {name: new_api_key() for name in SCOPES_BY_PRINCIPAL}
    keys_file = path / "api-keys"
    lines = ["# test keys", *(key_file_line(api_keys[n], n, s) for n, s in SCOPES_BY_PRINCIPAL.items())]
    keys_file.write_text("\n".join(lines) + "\n")
    signing = ed25519.Ed25519PrivateKey.generate()
    public_key_file = path / "jwt.pub"
    public_key_file.write_bytes(_pem(signing))
    return Creds(path, api_keys, signing, keys_file, public_key_file)


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Creds:
    return make_creds(tmp_path_factory.mktemp("creds"))


@pytest.fixture(scope="module")
def authenticator(creds: Creds) -> Authenticator:
    return Guard.from_config(config_for(creds)).authenticator  # type: ignore[return-value]


def config_for(creds: Creds, **overrides: Any) -> GatewayConfig:
    return replace(
        GatewayConfig(),
        api_keys_file=creds.keys_file,
        jwt_public_key_file=creds.public_key_file,
        jwt_audience=AUDIENCE,
        **overrides,
    )


def rejection_cases(creds: Creds) -> dict[str, tuple[str | None, str]]:
    """name -> (Authorization value, the reason the gateway records)."""
    other = ed25519.Ed25519PrivateKey.generate()
    now = int(time.time())
    unsigned = jwt.encode({"sub": "x", "aud": AUDIENCE, "exp": now + 300, "scope": RECOMMEND}, None, algorithm="none")
    # Algorithm confusion: an HS256 token "signed" with the public key's PEM as the HMAC secret.
    # (built by hand: PyJWT itself refuses a PEM as an HMAC secret).
    signing_input = ".".join(
        jwt.utils.base64url_encode(part.encode()).decode()
        for part in ('{"alg":"HS256","typ":"JWT"}', f'{{"sub":"x","aud":"{AUDIENCE}","exp":{now + 300}}}')
    )
    mac = hmac.new(creds.public_key_file.read_bytes(), signing_input.encode(), hashlib.sha256).digest()
    confused = f"{signing_input}.{jwt.utils.base64url_encode(mac).decode()}"
    return {
        "missing": (None, "missing"),
        "empty": ("", "missing"),
        "scheme only": ("ApiKey", "malformed"),
        "unknown scheme": ("Basic dXNlcjpwYXNz", "malformed"),
        "two credentials": (f"ApiKey {creds.api_keys['admin']} extra", "malformed"),
        "oversized": ("Bearer " + "a" * 9000, "malformed"),
        "unknown api key": (f"ApiKey {new_api_key()}", "unknown_key"),
        "api key as bearer": (f"Bearer {creds.api_keys['admin']}", "invalid_token"),
        "garbage token": ("Bearer not.a.jwt", "invalid_token"),
        "alg none": (f"Bearer {unsigned}", "invalid_token"),
        "alg confusion": (f"Bearer {confused}", "invalid_token"),
        "wrong key": (f"Bearer {creds.token(key=other)}", "invalid_token"),
        "expired": (f"Bearer {creds.token(exp=now - 600)}", "expired_token"),
        "wrong audience": (f"Bearer {creds.token(aud='someone-else')}", "invalid_token"),
        "no audience": (f"Bearer {creds.token(aud=None)}", "invalid_token"),
        "not yet valid": (f"Bearer {creds.token(nbf=now + 600)}", "invalid_token"),
        "no expiry": (f"Bearer {creds.token(exp=None)}", "invalid_token"),
        "no subject": (f"Bearer {creds.token(sub=None)}", "invalid_token"),
        "no scope claim": (f"Bearer {creds.token(scope=None)}", "invalid_token"),
        "scope not a string": (f"Bearer {creds.token(scope=7)}", "invalid_token"),
        "tampered payload": (f"Bearer {_tamper(creds.token(scope=RECOMMEND))}", "invalid_token"),
    }


def _tamper(token: str) -> str:
    """The same signature over a payload granting more scopes."""
    header, _, signature = token.split(".")
    payload = jwt.utils.base64url_encode(
        f'{{"sub":"svc-a","aud":"{AUDIENCE}","exp":{int(time.time()) + 300},"scope":"{ERASE}"}}'.encode()
    ).decode()
    return f"{header}.{payload}.{signature}"


REJECTIONS = [
    "missing", "empty", "scheme only", "unknown scheme", "two credentials", "oversized", "unknown api key",
    "api key as bearer", "garbage token", "alg none", "alg confusion", "wrong key", "expired", "wrong audience",
    "no audience", "not yet valid", "no expiry", "no subject", "no scope claim", "scope not a string",
    "tampered payload",
]  # fmt: skip


# -- the pure core ---------------------------------------------------------------------------------
def test_rejection_list_covers_every_case(creds: Creds) -> None:
    assert sorted(REJECTIONS) == sorted(rejection_cases(creds))


@pytest.mark.parametrize("case", REJECTIONS)
def test_every_bad_credential_is_refused_with_one_message(
    creds: Creds, authenticator: Authenticator, case: str
) -> None:
    authorization, reason = rejection_cases(creds)[case]
    with pytest.raises(Unauthenticated) as caught:
        authenticator.authenticate(authorization)
    assert caught.value.reason == reason
    assert str(caught.value) == Unauthenticated.MESSAGE, "the caller must not learn which part failed"


def test_valid_keys_and_tokens_name_the_principal_and_its_scopes(creds: Creds, authenticator: Authenticator) -> None:
    assert authenticator.authenticate(f"ApiKey {creds.api_keys['reader']}") == Principal("key:reader", {RECOMMEND})
    assert authenticator.authenticate(f"apikey   {creds.api_keys['admin']} ").scopes == frozenset(SCOPES)
    got = authenticator.authenticate(f"Bearer {creds.token(scope=f'{EVENTS} openid other:scope')}")
    assert got == Principal("jwt:svc-a", frozenset({EVENTS})), "scopes of other APIs are ignored"
    assert authenticator.authenticate(f"bearer {creds.token(scope=None, scp=[ERASE])}").scopes == {ERASE}
    # Within the leeway (30 s): a token that expired 5 s ago still passes, as clocks drift.
    assert authenticator.authenticate(f"Bearer {creds.token(exp=int(time.time()) - 5)}").name == "jwt:svc-a"


def test_guard_checks_scope_after_identity_and_lets_everyone_in_when_off(creds: Creds) -> None:
    guard = Guard.from_config(config_for(creds))
    assert guard.check(f"ApiKey {creds.api_keys['writer']}", EVENTS, "1.2.3.4").name == "key:writer"
    with pytest.raises(PermissionDenied, match=RECOMMEND):
        guard.check(f"ApiKey {creds.api_keys['writer']}", RECOMMEND, "1.2.3.4")
    with pytest.raises(PermissionDenied):
        guard.check(f"Bearer {creds.token(scope='')}", RECOMMEND, "")
    assert guard.check(f"Bearer {creds.token(scope='')}", None, "").name == "jwt:svc-a"  # any authenticated caller
    off = Guard.from_config(GatewayConfig())
    assert not off.active
    assert off.check(None, ERASE, "1.2.3.4") == Principal("anon:1.2.3.4", frozenset(SCOPES))


def test_api_keys_are_stored_only_as_digests(creds: Creds) -> None:
    text = creds.keys_file.read_text()
    for key in creds.api_keys.values():
        assert key not in text and hash_api_key(key) in text
    assert len(creds.api_keys["admin"]) >= 43 and creds.api_keys["admin"].startswith("rsk_")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("abc reader recommendations:read", "64 lowercase hex"),
        (f"{'a' * 64} reader", "expected '<sha256-hex>"),
        (f"{'a' * 64} reader recommendations:write", "unknown or no scopes recommendations:write"),
        (f"{'a' * 64} bad/name events:write", "principal 'bad/name'"),
        (f"{'a' * 64} a events:write\n{'a' * 64} b events:write", "listed twice"),
    ],
)
def test_a_bad_keys_file_names_the_line_and_the_problem(line: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        parse_api_keys("# comment\n\n" + line, "keys.txt")
    assert "keys.txt:3" in str(caught.value) or "keys.txt:4" in str(caught.value)


def test_keys_rotate_without_restart_and_a_broken_file_keeps_the_old_keys(tmp_path: Path) -> None:
    clock = [0.0]
    path = tmp_path / "keys"
    old, new = new_api_key(), new_api_key()
    path.write_text(key_file_line(old, "a", [EVENTS]) + "\n")
    store = ApiKeyStore(WatchedFile(path, lambda d, s: parse_api_keys(d.decode(), s), 1.0, lambda: clock[0]))
    assert store.lookup(old) is not None and store.lookup(new) is None
    path.write_text(key_file_line(old, "a", [EVENTS]) + "\n" + key_file_line(new, "b", [EVENTS]) + "\n")
    assert store.lookup(new) is None, "not re-checked within the interval"
    clock[0] = 1.5
    assert store.lookup(new) == Principal("key:b", frozenset({EVENTS}))
    path.write_text("this is not a keys file\n")
    clock[0] = 3.0
    assert store.lookup(new) is not None, "a file that does not parse keeps the previous keys"
    path.write_text(key_file_line(new, "b", [EVENTS]) + "\n")  # the old key retired
    clock[0] = 4.5
    assert store.lookup(old) is None and store.lookup(new) is not None


def test_jwt_key_rotation_accepts_both_keys_in_the_file(creds: Creds, tmp_path: Path) -> None:
    second = ed25519.Ed25519PrivateKey.generate()
    path = tmp_path / "two.pub"
    path.write_bytes(_pem(second) + creds.public_key_file.read_bytes())
    verifier = JwtVerifier(parse_public_keys(path.read_bytes(), str(path)), AUDIENCE)
    assert verifier.verify(creds.token()).name == "jwt:svc-a"
    assert verifier.verify(creds.token(key=second)).name == "jwt:svc-a"
    with pytest.raises(Unauthenticated):
        verifier.verify(creds.token(key=ed25519.Ed25519PrivateKey.generate()))


def test_hs256_and_es256_keys_with_their_algorithms_pinned(creds: Creds, tmp_path: Path) -> None:
    secret = os.urandom(32).hex().encode()
    hs = JwtVerifier(parse_secrets(secret + b"\n", "secret"), AUDIENCE)
    assert hs.verify(creds.token(key=secret, algorithm="HS256")).name == "jwt:svc-a"
    with pytest.raises(Unauthenticated):
        hs.verify(creds.token(key=secret, algorithm="HS512"))  # not the pinned HS256
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        parse_secrets(b"short\n", "secret")
    p256 = ec.generate_private_key(ec.SECP256R1())
    es = JwtVerifier(parse_public_keys(_pem(p256), "ec.pub"), AUDIENCE, issuer="https://idp.example")
    assert es.verify(creds.token(key=p256, algorithm="ES256", iss="https://idp.example")).name == "jwt:svc-a"
    with pytest.raises(Unauthenticated):
        es.verify(creds.token(key=p256, algorithm="ES256", iss="https://evil.example"))


def test_jwt_config_errors_are_named(creds: Creds) -> None:
    with pytest.raises(ConfigError, match="RECSYS_GATEWAY_JWT_AUDIENCE"):
        GatewayConfig(jwt_public_key_file=creds.public_key_file)
    with pytest.raises(ConfigError, match="Use one of them"):
        GatewayConfig(jwt_public_key_file=creds.public_key_file, jwt_secret_file=Path("s"), jwt_audience="a")
    with pytest.raises(ConfigError, match="'none'"):
        JwtVerifier([creds.signing.public_key()], AUDIENCE, algorithms=["none"])
    with pytest.raises(ConfigError, match="allows no algorithm for a Ed25519PublicKey"):
        JwtVerifier([creds.signing.public_key()], AUDIENCE, algorithms=["RS256"])
    with pytest.raises(ConfigError, match="no '-----BEGIN PUBLIC KEY-----' block"):
        parse_public_keys(b"not a key", "k.pub")
    with pytest.raises(ConfigError, match="RECSYS_GATEWAY_MODE"):
        GatewayConfig(mode="prod")


def test_cli_makes_a_key_whose_line_the_gateway_accepts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys_file = tmp_path / "keys"
    with pytest.raises(SystemExit) as done:
        recsys_main(["keys", "new-api-key", "--principal", "web", "--scopes", f"{RECOMMEND},{EVENTS}",
                     "--keys-file", str(keys_file)])  # fmt: skip
    assert done.value.code == 0
    out = capsys.readouterr().out.splitlines()
    key = out[1]
    assert keys_file.stat().st_mode & 0o777 == 0o600
    assert out[3] == keys_file.read_text().strip() and key not in keys_file.read_text()
    store = ApiKeyStore.from_file(keys_file)
    assert store.lookup(key) == Principal("key:web", frozenset({RECOMMEND, EVENTS}))
    with pytest.raises(SystemExit) as done:
        recsys_main(["keys", "new-api-key", "--principal", "web", "--scopes", "everything"])
    assert done.value.code == 2 and "unknown or no scopes everything" in capsys.readouterr().err


# -- REST, in process ------------------------------------------------------------------------------
class AppClient:
    """Sync calls into an ASGI app in this process (httpx.ASGITransport; one short event loop per call)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        async def call() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app, client=("10.0.0.7", 5555))
            async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
                return await client.request(method, path, **kwargs)

        return asyncio.run(call())

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("DELETE", path, **kwargs)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def rest(creds: Creds, tiny_bundles: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppClient]:
    """The REST app over a real Recommender; retrieval and ranking are down, so answers come from the fallbacks."""
    config = config_for(
        creds,
        bundles_dir=tiny_bundles,
        state=str(tmp_path_factory.mktemp("state")),
        retrieval_addr=f"127.0.0.1:{_closed_port()}",
        ranking_addr=f"127.0.0.1:{_closed_port()}",
        poll_interval_s=0,
    )
    recommender = build_recommender(config)
    try:
        yield AppClient(create_app(recommender))
    finally:
        recommender.close()


@pytest.mark.parametrize("case", REJECTIONS)
def test_rest_refuses_bad_credentials_with_401_and_a_challenge(creds: Creds, rest: AppClient, case: str) -> None:
    authorization, _ = rejection_cases(creds)[case]
    headers = {"Authorization": authorization} if authorization is not None else {}
    reply = rest.post("/v1/events", json={"events": []}, headers=headers)  # an invalid body: auth answers first
    assert reply.status_code == 401
    assert reply.json() == GENERIC_401
    assert reply.headers["WWW-Authenticate"] == 'Bearer realm="recsys", ApiKey realm="recsys"'


@pytest.mark.parametrize(
    ("principal", "method", "path", "body"),
    [
        ("writer", "POST", "/v1/recommendations", {"user_id": "u1", "k": 3}),
        ("reader", "POST", "/v1/events", {"events": [{"user_id": "u1", "item_id": "i001", "timestamp": 1}]}),
        ("writer", "DELETE", "/v1/users/u1", None),
        ("eraser", "GET", "/v1/items", None),
        ("writer", "GET", "/v1/items/i001", None),
    ],
)
def test_rest_refuses_a_missing_scope_with_403(
    creds: Creds, rest: AppClient, principal: str, method: str, path: str, body: Any
) -> None:
    headers = {"Authorization": f"ApiKey {creds.api_keys[principal]}"}
    reply = rest.request(method, path, json=body, headers=headers)
    assert reply.status_code == 403
    assert reply.json()["error"]["code"] == "permission_denied"
    assert required_scope(method, path) in reply.json()["error"]["message"]
    assert 'error="insufficient_scope"' in reply.headers["WWW-Authenticate"]


def test_rest_lets_each_scope_do_its_job(creds: Creds, rest: AppClient) -> None:
    def as_(principal: str) -> dict[str, str]:
        return {"Authorization": f"ApiKey {creds.api_keys[principal]}"}

    event = {"events": [{"user_id": "carol", "item_id": "i001", "timestamp": 1, "event_id": "e1"}]}
    assert rest.post("/v1/events", json=event, headers=as_("writer")).json() == {"accepted": 1}
    reply = rest.post("/v1/recommendations", json={"user_id": "carol", "k": 3}, headers=as_("reader"))
    assert reply.status_code == 200 and len(reply.json()["items"]) == 3
    assert rest.get("/v1/items", params={"limit": 2}, headers=as_("reader")).status_code == 200
    assert rest.delete("/v1/users/carol", headers=as_("eraser")).json() == {"erased": 1}
    token = {"Authorization": f"Bearer {creds.token(scope=EVENTS)}"}
    assert rest.post("/v1/events", json=event, headers=token).json() == {"accepted": 1}
    # Bad input from an authorized caller is still a 422 naming the field, never a 500.
    reply = rest.post("/v1/events", json={"events": []}, headers=as_("writer"))
    assert reply.status_code == 422 and reply.json()["error"]["field"] == "events"


def test_rest_keeps_health_metrics_docs_and_the_page_open(rest: AppClient) -> None:
    assert "services" in rest.get("/healthz").json()
    assert "recsys_gateway_auth_refused" in rest.get("/metrics").text
    assert rest.get("/openapi.json").status_code == 200
    assert rest.get("/").status_code == 200
    assert rest.get("/v1/nothing-here").status_code == 401, "unknown API paths do not reveal whether they exist"


def test_every_api_route_has_a_scope(rest: AppClient) -> None:
    """A new /v1/ route fails here until it is given a scope in gateway/auth_rest.ROUTE_SCOPES."""
    routes = [r for r in rest.app.routes if isinstance(r, APIRoute) and r.path.startswith("/v1/")]  # type: ignore[attr-defined]
    assert len(routes) >= 3
    for route in routes:
        path = route.path.replace("{", "").replace("}", "")
        for method in route.methods:
            assert required_scope(method, path) in SCOPES, f"{method} {route.path} has no scope"


def test_every_grpc_method_has_a_scope() -> None:
    methods = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].methods_by_name
    assert set(methods) == set(auth_grpc.METHOD_SCOPES)


def test_dev_mode_without_keys_needs_no_credentials(tiny_bundles: Path, tmp_path: Path) -> None:
    config = GatewayConfig(
        bundles_dir=tiny_bundles,
        state=str(tmp_path),
        poll_interval_s=0,
        retrieval_addr=f"127.0.0.1:{_closed_port()}",
        ranking_addr=f"127.0.0.1:{_closed_port()}",
    )
    recommender = build_recommender(config)
    try:
        client = AppClient(create_app(recommender))
        event = {"events": [{"user_id": "dave", "item_id": "i002", "timestamp": 1}]}
        assert client.post("/v1/events", json=event).json() == {"accepted": 1}
        assert client.delete("/v1/users/dave").json() == {"erased": 1}
    finally:
        recommender.close()


# -- real processes: REST and gRPC -----------------------------------------------------------------
@pytest.fixture(scope="module")
def stack(creds: Creds, tiny_bundles: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    state = tmp_path_factory.mktemp("stack-state")
    with Stack(tiny_bundles, state, http_port=0, grpc_port=0, env=creds.env()) as s:
        yield s


def test_real_gateway_enforces_keys_on_rest(creds: Creds, stack: Stack) -> None:
    with httpx.Client(base_url=stack.http_url, timeout=10) as http:
        body = {"user_id": "erin", "k": 4}
        assert http.post("/v1/recommendations", json=body).status_code == 401
        bad = {"Authorization": rejection_cases(creds)["expired"][0] or ""}
        assert http.post("/v1/recommendations", json=body, headers=bad).json() == GENERIC_401
        writer = {"Authorization": f"ApiKey {creds.api_keys['writer']}"}
        assert http.post("/v1/recommendations", json=body, headers=writer).status_code == 403
        token = {"Authorization": f"Bearer {creds.token(scope=RECOMMEND)}"}
        reply = http.post("/v1/recommendations", json=body, headers=token)
        assert reply.status_code == 200 and len(reply.json()["items"]) == 4 and reply.json()["bundle_version"]
        assert http.get("/healthz").status_code == 200
        metrics = http.get("/metrics").text
        assert 'recsys_gateway_auth_refused_total{reason="missing",transport="rest"} 1.0' in metrics
        assert 'recsys_gateway_auth_refused_total{reason="expired_token",transport="rest"} 1.0' in metrics


@pytest.fixture(scope="module")
def gateway_stub(stack: Stack) -> Iterator[gateway_pb2_grpc.GatewayStub]:
    with grpc.insecure_channel(stack.grpc_addr) as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)


@pytest.mark.parametrize("case", ["missing", "scheme only", "unknown api key", "alg none", "wrong key", "expired",
                                  "wrong audience", "not yet valid", "no scope claim"])  # fmt: skip
def test_grpc_refuses_bad_credentials_with_unauthenticated(
    creds: Creds, gateway_stub: gateway_pb2_grpc.GatewayStub, case: str
) -> None:
    authorization, _ = rejection_cases(creds)[case]
    metadata = [("authorization", authorization)] if authorization is not None else []
    with pytest.raises(grpc.RpcError) as caught:
        gateway_stub.Recommend(gateway_pb2.RecommendRequest(user_id="frank", k=3), metadata=metadata, timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.details() == Unauthenticated.MESSAGE


def test_grpc_checks_scopes_per_method(creds: Creds, stack: Stack, gateway_stub: gateway_pb2_grpc.GatewayStub) -> None:
    def as_(principal: str) -> list[tuple[str, str]]:
        return [("authorization", f"ApiKey {creds.api_keys[principal]}")]

    track = gateway_pb2.TrackRequest(events=[common_pb2.Event(user_id="gina", item_id="i003", timestamp=5)])
    with pytest.raises(grpc.RpcError) as caught:
        gateway_stub.Track(track, metadata=as_("reader"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED and EVENTS in (caught.value.details() or "")
    assert gateway_stub.Track(track, metadata=as_("writer"), timeout=10).accepted == 1
    reply = gateway_stub.Recommend(
        gateway_pb2.RecommendRequest(user_id="gina", k=3),
        metadata=[("authorization", f"Bearer {creds.token(scope=RECOMMEND)}")],
        timeout=10,
    )
    assert len(reply.items) == 3
    with pytest.raises(grpc.RpcError) as caught:
        gateway_stub.ForgetUser(gateway_pb2.ForgetUserRequest(user_id="gina"), metadata=[], timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    forget = gateway_pb2.ForgetUserRequest(user_id="gina")
    assert gateway_stub.ForgetUser(forget, metadata=as_("eraser"), timeout=10).erased == 1
    # Bad input from an authorized caller: INVALID_ARGUMENT, not INTERNAL.
    with pytest.raises(grpc.RpcError) as caught:
        gateway_stub.Recommend(gateway_pb2.RecommendRequest(user_id="", k=3), metadata=as_("reader"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with grpc.insecure_channel(stack.grpc_addr) as channel:  # health stays open for probes
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


# -- modes -----------------------------------------------------------------------------------------
def _gateway_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSYS_GATEWAY_")}
    return {**env, "RECSYS_LOG_FORMAT": "text", **extra}


def _run_gateway(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    args = ["--bundles", str(tmp_path / "no-bundles"), "--state", str(tmp_path / "state"), "--port", "0",
            "--grpc-port", "0"]  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_production_mode_refuses_to_start_naming_everything_missing(tmp_path: Path) -> None:
    done = _run_gateway(_gateway_env(RECSYS_GATEWAY_MODE="production"), tmp_path)
    assert done.returncode == 2, done.stderr
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("gateway: production mode refuses to start; missing:")
    for name in ("API_KEYS_FILE", "JWT_PUBLIC_KEY_FILE", "USER_KEY", "USER_KEY_FILE", "TLS_CERT_FILE", "TLS_KEY_FILE",
                 "TLS_CA_FILE", "BUNDLE_PUBLIC_KEY_FILE"):  # fmt: skip
        assert f"RECSYS_GATEWAY_{name}" in message, name
    assert "LISTENING" not in done.stdout


def test_production_mode_names_only_what_is_still_missing(creds: Creds, tmp_path: Path) -> None:
    (tmp_path / "user.key").write_text(os.urandom(32).hex())
    env = _gateway_env(
        RECSYS_GATEWAY_MODE="production",
        RECSYS_GATEWAY_API_KEYS_FILE=str(creds.keys_file),
        RECSYS_GATEWAY_USER_KEY_FILE=str(tmp_path / "user.key"),
        RECSYS_GATEWAY_TLS_CERT_FILE=str(tmp_path / "absent.crt"),
        RECSYS_GATEWAY_TLS_KEY_FILE=str(creds.keys_file),
        RECSYS_GATEWAY_TLS_CA_FILE=str(creds.keys_file),
    )
    done = _run_gateway(env, tmp_path)
    assert done.returncode == 2, done.stderr
    message = done.stderr.strip().splitlines()[-1]
    assert "authentication keys" not in message and "HMAC" not in message
    assert f"RECSYS_GATEWAY_TLS_CERT_FILE={tmp_path / 'absent.crt'} (not a readable file)" in message
    assert "RECSYS_GATEWAY_BUNDLE_PUBLIC_KEY_FILE" in message
    assert "TLS_KEY_FILE" not in message and "TLS_CA_FILE" not in message


def test_production_mode_with_everything_configured_has_no_problems(creds: Creds, tmp_path: Path) -> None:
    names = ("tls_cert_file", "tls_key_file", "tls_ca_file", "bundle_public_key_file")
    files = {name: creds.keys_file for name in names}
    config = config_for(creds, mode="production", user_key="k" * 32, **files)
    assert production_problems(config) == []
    assert production_problems(GatewayConfig()) == [], "dev mode needs nothing"


def test_a_configured_keys_file_that_cannot_be_read_stops_even_dev_mode(tmp_path: Path) -> None:
    env = _gateway_env(RECSYS_GATEWAY_API_KEYS_FILE=str(tmp_path / "missing-keys"))
    done = _run_gateway(env, tmp_path)
    assert done.returncode == 2
    assert f"gateway: {tmp_path / 'missing-keys'}: No such file or directory" in done.stderr
