"""Starts the gateway: gRPC (Gateway + grpc.health.v1) and REST (FastAPI on uvicorn) in one process.

TLS (SECURITY.md): with RECSYS_GATEWAY_TLS_CERT_FILE and _KEY_FILE, REST is HTTPS and the gRPC front door
speaks TLS (clients authenticate with API keys or tokens, not certificates); with _TLS_CA_FILE as well, the
calls to retrieval and ranking are mutual TLS, the gateway presenting the same certificate.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from concurrent import futures
from pathlib import Path
from types import FrameType

import grpc.aio
import uvicorn
from grpc_health.v1 import health

from gateway.auth import Guard
from gateway.auth_grpc import guard_servicer
from gateway.clients import RankingClient, retrieval_client
from gateway.config import GatewayConfig
from gateway.core import BundleView, Recommender
from gateway.modes import is_loopback, production_problems
from gateway.privacy import Pseudonymizer, key_dir, load_user_key, read_key_file
from gateway.rest import create_app
from gateway.servicer import MAX_MESSAGE_BYTES, GatewayServicer
from gateway.store import open_store
from protos.recsys.v1 import gateway_pb2, gateway_pb2_grpc
from recsys_common.config import ConfigError
from recsys_common.grpc_server import announce, create_aio_server, freeze_heap, set_serving_aio
from recsys_common.logs import setup_logging
from recsys_common.signing import BundleTrust
from recsys_common.snapshot import SnapshotHolder
from recsys_common.tls import TLSFiles

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
log = logging.getLogger("gateway")


def gateway_tls(config: GatewayConfig) -> TLSFiles | None:
    """The gateway's TLS files, loaded and checked (ConfigError naming the setting); None without TLS."""
    return TLSFiles.from_config("RECSYS_GATEWAY_", config.tls_cert_file, config.tls_key_file, config.tls_ca_file)


def build_recommender(config: GatewayConfig) -> Recommender:
    if config.user_key_file is not None:
        key = read_key_file(config.user_key_file)
    else:
        key = load_user_key(config.user_key, key_dir(config.state), config.mode)
    store = open_store(
        config.state,
        max_events_per_user=config.max_events_per_user,
        dedupe_window_s=config.dedupe_window_s,
        user_ttl_s=config.user_ttl_s,
        trending_half_life_s=config.trending_half_life_s,
    )
    tls = gateway_tls(config)
    # Mutual TLS to the services needs the CA that signs their certificates.
    credentials = tls.channel_credentials() if tls is not None and tls.ca_file is not None else None
    trust = BundleTrust.from_config(config.mode, config.bundle_public_key_file, "RECSYS_GATEWAY_BUNDLE_PUBLIC_KEY_FILE")
    bundles = SnapshotHolder(
        config.bundles_dir,
        lambda bundle: BundleView.load(bundle, config),
        config.poll_interval_s,
        name="gateway",
        trust=trust,
    )
    bundles.load_current(raise_errors=True)
    if config.poll_interval_s > 0:
        bundles.start()
    return Recommender(
        config,
        bundles,
        store,
        Pseudonymizer(key),
        retrieval_client(config.retrieval_addrs, credentials, config.max_batch, config.max_calls_in_flight),
        RankingClient(config.ranking_addr, credentials, config.max_batch, config.max_calls_in_flight),
    )


