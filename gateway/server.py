"""Starts the gateway: gRPC (Gateway + grpc.health.v1) and REST (FastAPI on uvicorn) in one process."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import socket
from collections.abc import Sequence
from pathlib import Path

import uvicorn

from gateway.clients import RankingClient, RetrievalClient
from gateway.config import GatewayConfig
from gateway.core import Recommender
from gateway.rest import create_app
from gateway.servicer import GatewayServicer
from gateway.store import open_store
from protos.recsys.v1 import gateway_pb2, gateway_pb2_grpc
from recsys_common.bundle import open_bundle
from recsys_common.grpc_server import announce, create_server, set_serving

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
log = logging.getLogger("gateway")


def build_recommender(config: GatewayConfig) -> Recommender:
    return Recommender(
        config,
        open_bundle(config.bundles_dir),
        open_store(config.state),
        RetrievalClient(config.retrieval_addr),
        RankingClient(config.ranking_addr),
    )


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
    parser.add_argument("--retrieval", help="retrieval service address (RECSYS_GATEWAY_RETRIEVAL_ADDR)")
    parser.add_argument("--ranking", help="ranking service address (RECSYS_GATEWAY_RANKING_ADDR)")
    parser.add_argument("--port-file", type=Path, help="write the bound REST port here once serving")
    parser.add_argument("--grpc-port-file", type=Path, help="write the bound gRPC port here once serving")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s gateway %(levelname)s %(message)s")
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
    recommender = build_recommender(config)

    servicer = GatewayServicer(recommender)
    grpc_server, grpc_port, health = create_server(
        [lambda s: gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, s)], f"{config.host}:{config.grpc_port}"
    )
    grpc_server.start()
    set_serving(health, [SERVICE_NAME], True)
    announce("gateway-grpc", grpc_port, args.grpc_port_file)

    sock = _bind(config.host, config.http_port)
    http_port = sock.getsockname()[1]
    app = create_app(recommender, on_ready=lambda: announce("gateway", http_port, args.port_file))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])  # returns after SIGINT/SIGTERM, handled by uvicorn
    finally:
        health.enter_graceful_shutdown()
        grpc_server.stop(5).wait()
        recommender.store.close()
