"""Real-time personalization through the live stack: the `replay` protocol with and without updates.

Exports a bundle from the first 90 % of the data (by time), then runs the `replay` protocol twice
against `recsys serve`, as an outside client over REST: **real-time** (each later event is posted
after the request that precedes it, so histories grow) and **frozen** (later events are never
posted: histories stay as they were at the split). Same bundle, same cases, same scoring; prints
HR@10 / NDCG@10 of both, their ratio, and the REST ingest rate of the training events.

    python bench/replay.py --data ../shared/data/ml-100k --work /tmp/replay

`--ingest-only` measures only ingest: it starts the gateway alone (`python -m gateway`, on a tiny
bundle, no retrieval or ranking needed to store events) on the given store and posts every event
of --data in time order, in batches of --batch, from --clients keep-alive connections:

    python bench/replay.py --ingest-only --data ../shared/data/ml-100k --store redis://127.0.0.1:6390/0
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from quality import (
    Asker,
    BenchError,
    GatewayClient,
    K,
    default_recsys,
    evaluate_replay,
    ingest,
    pick_users,
    post_events,
    prepare_workdir,
    run_export,
    start_serve,
    stop_serve,
    time_ordered,
    write_generic_layout,
)

from exporter.data import DataError, Dataset, load_dataset
from exporter.protocols import replay_split

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_mode(
    mode: str, recsys: list[str], ds: Dataset, train_mask: np.ndarray, users: set[str], work: Path, args: Any
) -> dict[str, Any]:
    """One pass: a fresh `recsys serve` and store, ingest the training part, replay the rest."""
    proc, port = start_serve(
        recsys, work / "bundles", work / f"state-{mode}", work / f"serve-{mode}.log", args.startup_timeout_s
    )
    client = GatewayClient("127.0.0.1", port)
    try:
        ingested = ingest(client, ds, time_ordered(np.flatnonzero(train_mask), ds.timestamps), args.batch)
        asker = Asker(client)
        model, pop, accepted = evaluate_replay(
            ds, client, asker, train_mask, users, post_later_events=mode == "realtime"
        )
    finally:
        client.close()
        stop_serve(proc)
    return {
        "recsys": model.summary(),
        "MostPop": pop.summary(),
        "cases": len(model.hr),
        "ingest": ingested,
        "later_events_posted": accepted,
        "serving": asker.report(),
    }


def replay(args: argparse.Namespace) -> dict[str, Any]:
    work = prepare_workdir(args.work)
    for sub in ("state-realtime", "state-frozen"):
        if (work / sub).exists():
            raise BenchError(f"{work / sub} exists from an earlier run: use a new --work dir")
    recsys = shlex.split(args.recsys) if args.recsys else default_recsys()
    ds = load_dataset(args.data)
    train_mask = replay_split(ds.timestamps, quantile=0.9)
    users = pick_users(ds.user_ids[~train_mask].tolist(), args.limit_users, args.seed)
    write_generic_layout(ds, train_mask, work / "data")
    export_s = run_export(recsys, work / "data", work / "bundles", work / "export.log")
    modes = {mode: run_mode(mode, recsys, ds, train_mask, users, work, args) for mode in ("realtime", "frozen")}
    rt, fr = modes["realtime"]["recsys"][f"hr@{K}"], modes["frozen"]["recsys"][f"hr@{K}"]
    return {
        "protocol": "replay",
        "data": str(args.data),
        "n_train_events": int(train_mask.sum()),
        "evaluated_users": len(users),
        "modes": modes,
        f"hr@{K}_ratio_realtime_over_frozen": rt / fr if fr > 0 else None,
        "export_seconds": export_s,
        "work": str(work),
    }


def print_replay(r: dict[str, Any]) -> None:
    print(f"\nreplay on {r['data']}: {r['n_train_events']} training events, {r['evaluated_users']} users")
    print(f"{'run':<22}{f'HR@{K}':>9}{f'NDCG@{K}':>10}{'cases':>8}{'ingest ev/s':>13}")
    for mode, m in r["modes"].items():
        for name in ("recsys", "MostPop"):
            s = m[name]
            rate = f"{m['ingest']['events_per_s']:>13.0f}" if name == "recsys" else ""
            print(f"{mode + ' ' + name:<22}{s[f'hr@{K}']:>9.4f}{s[f'ndcg@{K}']:>10.4f}{m['cases']:>8}{rate}")
    ratio = r[f"hr@{K}_ratio_realtime_over_frozen"]
    print(f"real-time / frozen HR@{K}: {ratio:.3f}" if ratio is not None else "frozen HR is 0: no ratio")


# --- ingest only ----------------------------------------------------------------------------------


def start_gateway(store: str, work: Path, timeout_s: float) -> tuple[subprocess.Popen[bytes], int]:
    """The gateway alone on a tiny bundle: enough to take events (retrieval and ranking are not asked)."""
    sys.path.insert(0, str(REPO_ROOT))
    from tests.bundle_factory import make_bundle

    bundles = work / "tiny-bundles"
    if not bundles.exists():
        make_bundle(bundles)
    port_file = work / "gateway.port"
    port_file.unlink(missing_ok=True)
    cmd = [
        sys.executable, "-m", "gateway", "--bundles", str(bundles), "--state", store, "--port", "0", "--grpc-port", "0",
        "--port-file", str(port_file), "--retrieval", "127.0.0.1:9", "--ranking", "127.0.0.1:9",
    ]  # fmt: skip
    print(f"$ {shlex.join(cmd)}", file=sys.stderr)
    log = (work / "gateway.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if port_file.exists() and port_file.read_text().strip():
            return proc, int(port_file.read_text())
        if proc.poll() is not None:
            raise BenchError(f"gateway exited with code {proc.returncode}; see {work / 'gateway.log'}")
        time.sleep(0.05)
    stop_serve(proc)
    raise BenchError(f"gateway did not start within {timeout_s:.0f} s; see {work / 'gateway.log'}")


def ingest_only(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work or tempfile.mkdtemp(prefix="recsys-ingest-"))
    work.mkdir(parents=True, exist_ok=True)
    store = args.store if "://" in args.store else str(work / f"state-{time.time_ns()}")
    ds = load_dataset(args.data)
    rows = time_ordered(np.arange(len(ds), dtype=np.int64), ds.timestamps)
    proc, port = start_gateway(store, work, args.startup_timeout_s)
    parts = [rows[i :: args.clients] for i in range(args.clients)]
    accepted = [0] * args.clients
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        client = GatewayClient("127.0.0.1", port)
        try:
            accepted[n] = post_events(client, ds, parts[n], args.batch)
        except BaseException as exc:  # reported below, after the clock stops
            errors.append(exc)
        finally:
            client.close()

    try:
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(args.clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - start
    finally:
        stop_serve(proc)
    if errors:
        raise BenchError(f"ingest failed: {errors[0]!r}")
    return {
        "store": store.split("@")[-1],
        "events": len(rows),
        "accepted": sum(accepted),
        "batch": args.batch,
        "clients": args.clients,
        "seconds": seconds,
        "events_per_s": len(rows) / seconds,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--data", type=Path, required=True, help="dataset dir: MovieLens 100K or the generic layout")
    p.add_argument("--work", type=Path, help="work dir (default: a new temp dir)")
    p.add_argument("--recsys", help="command that runs the recsys CLI (default: the venv's console script)")
    p.add_argument("--limit-users", type=int, help="evaluate a seeded sample of N users (ingest uses everyone)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=500, help="events per POST /v1/events")
    p.add_argument("--out", type=Path, help="results JSON (default: WORK/replay.json)")
    p.add_argument("--startup-timeout-s", type=float, default=180.0)
    p.add_argument("--ingest-only", action="store_true", help="only measure REST ingest into --store")
    p.add_argument("--store", default="sqlite", help="with --ingest-only: sqlite (a new dir in WORK) or a store URL")
    p.add_argument("--clients", type=int, default=1, help="with --ingest-only: concurrent keep-alive connections")
    args = p.parse_args(argv)
    if not 1 <= args.batch <= 1000:
        p.error(f"--batch must be in 1..1000 (got {args.batch})")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = ingest_only(args) if args.ingest_only else replay(args)
    except (BenchError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.ingest_only:
        print(f"ingest into {result['store']}: {result['events']} events in {result['seconds']:.2f} s = "
              f"{result['events_per_s']:.0f} events/s (batches of {result['batch']}, {result['clients']} client(s), "
              f"accepted {result['accepted']})")  # fmt: skip
        return 0
    print_replay(result)
    out = args.out or Path(result["work"]) / "replay.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
