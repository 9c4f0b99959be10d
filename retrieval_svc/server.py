"""Starts the retrieval gRPC server: bind, load and warm the bundle, serve, swap in new bundles, stop gracefully.

    python -m retrieval_svc --bundles var/bundles --port 0 --port-file /tmp/p [--shard 0/2] [--poll-interval-s 1]

Lifecycle: the port is bound first and grpc.health.v1 answers NOT_SERVING while the bundle is verified,
loaded and warmed; then SERVING, and the port is announced (stdout line and --port-file). A background
thread watches CURRENT and swaps in new versions (recsys_common.snapshot); a damaged new version is
refused with a log line and health stays SERVING on the old one. SIGTERM/SIGINT: NOT_SERVING at once,
stop accepting, let in-flight requests finish (grace_s), exit 0. Server reflection is on, so
`grpcurl -plaintext HOST:PORT list` shows the services.

Security (SECURITY.md): with RECSYS_RETRIEVAL_TLS_CERT_FILE/_KEY_FILE/_CA_FILE the port speaks mutual TLS only
(clients need a certificate from the CA); with RECSYS_RETRIEVAL_BUNDLE_PUBLIC_KEY_FILE bundle signatures are
checked, and in production mode (RECSYS_RETRIEVAL_MODE=production) unsigned bundles are refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.recsys.v1 import retrieval_pb2, retrieval_pb2_grpc
from recsys_common.bundle import Bundle
from recsys_common.config import ConfigError
from recsys_common.grpc_server import announce, bind, set_serving
from recsys_common.logs import setup_logging
from recsys_common.metrics import ServerTelemetry, serve_metrics
from recsys_common.signing import BundleTrust
from recsys_common.snapshot import SnapshotHolder
from recsys_common.tls import TLSFiles
from retrieval_svc.ann import FilterPolicy, Shard
from retrieval_svc.config import RetrievalConfig
from retrieval_svc.core import Retriever
from retrieval_svc.servicer import RetrievalServicer, RuntimeUnavailable

SERVICE_NAME = retrieval_pb2.DESCRIPTOR.services_by_name["Retrieval"].full_name
log = logging.getLogger("retrieval")


def channel_options(config: RetrievalConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", config.max_receive_bytes),
        ("grpc.max_send_message_length", config.max_send_bytes),
        ("grpc.so_reuseport", 0),
    ]


def make_holder(config: RetrievalConfig, runtime: RuntimeUnavailable) -> SnapshotHolder[Retriever]:
    shard = Shard.parse(config.shard)
    policy = FilterPolicy(config.exact_max_eligible, config.exact_min_ratio)

    def load(bundle: Bundle) -> Retriever:
        return Retriever(
            bundle,
            threads=config.search_threads,
            max_k=config.max_k,
            shard=shard,
            filter_policy=policy,
            max_exclude=config.max_exclude,
        )

    return SnapshotHolder(
        config.bundles_dir,
        load,
        poll_interval_s=config.poll_interval_s,
        finalize=runtime.apply,
        name=f"retrieval[{shard}]",
        trust=BundleTrust.from_config(
            config.mode, config.bundle_public_key_file, "RECSYS_RETRIEVAL_BUNDLE_PUBLIC_KEY_FILE"
        ),
    )


def build(
    config: RetrievalConfig,
) -> tuple[grpc.Server, int, health.HealthServicer, SnapshotHolder[Retriever]]:
    """A bound, not yet started server and its (empty) snapshot holder."""
    runtime = RuntimeUnavailable()
    holder = make_holder(config, runtime)
    servicer = RetrievalServicer(holder, config.max_batch, config.max_batch_items, runtime)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="retrieval"),
        options=channel_options(config),
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        interceptors=[ServerTelemetry()],
    )
    retrieval_pb2_grpc.add_RetrievalServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    tls = TLSFiles.from_config("RECSYS_RETRIEVAL_", config.tls_cert_file, config.tls_key_file, config.tls_ca_file)
    credentials = tls.server_credentials(require_client_auth=tls.ca_file is not None) if tls else None
    port = bind(server, f"{config.host}:{config.port}", credentials)
    return server, port, health_servicer, holder


def serve(config: RetrievalConfig, port_file: Path | None = None) -> int:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server, port, health_servicer, holder = build(config)
    set_serving(health_servicer, [SERVICE_NAME], False)
    server.start()
    try:
        holder.load_current(raise_errors=True)
    except Exception as err:
        log.error("cannot serve bundle from %s: %s", config.bundles_dir, err)
        server.stop(0).wait()
        return 1
    serve_metrics(config.host, config.metrics_port)
    set_serving(health_servicer, [SERVICE_NAME], True)
    log.info("serving bundle %s, shard %s, on port %d", holder.version, config.shard, port)
    announce(f"retrieval[{config.shard}]", port, port_file)
    if config.poll_interval_s > 0:
        holder.start()
    stop.wait()
    health_servicer.enter_graceful_shutdown()
    holder.stop()
    server.stop(config.grace_s).wait()
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m retrieval_svc", description=__doc__.splitlines()[0])
    parser.add_argument("--bundles", type=Path, help="bundles directory (RECSYS_RETRIEVAL_BUNDLES_DIR)")
    parser.add_argument("--host", help="bind address (RECSYS_RETRIEVAL_HOST)")
    parser.add_argument("--port", type=int, help="port, 0 = any free one (RECSYS_RETRIEVAL_PORT)")
    parser.add_argument("--port-file", type=Path, help="write the bound port here once serving")
    parser.add_argument("--shard", help="serve shard i of n, e.g. 0/2 (RECSYS_RETRIEVAL_SHARD)")
    parser.add_argument(
        "--poll-interval-s", type=float, help="check CURRENT this often, 0 = never (RECSYS_RETRIEVAL_POLL_INTERVAL_S)"
    )
    parser.add_argument("--metrics-port", type=int, help="/metrics port, 0 = off (RECSYS_RETRIEVAL_METRICS_PORT)")
    args = parser.parse_args(argv)
    setup_logging("retrieval")
    overrides = {
        "metrics_port": args.metrics_port,
        "bundles_dir": args.bundles,
        "host": args.host,
        "port": args.port,
        "shard": args.shard,
        "poll_interval_s": args.poll_interval_s,
    }
    try:
        given = {k: v for k, v in overrides.items() if v is not None}
        config = dataclasses.replace(RetrievalConfig.from_env(), **given)
        code = serve(config, args.port_file)
    except ConfigError as exc:  # a missing or unusable setting: one line naming it, exit code 2
        print(f"retrieval: {exc}", file=sys.stderr)
        code = 2
    sys.exit(code)
