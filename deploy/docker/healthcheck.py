"""Container healthcheck for Docker and Compose: exit 0 when the service answers healthy, 1 otherwise.

    python /opt/recsys/healthcheck.py grpc 127.0.0.1:50051             # grpc.health.v1, service ""
    python /opt/recsys/healthcheck.py grpc 127.0.0.1:50051 --service recsys.v1.Retrieval
    python /opt/recsys/healthcheck.py http http://127.0.0.1:8000/healthz

Kubernetes does not need it (native `grpc:` and `httpGet:` probes); the image has no grpc_health_probe
binary or curl, and this needs nothing beyond what the serving image already holds. One line on stdout
says why a check failed, which `docker inspect` shows under State.Health.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence


def check_grpc(address: str, service: str, timeout_s: float) -> tuple[bool, str]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="healthcheck.py", description=__doc__.splitlines()[0])
    parser.add_argument("--timeout-s", type=float, default=2.0)
    sub = parser.add_subparsers(dest="kind", required=True)
    p = sub.add_parser("grpc", help="grpc.health.v1 Check")
    p.add_argument("address", help="host:port")
    p.add_argument("--service", default="", help='service name ("" = the whole server)')
    p = sub.add_parser("http", help="GET, healthy on 2xx")
    p.add_argument("url")
    args = parser.parse_args(argv)
    if args.kind == "grpc":
        ok, why = check_grpc(args.address, args.service, args.timeout_s)
    else:
        ok, why = check_http(args.url, args.timeout_s)
    print(("healthy: " if ok else "unhealthy: ") + why, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
