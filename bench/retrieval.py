"""Retrieval benchmark: index choice, recall@100 against exact search, latency in process and over gRPC.

    python bench/retrieval.py                       # synthetic 100k and 1M items x 64 (1M builds for minutes)
    python bench/retrieval.py --quick               # smoke run: 20k and 100k items, fewer queries
    python bench/retrieval.py --bundles var/bundles # also the published real bundle (e.g. MovieLens 100K)

For each synthetic clustered catalogue (items and users drawn around the same cluster centres, the way
two-tower embeddings cluster), it runs exporter.ann_index.choose_and_build on held-out user vectors and
reports: the chosen index and its tuned parameter, build time, recall@100 against exact search, index
memory, single-query p50/p99 in process on one thread (exact search beside it, and the serving path
with 50 excluded items through retrieval_svc.ann.AnnIndex), batched throughput (256 queries per call,
1 and 2 threads), recall / shortness / latency against the exclusion ratio, and, for catalogues up to
--grpc-max-items, sequential Search by user context over gRPC on loopback against a real
`python -m retrieval_svc` process. Prints a table, writes JSON (--out) and a PNG plot (--plot).

Medians and ratios from one run are what to compare: the machine is shared (see PERF-NOTES).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exporter.ann_index import IndexPolicy, choose_and_build, exact_topk, recall_at_k, search_params  # noqa: E402
from retrieval_svc.ann import AnnIndex, FilterPolicy, ItemFilter  # noqa: E402
from tests.bundle_factory import clustered_vectors, make_bundle  # noqa: E402

K = 100


def pcts(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def single_query_latency(fn: Any, queries: np.ndarray, warmup: int = 20) -> dict[str, float]:
    """Wall-clock p50/p99, and the same for the thread's CPU time (what the search costs when nobody
    preempts it: on a shared 2-core machine the wall p99 mostly measures the scheduler's time slice)."""
    for q in queries[:warmup]:
        fn(q[None, :])
    times, cpu = [], []
    for q in queries:
        start, start_cpu = time.perf_counter(), time.thread_time()
        fn(q[None, :])
        times.append(time.perf_counter() - start)
        cpu.append(time.thread_time() - start_cpu)
    c = pcts(cpu)
    return {**pcts(times), "cpu_p50_ms": c["p50_ms"], "cpu_p99_ms": c["p99_ms"]}


def batched_qps(index: faiss.Index, params: faiss.SearchParameters, queries: np.ndarray, threads: int) -> float:
    faiss.omp_set_num_threads(threads)
    batch = queries[:256]
    index.search(batch, K, params=params)
    start = time.perf_counter()
    rounds = 0
    while time.perf_counter() - start < 2.0 or rounds < 2:
        index.search(batch, K, params=params)
        rounds += 1
    faiss.omp_set_num_threads(1)
    return round(rounds * len(batch) / (time.perf_counter() - start), 1)


def exclusion_sweep(ann: AnnIndex, emb: np.ndarray, users: np.ndarray, ratios: list[float], n_q: int) -> list[dict]:
    """Recall (against exact search over the eligible items), shortness, method and latency per exclusion ratio."""
    rng = np.random.default_rng(0)
    n = ann.n_items
    filt = ItemFilter.build(n, ann.shard_items, np.zeros(0, np.int64))
    rows = []
    for ratio in ratios:
        excluded = np.unique(rng.choice(np.arange(1, n + 1), size=int(ratio * n), replace=False)).astype(np.int64)
        allowed = np.ones(n + 1, bool)
        allowed[0] = False
        allowed[excluded] = False
        eligible_ids = np.flatnonzero(allowed)
        eligible_vecs = np.ascontiguousarray(emb[eligible_ids])
        hits, short, methods, times = [], 0, {}, []
        for q in users[:n_q]:
            start = time.perf_counter()
            h = ann.search(q[None, :], K, filt, excluded)
            times.append(time.perf_counter() - start)
            _, local = faiss.knn(q[None, :], eligible_vecs, K, metric=faiss.METRIC_INNER_PRODUCT)
            truth = eligible_ids[local[0]]
            hits.append(len(np.intersect1d(h.ids, truth)) / K)
            short += len(h.ids) < K
            methods[h.method] = methods.get(h.method, 0) + 1
        rows.append({"ratio": ratio, "recall": round(float(np.mean(hits)), 4), "short": short, "methods": methods,
                     **pcts(times)})  # fmt: skip
    return rows


