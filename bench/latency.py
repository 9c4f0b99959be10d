"""Latency of the live stack, one request at a time, with its parts measured in the same run.

    python bench/latency.py --bundles BUNDLES_DIR [--requests 2000] [--history 50] [--out latency.json]

Starts `recsys serve` (three processes) on free loopback ports over the published bundle, gives
--users users a random history of --history known items through POST /v1/events, then sends
sequentially (keep-alive, no concurrency):
  - gateway:   POST /v1/recommendations k=10 (store read + ANN + co-visitation + popular + ranking)
  - retrieval: Retrieval.Search by the same user contexts, k=200 (gRPC, direct)
  - ranking:   Ranking.Rank of 350 candidates for the same contexts (gRPC, direct)
and prints p50/p90/p99 per kind plus the ratio of the gateway's median to the sum of the parts'
medians (the gateway's own overhead: REST, store, merging, two hops). Then the same searches back to
back and each after a 2 ms idle gap: what waking an idle service costs per hop. Writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from protos.recsys.v1 import common_pb2, ranking_pb2, ranking_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc  # noqa: E402
from recsys_cli.stack import Stack  # noqa: E402
from recsys_common.bundle import open_bundle  # noqa: E402
from recsys_common.catalog import Catalog  # noqa: E402

IDLE_GAP_MS = 2  # about what a service waits between its calls in the pipeline (the other stages' time)


def percentiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {f"p{q}": round(float(np.percentile(a, q)), 3) for q in (50, 90, 99)} | {"n": len(ms)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundles", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--history", type=int, default=50)
    parser.add_argument("--candidates", type=int, default=350)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/out/latency.json"))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    catalog = Catalog.load(open_bundle(args.bundles))
    histories = {f"bench-{u}": rng.sample(catalog.item_ids, min(args.history, len(catalog))) for u in range(args.users)}

    with tempfile.TemporaryDirectory() as state, Stack(args.bundles, state, http_port=0, grpc_port=0) as stack:
        conn = http.client.HTTPConnection("127.0.0.1", stack.ports["gateway"])

        def post(path: str, body: dict) -> dict:
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            reply = conn.getresponse()
            data = json.loads(reply.read())
            if reply.status != 200:
                raise RuntimeError(f"{path}: {reply.status} {data}")
            return data

        for user, items in histories.items():
            events = [{"user_id": user, "item_id": i, "timestamp": n} for n, i in enumerate(items)]
            post("/v1/events", {"events": events})
        users = list(histories)
        retrieval = retrieval_pb2_grpc.RetrievalStub(grpc.insecure_channel(f"127.0.0.1:{stack.ports['retrieval']}"))
        ranking = ranking_pb2_grpc.RankingStub(grpc.insecure_channel(f"127.0.0.1:{stack.ports['ranking']}"))
        results: dict[str, list[float]] = {"gateway": [], "retrieval": [], "ranking": []}
        for n in tqdm(range(args.requests), desc="sequential requests"):
            user = users[n % len(users)]
            context = common_pb2.UserContext(recent_item_ids=histories[user])
            t = time.perf_counter()
            post("/v1/recommendations", {"user_id": user, "k": 10})
            results["gateway"].append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            retrieval.Search(retrieval_pb2.SearchRequest(context=context, k=200, exclude_context=True), timeout=5)
            results["retrieval"].append((time.perf_counter() - t) * 1000)
            cands = rng.sample(catalog.item_ids, min(args.candidates, len(catalog)))
            request = ranking_pb2.RankRequest(
                context=context, item_ids=cands, source_bits=[1] * len(cands), source_names=["ann"]
            )
            t = time.perf_counter()
            ranking.Rank(request, timeout=5)
            results["ranking"].append((time.perf_counter() - t) * 1000)

        # The same searches again, back to back and then each after an idle gap: in the pipeline every process
        # sleeps while the others work, and waking one costs more than a call to a busy one.
        wake: dict[str, list[float]] = {"back_to_back": [], f"after_{IDLE_GAP_MS}_ms_idle": []}
        for kind, gap_s in zip(wake, (0.0, IDLE_GAP_MS / 1000), strict=True):
            for n in tqdm(range(args.requests // 2), desc=f"Search, {kind.replace('_', ' ')}"):
                context = common_pb2.UserContext(recent_item_ids=histories[users[n % len(users)]])
                if gap_s:
                    time.sleep(gap_s)
                t = time.perf_counter()
                retrieval.Search(retrieval_pb2.SearchRequest(context=context, k=200, exclude_context=True), timeout=5)
                wake[kind].append((time.perf_counter() - t) * 1000)

    summary = {kind: percentiles(ms) for kind, ms in results.items()}
    summary["retrieval_wake_up"] = {kind: percentiles(ms) for kind, ms in wake.items()}
    parts = summary["retrieval"]["p50"] + summary["ranking"]["p50"]
    summary["gateway_over_parts_p50"] = round(summary["gateway"]["p50"] / parts, 3)
    print(f"{'kind':<10} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}")
    for kind in results:
        s = summary[kind]
        print(f"{kind:<10} {s['p50']:>8.3f} {s['p90']:>8.3f} {s['p99']:>8.3f}")
    print(f"gateway p50 / (retrieval p50 + ranking p50) = {summary['gateway_over_parts_p50']}")
    quiet, busy = (summary["retrieval_wake_up"][k]["p50"] for k in reversed(wake))
    print(
        f"retrieval Search p50 after {IDLE_GAP_MS} ms idle {quiet:.3f} ms, back to back {busy:.3f} ms: "
        f"{quiet - busy:+.3f} ms to wake an idle service"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    _plot(results, args.out.with_suffix(".png"))


def _plot(results: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, ms in results.items():
        xs = np.sort(ms)
        ax.plot(xs, np.linspace(0, 1, len(xs)), label=kind)
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms, log)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("Sequential request latency (CDF)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
