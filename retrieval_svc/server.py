"""Starts the retrieval gRPC server: load and verify the bundle, then serve with grpc.health.v1."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from grpc_health.v1 import health

from protos.recsys.v1 import retrieval_pb2, retrieval_pb2_grpc
from recsys_common.bundle import open_bundle
from recsys_common.grpc_server import create_server, service_main
from retrieval_svc.config import RetrievalConfig
from retrieval_svc.core import Retriever
from retrieval_svc.servicer import RetrievalServicer

SERVICE_NAME = retrieval_pb2.DESCRIPTOR.services_by_name["Retrieval"].full_name


def build(config: RetrievalConfig) -> tuple[grpc.Server, int, health.HealthServicer]:
    retriever = Retriever(open_bundle(config.bundles_dir), threads=config.search_threads, max_k=config.max_k)
    servicer = RetrievalServicer(retriever, max_batch=config.max_batch)
    return create_server(
        [lambda s: retrieval_pb2_grpc.add_RetrievalServicer_to_server(servicer, s)],
        f"{config.host}:{config.port}",
        config.max_workers,
    )


def main(argv: Sequence[str] | None = None) -> None:
    service_main("retrieval", argv, RetrievalConfig.from_env(), build, [SERVICE_NAME])
