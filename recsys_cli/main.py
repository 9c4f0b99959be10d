"""`recsys`: export bundles, serve the stack, run the demo, make data.

Each subcommand imports what it needs inside its handler, so `recsys serve` never loads the
exporter (and with it torch) into a serving process.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path


def _export(args: argparse.Namespace) -> int:
    from exporter.config import ExportConfig
    from exporter.distributed import ExecutorError, open_executor
    from exporter.pipeline import GateError, run_export
    from recsys_common.config import ConfigError

    config = ExportConfig.from_json(args.config) if args.config else ExportConfig()
    try:
        with open_executor(args.ray) as executor:
            version = run_export(
                config,
                args.data,
                args.out,
                progress=not args.quiet,
                executor=executor,
                index_shards=args.index_shards,
                signing_key=args.signing_key,
            )
    except (ExecutorError, ConfigError) as exc:
        print(f"recsys export: {exc}", file=sys.stderr)
        return 2
    except GateError as exc:  # every quality gate: nothing published, CURRENT unchanged
        print(f"recsys export: {exc}", file=sys.stderr)
        return 3
    print(f"published bundle {version} in {args.out}")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from exporter.config import ExportConfig
    from exporter.data import DataError, load_dataset
    from exporter.tune import TuneSettings, tune
    from exporter.tune_report import trials_table

    try:
        base = ExportConfig.from_json(args.config) if args.config else ExportConfig()
        settings = TuneSettings(
            trials=args.trials,
            minutes=args.minutes,
            seed=args.seed,
            max_cases=args.max_cases,
            threads=args.threads,
            prune=not args.no_prune,
            min_gain_se=args.min_gain_se,
        )
        # tqdm.write keeps the per-trial lines clear of optuna's progress bar.
        result = tune(load_dataset(args.data), base, settings, args.out, progress=not args.quiet, log=tqdm.write)
    except (DataError, ValueError) as exc:
        print(f"recsys tune: {exc}", file=sys.stderr)
        return 2
    print(trials_table(result.summary, base.eval_k))
    base_text = "failed" if result.base_value is None else f"{result.base_value:.4f}"
    best = result.summary["best"]
    print(
        f"\nchosen: trial {best['trial']}, validation NDCG@{base.eval_k} {result.best_value:.4f} "
        f"(base config {base_text}; rule: {best['rule']})"
    )
    print(f"wrote {', '.join(str(p) for p in result.files)}")
    print(f"next: recsys export --data {args.data} --out BUNDLES --config {args.out / 'config.json'}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from exporter.report import report_text, write_report
    from recsys_common.bundle import MANIFEST, open_bundle
    from recsys_common.errors import BundleMismatch, BundleUnavailable

    path = Path(args.bundle)
    try:
        # A version directory (holds manifest.json) or a bundles directory (its CURRENT version).
        bundle = open_bundle(path.parent, path.name) if (path / MANIFEST).is_file() else open_bundle(path)
    except (BundleMismatch, BundleUnavailable) as exc:
        print(f"recsys report: {exc}", file=sys.stderr)
        return 2
    print(report_text(bundle.manifest))
    out = args.out or Path(f"recsys-report-{bundle.version}")
    written = write_report(bundle.manifest, out)
    print(f"\nwrote {', '.join(str(p) for p in written)}")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from recsys_common.bundle import rollback
    from recsys_common.errors import BundleMismatch, BundleUnavailable

    try:
        old, new = rollback(args.bundles)
    except (BundleMismatch, BundleUnavailable) as exc:
        print(f"recsys rollback: {exc}", file=sys.stderr)
        return 2
    print(f"CURRENT in {args.bundles}: {old} -> {new}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from recsys_cli.stack import Stack

    with Stack(
        args.bundles, args.state, host=args.host, http_port=args.port, grpc_port=args.grpc_port, shards=args.shards
    ) as stack:
        print(stack.banner(), flush=True)
        return stack.wait()


def _demo(args: argparse.Namespace) -> int:
    from recsys_cli.demo import run_demo

    return run_demo(
        args.workdir, args.data, host=args.host, port=args.port, keep_serving=not args.exit, config=args.config
    )


def _synth(args: argparse.Namespace) -> int:
    from exporter.synth import generate

    info = generate(args.out, n_users=args.users, n_items=args.items, seed=args.seed)
    print(f"wrote synthetic data to {args.out}: {info}")
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from exporter.fetch import FetchError, fetch

    try:
        path = fetch(args.name, args.cache_dir)
    except FetchError as exc:
        print(f"recsys data fetch: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


def _import_events(args: argparse.Namespace) -> int:
    from exporter.data import DataError
    from recsys_cli.import_events import run_import
    from recsys_common.config import ConfigError
    from recsys_common.errors import StoreError

    state = args.redis or str(args.state)
    try:
        report = run_import(args.data, state, user_key_file=args.user_key_file, mode=args.mode,
                            max_events_per_user=args.max_events_per_user, progress=not args.quiet)  # fmt: skip
    except (ConfigError, DataError, StoreError) as exc:
        print(f"recsys import-events: {exc}", file=sys.stderr)
        return 2
    print(f"{report.line()} into {state.split('@')[-1]}")
    return 0


def _new_api_key(args: argparse.Namespace) -> int:
    from gateway.auth import key_file_line, new_api_key
    from recsys_common.config import ConfigError

    key = new_api_key()
    try:
        line = key_file_line(key, args.principal, args.scopes.split(","))
    except ConfigError as exc:
        print(f"recsys keys new-api-key: {exc}", file=sys.stderr)
        return 2
    print("API key (shown once: hand it to the client, keep it in a secret store; the gateway keeps only its hash):")
    print(key)
    if args.keys_file is not None:
        fd = os.open(args.keys_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            f.write(line + "\n")
        print(f"appended to {args.keys_file} (a running gateway picks it up within a second):")
    else:
        print("line for the keys file (RECSYS_GATEWAY_API_KEYS_FILE):")
    print(line)
    return 0


def _new_bundle_key(args: argparse.Namespace) -> int:
    from recsys_common.signing import write_key_pair

    private, public = args.out / "bundle_signing.pem", args.out / "bundle_public.pem"
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        kid = write_key_pair(private, public)
    except FileExistsError:
        print(f"recsys keys new-bundle-key: {private} exists; not overwriting a signing key", file=sys.stderr)
        return 2
    print(f"bundle signing key {kid}:")
    print(f"  {private}  private (0600): for `recsys export --signing-key` only; keep it off the serving hosts")
    print(f"  {public}  public: RECSYS_{{RETRIEVAL,RANKING,GATEWAY}}_BUNDLE_PUBLIC_KEY_FILE (append it when rotating)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recsys", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="train, evaluate and publish a bundle from interaction data")
    p.add_argument("--data", type=Path, required=True, help="MovieLens 100K folder or generic-layout folder")
    p.add_argument("--out", type=Path, required=True, help="bundles directory (a new version is published here)")
    p.add_argument("--config", type=Path, help="ExportConfig as JSON (unknown keys are an error)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--ray",
        metavar="local|ADDRESS",
        help="run embedding inference, shard index builds and evaluation as Ray tasks: 'local' starts Ray on "
        "this machine, ADDRESS joins a cluster (auto, host:6379, ray://host:10001)",
    )
    p.add_argument(
        "--index-shards",
        type=int,
        default=1,
        metavar="N",
        help="also check the index's recall as served by N retrieval shards (`serve --shards N`)",
    )
    p.add_argument(
        "--signing-key",
        type=Path,
        default=os.environ.get("RECSYS_EXPORT_SIGNING_KEY_FILE") or None,
        help="sign the bundle with this Ed25519 private key, PEM (RECSYS_EXPORT_SIGNING_KEY_FILE; "
        "`recsys keys new-bundle-key` makes one)",
    )
    p.set_defaults(func=_export)

    p = sub.add_parser("tune", help="search export settings (Optuna) on a validation split of the training period")
    p.add_argument("--data", type=Path, required=True, help="MovieLens 100K folder or generic-layout folder")
    p.add_argument("--out", type=Path, required=True, help="folder for config.json, report.md, trials.png, trials.json")
    p.add_argument("--config", type=Path, help="base ExportConfig as JSON: trial 0 and every unsearched setting")
    p.add_argument("--trials", type=int, default=20, help="stop after this many trials (default 20)")
    p.add_argument("--minutes", type=float, help="also stop starting trials after this many minutes")
    p.add_argument("--seed", type=int, default=0, help="the sampler's seed (training is seeded by the config's seed)")
    p.add_argument("--max-cases", type=int, default=2000, help="validation cases per protocol (a seeded sample)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch/BLAS threads per trial (default 1: robust on shared cores)"
    )
    p.add_argument("--no-prune", action="store_true", help="run every trial to the end (no median pruning)")
    p.add_argument(
        "--min-gain-se",
        type=float,
        default=2.0,
        help="keep the base config unless a trial beats it by more than this many standard errors "
        "(default 2; 0: any gain)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_tune)

    p = sub.add_parser("report", help="print a bundle's evaluation report and write report.md and PNG plots")
    p.add_argument("bundle", type=Path, help="a bundles directory (its CURRENT version) or one version's directory")
    p.add_argument("--out", type=Path, help="folder for report.md and the PNGs (default: ./recsys-report-VERSION)")
    p.set_defaults(func=_report)

    p = sub.add_parser("rollback", help="point CURRENT at the kept version before it (services swap to it)")
    p.add_argument("--bundles", type=Path, required=True, help="bundles directory")
    p.set_defaults(func=_rollback)

    p = sub.add_parser("serve", help="run retrieval, ranking and the gateway as child processes")
    p.add_argument("--bundles", type=Path, required=True)
    p.add_argument("--state", default="var/state", help="user-state directory (embedded store) or redis://host:port/db")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="REST port (0 = any free port)")
    p.add_argument("--grpc-port", type=int, default=50050, help="gateway gRPC port (0 = any free port)")
    p.add_argument("--shards", type=int, default=1, help="run retrieval as N index shards (`--shard i/N` each)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("demo", help="the main job: make data if none given, export, serve, show an answer")
    p.add_argument("--workdir", type=Path, default=Path("var/demo"))
    p.add_argument("--data", type=Path, help="data folder (default: synthetic data made in WORKDIR/data)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--exit", action="store_true", help="stop after showing the sample answer")
    p.add_argument("--config", type=Path, help="ExportConfig as JSON for the export step")
    p.set_defaults(func=_demo)

    data = sub.add_parser("data", help="data sets").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("synth", help="write a synthetic data set with planted structure (generic layout)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--items", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_synth)
    p = data.add_parser("fetch", help="download a MovieLens archive into a cache, checked against a pinned sha256")
    p.add_argument("name", choices=("movielens-100k", "movielens-1m"))
    p.add_argument("--cache-dir", type=Path, help="default: ~/.cache/recsys; prints the data folder to use as --data")
    p.set_defaults(func=_fetch)
    p = sub.add_parser("import-events", help="load historical interactions into the user-state store")
    p.add_argument("--data", type=Path, required=True, help="MovieLens 100K folder or generic-layout folder")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--state", type=Path, default=Path("var/state"), help="user-state directory (embedded store)")
    where.add_argument("--redis", help="Redis store URL, redis://host:port/db")
    p.add_argument("--user-key-file", type=Path, help="pseudonymization key file (default: $RECSYS_GATEWAY_USER_KEY)")
    p.add_argument("--mode", choices=("dev", "production"), default=os.environ.get("RECSYS_GATEWAY_MODE", "dev"),
                   help="production: a missing key is an error; dev: one is made in the state dir")  # fmt: skip
    p.add_argument("--max-events-per-user", type=int, default=200, help="newest N events kept per user")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_import_events)

    keys = sub.add_parser("keys", help="credentials for the gateway").add_subparsers(dest="keys_command", required=True)
    p = keys.add_parser("new-api-key", help="make an API key: prints it once, and its keys-file line")
    p.add_argument("--principal", required=True, help="who holds the key (letters, digits, . _ @ -)")
    p.add_argument("--scopes", required=True, help="comma-separated: recommendations:read, events:write, users:erase")
    p.add_argument("--keys-file", type=Path, help="append the line to this keys file (created 0600 if missing)")
    p.set_defaults(func=_new_api_key)
    p = keys.add_parser("new-bundle-key", help="make an Ed25519 key pair for signing bundles")
    p.add_argument("--out", type=Path, required=True, help="folder for bundle_signing.pem and bundle_public.pem")
    p.set_defaults(func=_new_bundle_key)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
