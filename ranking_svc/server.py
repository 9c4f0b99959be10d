"""Starts the ranking gRPC server: load and verify the bundle, then serve with grpc.health.v1."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from grpc_health.v1 import health

from protos.recsys.v1 import ranking_pb2, ranking_pb2_grpc
from ranking_svc.config import RankingConfig
from ranking_svc.core import Ranker
from ranking_svc.servicer import RankingServicer
from recsys_common.grpc_server import create_server, service_main
from recsys_common.snapshot import SnapshotHolder

SERVICE_NAME = ranking_pb2.DESCRIPTOR.services_by_name["Ranking"].full_name


def build(config: RankingConfig) -> tuple[grpc.Server, int, health.HealthServicer]:
    holder = SnapshotHolder(
        config.bundles_dir,
        lambda bundle: Ranker(bundle, threads=config.intra_op_threads, max_candidates=config.max_candidates),
        poll_interval_s=config.poll_interval_s,
        name="ranking",
    )
    holder.load_current(raise_errors=True)  # loaded and warmed before the server reports SERVING
    if config.poll_interval_s > 0:
        holder.start()
    servicer = RankingServicer(holder, fault_delay_ms=config.fault_delay_ms)
    return create_server(
        [lambda s: ranking_pb2_grpc.add_RankingServicer_to_server(servicer, s)],
        f"{config.host}:{config.port}",
        config.max_workers,
    )


def main(argv: Sequence[str] | None = None) -> None:
    service_main("ranking", argv, RankingConfig.from_env(), build, [SERVICE_NAME])
