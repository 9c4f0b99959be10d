"""TLS: mutual TLS between the gateway and the services, HTTPS on REST, TLS on the gateway's gRPC port, and the
settings' errors. The three services run as real processes with certificates from a CA the test makes."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ranking_svc.config import RankingConfig
from recsys_cli.stack import Stack
from recsys_common.config import ConfigError
from recsys_common.grpc_server import bind
from recsys_common.tls import TLSFiles
from retrieval_svc.config import RetrievalConfig
from tests.pki import CA, Leaf, tls_env

ROOT = Path(__file__).resolve().parent.parent
SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass(frozen=True)
class PKI:
    ca: CA
    other: CA  # a CA nobody trusts
    retrieval: Leaf
    ranking: Leaf
    gateway: Leaf
    rogue: Leaf  # issued by the other CA, with the same name as the gateway's


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    d = tmp_path_factory.mktemp("pki")
    ca, other = CA(d, "internal"), CA(d, "other")
    return PKI(ca, other, ca.issue("retrieval"), ca.issue("ranking"), ca.issue("gateway"), other.issue("gateway"))


@pytest.fixture(scope="module")
def stack(pki: PKI, tiny_bundles: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = {
        **tls_env("RECSYS_RETRIEVAL_", pki.retrieval, pki.ca),
        **tls_env("RECSYS_RANKING_", pki.ranking, pki.ca),
        **tls_env("RECSYS_GATEWAY_", pki.gateway, pki.ca),
    }
    with Stack(tiny_bundles, tmp_path_factory.mktemp("state"), http_port=0, grpc_port=0, env=env) as s:
        yield s


def health_status(address: str, credentials: grpc.ChannelCredentials | None) -> int | grpc.StatusCode:
    """SERVING (an int) when the call goes through, else the gRPC status code of the failure."""
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        try:
            return int(health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status)
        except grpc.RpcError as err:
            return err.code()


def creds(ca: CA, leaf: Leaf | None = None) -> grpc.ChannelCredentials:
    if leaf is None:
        return grpc.ssl_channel_credentials(root_certificates=ca.cert_file.read_bytes())
    pem = (ca.cert_file.read_bytes(), leaf.key_file.read_bytes(), leaf.cert_file.read_bytes())
    return grpc.ssl_channel_credentials(*pem)


# -- the stack over TLS ------------------------------------------------------------------------------
def test_rest_is_https_and_the_gateway_reaches_both_services_over_mutual_tls(stack: Stack, pki: PKI) -> None:
    assert stack.http_url.startswith("https://")
    verify = ssl.create_default_context(cafile=str(pki.ca.cert_file))
    with httpx.Client(base_url=stack.http_url, verify=verify, timeout=10) as http:
        health_reply = http.get("/healthz")
        assert health_reply.status_code == 200, health_reply.text
        assert health_reply.json()["services"] == {"gateway": True, "retrieval": True, "ranking": True}
        events = [{"user_id": "tls-user", "item_id": f"i{n:03d}", "timestamp": 1000 + n} for n in (1, 3, 5)]
        assert http.post("/v1/events", json={"events": events}).json() == {"accepted": 3}
        reply = http.post("/v1/recommendations", json={"user_id": "tls-user", "k": 5, "timeout_ms": 2000})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    # Retrieval (ANN) and ranking both answered: nothing missing, ranked order.
    assert body["partial"] is False and body["missing"] == [] and body["degraded"] is None, body
    assert len(body["items"]) == 5
    assert all(int(item["item_id"][1:]) % 2 == 1 for item in body["items"])  # the odd cluster, as planted


def test_rest_refuses_plain_http_and_untrusted_verification(stack: Stack, pki: PKI) -> None:
    with pytest.raises(httpx.TransportError):
        httpx.get(stack.http_url.replace("https://", "http://") + "/healthz", timeout=5)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(stack.http_url + "/healthz", verify=ssl.create_default_context(cafile=str(pki.other.cert_file)))


@pytest.mark.parametrize("service", ["retrieval", "ranking"])
def test_services_admit_only_clients_with_a_certificate_from_the_ca(stack: Stack, pki: PKI, service: str) -> None:
    address = f"127.0.0.1:{stack.ports[service]}"
    assert health_status(address, creds(pki.ca, pki.gateway)) == SERVING
    # No client certificate, one from another CA, or plaintext: the handshake fails before any RPC.
    assert health_status(address, creds(pki.ca)) == grpc.StatusCode.UNAVAILABLE
    assert health_status(address, creds(pki.ca, pki.rogue)) == grpc.StatusCode.UNAVAILABLE
    assert health_status(address, None) == grpc.StatusCode.UNAVAILABLE
    # And the client checks the server: trusting only another CA, the gateway's own certificate does not help.
    assert health_status(address, creds(pki.other, pki.gateway)) == grpc.StatusCode.UNAVAILABLE


def test_gateway_grpc_port_speaks_tls_without_client_certificates(stack: Stack, pki: PKI) -> None:
    assert health_status(stack.grpc_addr, creds(pki.ca)) == SERVING  # clients authenticate with keys, not certs
    assert health_status(stack.grpc_addr, None) == grpc.StatusCode.UNAVAILABLE


# -- certificate rotation, in process ------------------------------------------------------------------
def test_a_renewed_server_certificate_is_served_without_a_restart(pki: PKI, tmp_path: Path) -> None:
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    cert.write_bytes(pki.retrieval.cert_file.read_bytes())
    key.write_bytes(pki.retrieval.key_file.read_bytes())
    tls = TLSFiles.from_config("RECSYS_RETRIEVAL_", cert, key, pki.ca.cert_file)
    assert tls is not None
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    address = f"127.0.0.1:{bind(server, '127.0.0.1:0', tls.server_credentials())}"
    server.start()
    try:
        assert health_status(address, creds(pki.ca, pki.gateway)) == SERVING
        # The renewed certificate comes from the other CA: clients trusting only the first one now fail.
        renewed = pki.other.issue("retrieval-renewed")
        key.write_bytes(renewed.key_file.read_bytes())
        cert.write_bytes(renewed.cert_file.read_bytes())
        assert health_status(address, creds(pki.ca, pki.gateway)) == grpc.StatusCode.UNAVAILABLE
        assert health_status(address, creds(pki.other, pki.gateway)) == SERVING
    finally:
        server.stop(0).wait()


# -- settings -------------------------------------------------------------------------------------------
def test_tls_settings_are_checked_at_startup_naming_the_setting(pki: PKI, tmp_path: Path) -> None:
    p = "RECSYS_RANKING_"
    with pytest.raises(ConfigError, match="'RECSYS_RANKING_TLS_CERT_FILE' is set but 'RECSYS_RANKING_TLS_KEY_FILE'"):
        TLSFiles.from_config(p, pki.ranking.cert_file, None, None)
    with pytest.raises(ConfigError, match="'RECSYS_RANKING_TLS_CA_FILE' is set without"):
        TLSFiles.from_config(p, None, None, pki.ca.cert_file)
    with pytest.raises(ConfigError, match="RECSYS_RANKING_TLS_KEY_FILE.*not the key of the certificate"):
        TLSFiles.from_config(p, pki.ranking.cert_file, pki.retrieval.key_file, pki.ca.cert_file)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(ConfigError, match="RECSYS_RANKING_TLS_CA_FILE.*Not a PEM certificate"):
        TLSFiles.from_config(p, pki.ranking.cert_file, pki.ranking.key_file, garbage)
    with pytest.raises(ConfigError, match="RECSYS_RANKING_TLS_CERT_FILE.*Cannot read"):
        TLSFiles.from_config(p, tmp_path / "missing.crt", pki.ranking.key_file, None)
    server_only = TLSFiles.from_config(p, pki.ranking.cert_file, pki.ranking.key_file, None)
    assert server_only is not None
    with pytest.raises(ConfigError, match="RECSYS_RANKING_TLS_CA_FILE' is not set. Mutual TLS"):
        server_only.server_credentials(require_client_auth=True)
    assert TLSFiles.from_config(p, None, None, None) is None


def test_production_mode_names_every_missing_setting(pki: PKI) -> None:
    with pytest.raises(ConfigError) as err:
        RetrievalConfig(mode="production")
    for name in ("TLS_CERT_FILE", "TLS_KEY_FILE", "TLS_CA_FILE", "BUNDLE_PUBLIC_KEY_FILE"):
        assert f"RECSYS_RETRIEVAL_{name}" in str(err.value)
    with pytest.raises(ConfigError, match="RECSYS_RANKING_MODE' has value 'prod'"):
        RankingConfig(mode="prod")
    with pytest.raises(ConfigError) as err:
        RankingConfig(mode="production", tls_cert_file=pki.ranking.cert_file, tls_key_file=pki.ranking.key_file)
    assert "RECSYS_RANKING_TLS_CA_FILE, RECSYS_RANKING_BUNDLE_PUBLIC_KEY_FILE." in str(err.value)
    assert "TLS_CERT_FILE" not in str(err.value)


@pytest.mark.parametrize("service", ["retrieval", "ranking"])
def test_a_service_in_production_mode_without_its_settings_exits_2(service: str, tiny_bundles: Path) -> None:
    prefix = f"RECSYS_{service.upper()}_"
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefix)} | {f"{prefix}MODE": "production"}
    cmd = [sys.executable, "-m", f"{service}_svc", "--bundles", str(tiny_bundles), "--port", "0"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr[-2000:]
    assert f"{service}: Production mode refuses to start; missing: {prefix}TLS_CERT_FILE" in run.stderr
