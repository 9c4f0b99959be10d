"""Container healthcheck for Docker, compose and Kubernetes exec probes: exit 0 when the service answers healthy.

    python /opt/recsys/healthcheck.py grpc 127.0.0.1:50051             # grpc.health.v1, service "", plaintext
    python /opt/recsys/healthcheck.py grpc 127.0.0.1:50051 --service recsys.v1.Retrieval
    python /opt/recsys/healthcheck.py http http://127.0.0.1:8000/healthz
    # mutual TLS (production mode): trust the CA, present a client certificate, verify the server's name
    python /opt/recsys/healthcheck.py grpc 127.0.0.1:50051 --tls-ca ca.crt --tls-cert tls.crt --tls-key tls.key \
        --server-name retrieval

Kubernetes' native `grpc:` probe speaks plaintext only, so against a TLS port (production mode) the manifests
run this as an exec probe with the pod's own certificate as the client certificate. The image has no
grpc_health_probe binary or curl, and this needs nothing beyond what the serving image already holds. One line
on stdout says why a check failed, which `docker inspect` and `kubectl describe pod` show.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def grpc_channel(address: str, ca: Path | None, cert: Path | None, key: Path | None, server_name: str | None) -> Any:
    """Plaintext without a CA; TLS trusting only `ca` with one; mutual TLS when a client cert and key are given."""
    import grpc

    if ca is None:
        return grpc.insecure_channel(address)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes() if key is not None else None,
        certificate_chain=cert.read_bytes() if cert is not None else None,
    )
    # The probe dials 127.0.0.1 but checks the certificate against the name the service's clients dial.
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(address, credentials, options=options)


def check_grpc(address: str, service: str, timeout_s: float, channel: Any = None) -> tuple[bool, str]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with channel if channel is not None else grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as err:
            return False, f"{address}: {err.code().name}: {err.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{address} service {service!r}: {status}"


def check_http(url: str, timeout_s: float) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            return 200 <= reply.status < 300, f"{url}: HTTP {reply.status}"
    except urllib.error.HTTPError as err:
        return False, f"{url}: HTTP {err.code}"
    except (urllib.error.URLError, OSError) as err:
        return False, f"{url}: {getattr(err, 'reason', err)}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="healthcheck.py", description=__doc__.splitlines()[0])
    parser.add_argument("--timeout-s", type=float, default=2.0)
    sub = parser.add_subparsers(dest="kind", required=True)
    p = sub.add_parser("grpc", help="grpc.health.v1 Check")
    p.add_argument("address", help="host:port")
    p.add_argument("--service", default="", help='service name ("" = the whole server)')
    p.add_argument("--tls-ca", type=Path, help="speak TLS, trusting only this CA bundle (PEM)")
    p.add_argument("--tls-cert", type=Path, help="client certificate (PEM) for mutual TLS; needs --tls-key")
    p.add_argument("--tls-key", type=Path, help="the client certificate's private key (PEM)")
    p.add_argument("--server-name", help="verify the server certificate for this name instead of the address's host")
    p = sub.add_parser("http", help="GET, healthy on 2xx")
    p.add_argument("url")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.kind == "grpc":
        if (args.tls_cert is None) != (args.tls_key is None):
            parser.error("--tls-cert and --tls-key go together")
        if (args.tls_cert is not None or args.server_name) and args.tls_ca is None:
            parser.error("--tls-cert and --server-name need --tls-ca")
        try:
            channel = grpc_channel(args.address, args.tls_ca, args.tls_cert, args.tls_key, args.server_name)
        except OSError as err:
            print(f"unhealthy: cannot read TLS material: {err}", flush=True)
            return 1
        ok, why = check_grpc(args.address, args.service, args.timeout_s, channel)
    else:
        ok, why = check_http(args.url, args.timeout_s)
    print(("healthy: " if ok else "unhealthy: ") + why, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