def build_guard(config: GatewayConfig) -> Guard:
    """Authentication and rate limits for both transports; exits with code 2 and one message naming everything
    production mode misses, or what is wrong with a configured key file (auth is never silently off)."""
    problems = production_problems(config)
    if problems:
        print(f"gateway: production mode refuses to start; missing: {'; '.join(problems)}", file=sys.stderr)
        sys.exit(2)
    try:
        guard = Guard.from_config(config)
    except ConfigError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        sys.exit(2)
    if guard.authenticator is None and not is_loopback(config.host):
        log.warning("dev mode without authentication is listening on %s, beyond loopback", config.host)
    return guard


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gateway", description=__doc__)
    parser.add_argument("--bundles", type=Path, help="bundles directory (RECSYS_GATEWAY_BUNDLES_DIR)")
    parser.add_argument("--state", help="user-state directory or store URL (RECSYS_GATEWAY_STATE)")
    parser.add_argument("--host", help="bind address (RECSYS_GATEWAY_HOST)")
    parser.add_argument("--port", type=int, help="REST port, 0 = any (RECSYS_GATEWAY_HTTP_PORT)")
    parser.add_argument("--grpc-port", type=int, help="gRPC port, 0 = any (RECSYS_GATEWAY_GRPC_PORT)")
    parser.add_argument(
        "--retrieval", help="retrieval address, or shard addresses separated by commas (RECSYS_GATEWAY_RETRIEVAL_ADDR)"
    )
    parser.add_argument("--ranking", help="ranking service address (RECSYS_GATEWAY_RANKING_ADDR)")
    parser.add_argument("--port-file", type=Path, help="write the bound REST port here once serving")
    parser.add_argument("--grpc-port-file", type=Path, help="write the bound gRPC port here once serving")
    args = parser.parse_args(argv)
    setup_logging("gateway")
    overrides = {
        "bundles_dir": args.bundles,
        "state": args.state,
        "host": args.host,
        "http_port": args.port,
        "grpc_port": args.grpc_port,
        "retrieval_addr": args.retrieval,
        "ranking_addr": args.ranking,
    }
    config = dataclasses.replace(GatewayConfig.from_env(), **{k: v for k, v in overrides.items() if v is not None})
    guard = build_guard(config)
    try:
        tls = gateway_tls(config)
        recommender = build_recommender(config)
    except ConfigError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        sys.exit(2)
    recommender.warm_up()
    freeze_heap()

    servicer = guard_servicer(GatewayServicer(recommender), guard)

    async def start_grpc() -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
        # On the core's loop, as REST: a gRPC request reaches the core without a hand-off between threads.
        # Beyond max_inflight (plus the health checks' headroom) a call is refused at once, never queued.
        server, port, health_servicer = create_aio_server(
            [lambda s: gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, s)],
            f"{config.host}:{config.grpc_port}",
            MAX_MESSAGE_BYTES,
            credentials=tls.server_credentials(require_client_auth=False) if tls is not None else None,
            max_concurrent_rpcs=config.max_inflight + 4,
        )
        await server.start()
        await set_serving_aio(health_servicer, [SERVICE_NAME], True)
        return server, port, health_servicer

    grpc_server, grpc_port, health_servicer = recommender.core.run(start_grpc())
    announce("gateway-grpc", grpc_port, args.grpc_port_file)

    sock = _bind(config.host, config.http_port)
    http_port = sock.getsockname()[1]
    app = create_app(recommender, on_ready=lambda: announce("gateway", http_port, args.port_file), guard=guard)
    grpc_stopped: list[futures.Future[None]] = []

    async def stop_grpc() -> None:
        await health_servicer.enter_graceful_shutdown()
        await grpc_server.stop(config.grace_s)

    def drain() -> None:
        """First SIGTERM/SIGINT: NOT_SERVING at once on both transports; gRPC refuses new calls, finishes the rest."""
        if not grpc_stopped:
            log.info("draining: finishing in-flight requests for up to %.1f s", config.grace_s)
            recommender.draining.set()
            grpc_stopped.append(recommender.core.submit(stop_grpc()))

    uv_config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=max(1, round(config.grace_s)),
        **(tls.uvicorn_kwargs() if tls is not None else {}),
    )
    server = DrainingServer(uv_config, drain)
    # uvicorn serves on the core's event loop, so a REST request reaches the core without a thread hand-off.
    # Off the main thread uvicorn installs no signal handlers of its own: these drain both transports, then
    # stop uvicorn, which finishes the REST requests in flight.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, server.handle_exit)
    serving = recommender.core.submit(server.serve(sockets=[sock]))
    try:
        while not serving.done():
            futures.wait([serving], timeout=0.5)  # a timed wait: the main thread stays free to run the handlers
        serving.result()  # returns once in-flight REST requests are done (or the grace period ended)
    finally:
        drain()
        try:
            grpc_stopped[0].result()
        finally:
            recommender.close()


class DrainingServer(uvicorn.Server):
    """uvicorn, with a hook that runs as soon as the stop signal arrives (uvicorn itself then drains REST)."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.on_exit()
        super().handle_exit(sig, frame)