def grpc_latency(bundles: Path, histories: list[list[str]], vectors: np.ndarray | None) -> dict[str, Any]:
    """Sequential Search over loopback against a real retrieval process (k=100, context excluded)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from protos.recsys.v1 import common_pb2, retrieval_pb2, retrieval_pb2_grpc

    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        cmd = [sys.executable, "-m", "retrieval_svc", "--bundles", str(bundles), "--port", "0"]
        proc = subprocess.Popen([*cmd, "--port-file", str(port_file), "--poll-interval-s", "0"], cwd=ROOT,
                                stdout=subprocess.DEVNULL)  # fmt: skip
        try:
            deadline = time.monotonic() + 600
            while not port_file.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("retrieval process did not start")
                time.sleep(0.05)
            channel = grpc.insecure_channel(f"127.0.0.1:{port_file.read_text()}")
            stub = retrieval_pb2_grpc.RetrievalStub(channel)
            out: dict[str, Any] = {}
            # The bare round trip in the same run (grpc.health.v1 Check): the floor under every Search.
            health = health_pb2_grpc.HealthStub(channel)
            for _ in range(50):
                health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            times = []
            for _ in range(len(histories)):
                start = time.perf_counter()
                health.Check(health_pb2.HealthCheckRequest(), timeout=10)
                times.append(time.perf_counter() - start)
            out["bare_round_trip"] = pcts(times)
            requests = {
                "context": [
                    retrieval_pb2.SearchRequest(
                        context=common_pb2.UserContext(recent_item_ids=h), k=K, exclude_context=True
                    )
                    for h in histories
                ]
            }
            if vectors is not None:
                requests["vector"] = [
                    retrieval_pb2.SearchRequest(vector=retrieval_pb2.Vector(values=v.tolist()), k=K) for v in vectors
                ]
            for name, reqs in requests.items():
                for r in reqs[:50]:
                    stub.Search(r, timeout=10)
                times = []
                for r in reqs:
                    start = time.perf_counter()
                    reply = stub.Search(r, timeout=10)
                    times.append(time.perf_counter() - start)
                    assert len(reply.items) == K
                out[name] = {**pcts(times), "n": len(reqs), "method": reply.method}
            rss = Path(f"/proc/{proc.pid}/status").read_text().split("VmRSS:")[1].split()[0]
            out["server_rss_mib"] = round(int(rss) / 1024, 1)
            channel.close()
            return out
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)


def bench_catalogue(name: str, emb: np.ndarray, users: np.ndarray, args: argparse.Namespace,
                    bundle_dir: Path | None = None) -> dict[str, Any]:  # fmt: skip
    n, dim = emb.shape[0] - 1, emb.shape[1]
    n_recall = min(args.recall_queries, len(users) // 2)
    holdout, probe = users[:n_recall], users[n_recall:]
    print(f"\n== {name}: {n} items x {dim}", flush=True)
    faiss.omp_set_num_threads(os.cpu_count() or 1)  # building may use every core; serving uses one
    start = time.perf_counter()
    index, entry, report = choose_and_build(emb, holdout, IndexPolicy())
    build_s = time.perf_counter() - start
    faiss.omp_set_num_threads(1)
    print(f"chosen {entry['factory']} {entry['params']} recall@{report.k} {report.recall} (build+tune {build_s:.1f} s)")
    with tempfile.TemporaryDirectory() as tmp:
        index_file = Path(tmp) / "items.faiss"
        faiss.write_index(index, str(index_file))
        index_bytes = index_file.stat().st_size
        np.save(Path(tmp) / "item_emb.npy", emb)
        emb_map = np.load(Path(tmp) / "item_emb.npy", mmap_mode="r")
        ann = AnnIndex(index_file, entry, emb_map, policy=FilterPolicy())
        params = search_params(entry["type"], entry["params"])
        lat_q = probe[: args.latency_queries]
        # Recall on queries not used for tuning.
        _, truth = exact_topk(emb[1:], lat_q, K)
        _, found = index.search(lat_q, K, params=params)
        recall_probe = recall_at_k(found, truth)
        chosen = single_query_latency(lambda q: index.search(q, K, params=params), lat_q)
        filt = ItemFilter.build(n, ann.shard_items, np.zeros(0, np.int64))
        rng = np.random.default_rng(1)
        seen = [np.unique(rng.integers(1, n + 1, size=50)).astype(np.int64) for _ in range(len(lat_q))]
        it = iter(seen * 2)
        serving = single_query_latency(lambda q: ann.search(q, K, filt, next(it)), lat_q)
        flat = faiss.IndexFlatIP(dim)
        flat.add(np.ascontiguousarray(emb[1:]))
        exact = single_query_latency(lambda q: flat.search(q, K), lat_q[: args.exact_queries], warmup=3)
        qps = {f"{t}_threads": batched_qps(index, params, probe, t) for t in (1, 2)}
        sweep = exclusion_sweep(ann, emb, probe, args.ratios, args.sweep_queries)
    result: dict[str, Any] = {
        "name": name,
        "n_items": n,
        "dim": dim,
        "index": entry,
        "tuning": report.to_dict(),
        "build_and_tune_s": round(build_s, 1),
        "build_s": report.build_s,
        "index_mib": round(index_bytes / 2**20, 1),
        "vectors_mib": round(n * dim * 4 / 2**20, 1),
        "recall_at_100_holdout": report.recall,
        "recall_at_100_probe": round(recall_probe, 4),
        "in_process_1_thread": {"chosen": chosen, "chosen_with_50_excluded": serving, "exact": exact},
        "batched_qps_256": qps,
        "exclusion_sweep": sweep,
    }
    if bundle_dir is not None or n <= args.grpc_max_items:
        histories = [[f"i{i:03d}" for i in rng.integers(1, n + 1, size=20)] for _ in range(args.grpc_requests)]
        if bundle_dir is None:
            with tempfile.TemporaryDirectory() as tmp:
                make_bundle(Path(tmp), emb=emb, prebuilt=(index, entry))
                result["grpc"] = grpc_latency(Path(tmp), histories, probe[: args.grpc_requests])
        else:
            result["grpc"] = grpc_latency(bundle_dir, args.real_histories, None)
    return result


def real_bundle(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """item_emb and user vectors (the bundle's user tower on random histories of its items)."""
    from recsys_common.bundle import open_bundle
    from retrieval_svc.core import Retriever

    bundle = open_bundle(args.bundles)
    retriever = Retriever(bundle, warm=False)
    rng = np.random.default_rng(0)
    ids = retriever.catalog.item_ids
    histories = [[ids[i] for i in rng.integers(0, len(ids), size=rng.integers(1, 30))] for _ in range(3000)]
    args.real_histories = histories[: args.grpc_requests]
    users = np.concatenate([retriever.user_vectors(histories[i : i + 256]) for i in range(0, len(histories), 256)])
    emb = np.load(bundle.file("item_emb.npy"))
    print(f"real bundle {bundle.version}: manifest index {bundle.manifest.get('index')}")
    return emb, users


def table(results: list[dict[str, Any]]) -> str:
    head = (f"{'catalogue':<22}{'index':<24}{'param':<15}{'recall@100':>11}{'build s':>9}{'MiB':>8}"
            f"{'p50 ms':>8}{'p99 ms':>8}{'cpu p99':>8}{'excl50 p99':>11}{'exact p50':>10}{'qps 1t':>9}"
            f"{'gRPC p50':>9}{'gRPC p99':>9}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in results:
        p = r["in_process_1_thread"]
        g = r.get("grpc", {}).get("context", {})
        param = {k: v for k, v in r["index"]["params"].items() if k in ("efSearch", "nprobe")}
        lines.append(
            f"{r['name']:<22}{r['index']['factory']:<24}{json.dumps(param)[1:-1]:<15}{r['recall_at_100_probe']:>11.4f}"
            f"{r['build_s']:>9.1f}{r['index_mib']:>8.1f}{p['chosen']['p50_ms']:>8.3f}{p['chosen']['p99_ms']:>8.3f}"
            f"{p['chosen']['cpu_p99_ms']:>8.3f}"
            f"{p['chosen_with_50_excluded']['p99_ms']:>11.3f}{p['exact']['p50_ms']:>10.3f}"
            f"{r['batched_qps_256']['1_threads']:>9.0f}{g.get('p50_ms', float('nan')):>9.3f}"
            f"{g.get('p99_ms', float('nan')):>9.3f}"
        )
    lines.append("")
    lines.append("exclusion ratio sweep (recall vs exact over the eligible items; short answers; methods; p50/p99 ms)")
    for r in results:
        for s in r["exclusion_sweep"]:
            lines.append(f"  {r['name']:<20} r={s['ratio']:<5} recall {s['recall']:.4f} short {s['short']} "
                         f"{s['methods']} {s['p50_ms']:.3f}/{s['p99_ms']:.3f}")  # fmt: skip
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r["name"] for r in results]
    x = np.arange(len(names))
    bars = [
        ("chosen p50", lambda r: r["in_process_1_thread"]["chosen"]["p50_ms"]),
        ("chosen p99 (wall)", lambda r: r["in_process_1_thread"]["chosen"]["p99_ms"]),
        ("chosen p99 (CPU)", lambda r: r["in_process_1_thread"]["chosen"]["cpu_p99_ms"]),
        ("exact p50", lambda r: r["in_process_1_thread"]["exact"]["p50_ms"]),
    ]
    for off, (label, get) in enumerate(bars):
        a.bar(x + off * 0.2, [get(r) for r in results], 0.2, label=label)
    a.set_xticks(x + 0.3, names, rotation=15)
    a.set_yscale("log")
    a.set_ylabel("ms per query, 1 thread (log)")
    a.axhline(1.0, color="grey", ls="--", lw=0.8)
    a.legend()
    a.set_title("single-query latency in process")
    for r in results:
        s = r["exclusion_sweep"]
        b.plot([p["ratio"] for p in s], [p["recall"] for p in s], marker="o", label=r["name"])
    b.set_xlabel("share of the index excluded")
    b.set_ylabel("recall@100 among eligible items")
    b.set_ylim(0.8, 1.005)
    b.legend()
    b.set_title("filters inside the search")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000", help="synthetic catalogue sizes, comma-separated")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--noise", type=float, default=0.8, help="cluster spread of the vectors (1.0 is harder)")
    parser.add_argument("--quick", action="store_true", help="20k and 100k items, fewer queries (smoke run)")
    parser.add_argument("--bundles", type=Path, help="also benchmark the published bundle in this directory")
    parser.add_argument("--recall-queries", type=int, default=1000, help="held-out user vectors for tuning")
    parser.add_argument("--latency-queries", type=int, default=2000)
    parser.add_argument("--exact-queries", type=int, default=300)
    parser.add_argument("--sweep-queries", type=int, default=200)
    parser.add_argument("--grpc-requests", type=int, default=2000)
    parser.add_argument("--grpc-max-items", type=int, default=100_000, help="gRPC runs for catalogues up to this")
    parser.add_argument("--ratios", default="0,0.5,0.9,0.99")
    parser.add_argument("--out", type=Path, default=Path("bench-retrieval.json"))
    parser.add_argument("--plot", type=Path, default=Path("bench-retrieval.png"))
    args = parser.parse_args()
    args.ratios = [float(r) for r in args.ratios.split(",")]
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.quick:
        sizes = [20_000, 100_000]
        args.latency_queries, args.exact_queries, args.sweep_queries, args.grpc_requests = 500, 100, 50, 500
    results = []
    for n in sizes:
        total = n + 2 * max(args.recall_queries, args.latency_queries)
        x = clustered_vectors(total, args.dim, n_clusters=max(100, n // 100), noise=args.noise, seed=0)
        emb = np.vstack([np.zeros((1, args.dim), np.float32), x[:n]])
        results.append(bench_catalogue(f"synthetic {n // 1000}k", emb, x[n:], args))
        del x, emb
        print(table(results[-1:]).splitlines()[2], flush=True)
    if args.bundles:
        emb, users = real_bundle(args)
        results.append(bench_catalogue(f"bundle {len(emb) - 1}", emb, users, args, bundle_dir=args.bundles))
    text = table(results)
    print("\n" + text)
    args.out.write_text(json.dumps({"machine_cpus": os.cpu_count(), "k": K, "results": results}, indent=2))
    plot(results, args.plot)
    print(f"\nwrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
