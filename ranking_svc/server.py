"""Starts the ranking gRPC server: load and verify the bundle, then serve with grpc.health.v1.

Security settings (mutual TLS, bundle signatures, production mode) are those of retrieval_svc/server.py,
named RECSYS_RANKING_*.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health

from protos.recsys.v1 import ranking_pb2, ranking_pb2_grpc
from ranking_svc.config import RankingConfig
from ranking_svc.core import Ranker
from ranking_svc.servicer import RankingServicer
from recsys_common.config import ConfigError
from recsys_common.grpc_server import create_server, service_main
from recsys_common.signing import BundleTrust
from recsys_common.snapshot import SnapshotHolder
from recsys_common.tls import TLSFiles

SERVICE_NAME = ranking_pb2.DESCRIPTOR.services_by_name["Ranking"].full_name


def build(config: RankingConfig) -> tuple[grpc.Server, int, health.HealthServicer]:
    tls = TLSFiles.from_config("RECSYS_RANKING_", config.tls_cert_file, config.tls_key_file, config.tls_ca_file)
    holder = SnapshotHolder(
        config.bundles_dir,
        lambda bundle: Ranker(bundle, threads=config.intra_op_threads, max_candidates=config.max_candidates),
        poll_interval_s=config.poll_interval_s,
        name="ranking",
        trust=BundleTrust.from_config(
            config.mode, config.bundle_public_key_file, "RECSYS_RANKING_BUNDLE_PUBLIC_KEY_FILE"
        ),
    )
    holder.load_current(raise_errors=True)  # loaded and warmed before the server reports SERVING
    if config.poll_interval_s > 0:
        holder.start()
    servicer = RankingServicer(holder, fault_delay_ms=config.fault_delay_ms)
    return create_server(
        [lambda s: ranking_pb2_grpc.add_RankingServicer_to_server(servicer, s)],
        f"{config.host}:{config.port}",
        config.max_workers,
        tls.server_credentials(require_client_auth=tls.ca_file is not None) if tls else None,
    )


def main(argv: Sequence[str] | None = None) -> None:
    try:
        service_main("ranking", argv, RankingConfig.from_env(), build, [SERVICE_NAME])
    except ConfigError as exc:  # a missing or unusable setting: one line naming it, exit code 2
        print(f"ranking: {exc}", file=sys.stderr)
        sys.exit(2)
