"""Recommendation quality and serving numbers of the live stack on a dataset, beside MostPop.

Runs what a user would run on their own data: split it by a protocol of ARCHITECTURE.md (`loo` or
`replay`), export bundles from the training part with `recsys export`, start `recsys serve`, feed
the training events through the REST API, then ask for recommendations one request at a time and
score them. Prints HR@10 and NDCG@10 of the stack and of MostPop on the same split, the number of
evaluated cases, the ingest rate and the latency of the recommendation requests.

    python bench/quality.py --data ../shared/data/ml-100k --protocol loo --limit-users 100
    python bench/quality.py --data demo-data --protocol replay --work /tmp/q --out replay.json
"""

from __future__ import annotations

import argparse
import csv
import http.client
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from exporter.data import DataError, Dataset, load_dataset
from exporter.metrics import hit_rate_at_k, ndcg_at_k
from exporter.protocols import loo_split, replay_events, replay_split

K = 10
EVENT_BATCH = 1000
WORK_MARKER = ".recsys-quality"  # marks a work dir this bench created, so a rerun may clear it
REPO_ROOT = Path(__file__).resolve().parents[1]


class BenchError(RuntimeError):
    """A step of the benchmark failed; the message says which and where its log is."""


# --- data: split, training part on disk, MostPop ------------------------------------------------


def write_generic_layout(ds: Dataset, train_mask: npt.NDArray[np.bool_], out_dir: Path) -> int:
    """Write the training rows (file order) as `interactions.csv`, and `items.csv` for their items.

    Only items seen in the training part get a metadata row: an item that first appears later was
    not known at fit time. Returns the number of interaction rows written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    users = ds.user_ids[train_mask].tolist()
    items = ds.item_ids[train_mask].tolist()
    stamps = ds.timestamps[train_mask].tolist()
    with (out_dir / "interactions.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(("user_id", "item_id", "timestamp"))
        writer.writerows(zip(users, items, stamps, strict=True))
    if ds.titles or ds.genres:
        with (out_dir / "items.csv").open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(("item_id", "title", "genres"))
            for item in sorted(set(items)):
                writer.writerow((item, ds.titles.get(item, ""), "|".join(ds.genres.get(item, ()))))
    return len(users)


def popularity_order(train_items: Iterable[str]) -> list[str]:
    """Items by descending interaction count in the training part (ties by item id): MostPop's ranking.

    Counts interactions (rows), the rule the exporter's popularity table uses.
    """
    counts = Counter(train_items)
    return sorted(counts, key=lambda item: (-counts[item], item))


def most_pop(order: Sequence[str], seen: set[str], k: int = K) -> list[str]:
    """The k most popular items the user has not interacted with."""
    out: list[str] = []
    for item in order:
        if item not in seen:
            out.append(item)
            if len(out) == k:
                break
    return out


def histories(users: Iterable[str], items: Iterable[str]) -> dict[str, set[str]]:
    """Each user's set of items."""
    seen: dict[str, set[str]] = {}
    for u, i in zip(users, items, strict=True):
        seen.setdefault(u, set()).add(i)
    return seen


def pick_users(candidates: Iterable[str], limit: int | None, seed: int) -> set[str]:
    """All candidate users, or a seeded sample of `limit` of them."""
    users = sorted(set(candidates))
    if limit is None or limit >= len(users):
        return set(users)
    rng = np.random.default_rng(seed)
    return {users[i] for i in rng.choice(len(users), size=limit, replace=False)}


@dataclass
class Scores:
    """Running HR@k / NDCG@k of one recommender over evaluated cases."""

    index: dict[str, int]
    hr: list[float] = field(default_factory=list)
    ndcg: list[float] = field(default_factory=list)

    def add(self, ranked: Sequence[str], target: str) -> None:
        ranked_idx = np.array([self.index.get(item, -1) for item in ranked], dtype=np.int64)
        self.hr.append(hit_rate_at_k(ranked_idx, self.index[target], K))
        self.ndcg.append(ndcg_at_k(ranked_idx, self.index[target], K))

    def summary(self) -> dict[str, float]:
        n = len(self.hr)
        return {f"hr@{K}": float(np.mean(self.hr)) if n else 0.0, f"ndcg@{K}": float(np.mean(self.ndcg)) if n else 0.0}


# --- the live stack: export, serve, HTTP ----------------------------------------------------------


# A keep-alive connection the server closed while idle fails with one of these on the next request.
_RECONNECTABLE = (http.client.RemoteDisconnected, http.client.CannotSendRequest, ConnectionResetError, BrokenPipeError)


class _NoDelayConnection(http.client.HTTPConnection):
    """TCP_NODELAY, so a small request is never held back by Nagle waiting for a delayed ACK."""

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class GatewayClient:
    """JSON over one keep-alive HTTP/1.1 connection (http.client: far less overhead per call than httpx)."""

    def __init__(self, host: str, port: int, timeout_s: float = 30.0) -> None:
        self._conn = _NoDelayConnection(host, port, timeout=timeout_s)

    def request(self, method: str, path: str, body: object = None) -> tuple[int, bytes]:
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        for attempt in range(2):
            try:
                self._conn.request(method, path, body=payload, headers=headers)
                resp = self._conn.getresponse()
                return resp.status, resp.read()
            except _RECONNECTABLE:
                # The server may close an idle keep-alive connection; reconnect once. Events carry
                # event ids, so resending a batch is safe.
                self._conn.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def post_json(self, path: str, body: object) -> dict[str, Any]:
        status, data = self.request("POST", path, body)
        if status != 200:
            raise BenchError(f"POST {path} answered HTTP {status}: {data[:500].decode(errors='replace')}")
        result: dict[str, Any] = json.loads(data)
        return result

    def close(self) -> None:
        self._conn.close()


def default_recsys() -> list[str]:
    """The `recsys` console script beside this interpreter, else the repo's venv, else on PATH."""
    for candidate in (Path(sys.executable).parent / "recsys", REPO_ROOT / ".venv" / "bin" / "recsys"):
        if candidate.is_file():
            return [str(candidate)]
    found = shutil.which("recsys")
    if found is None:
        raise BenchError("no `recsys` console script found (pip install -e . in the venv, or pass --recsys CMD)")
    return [found]


def _tail(path: Path, n_lines: int = 20) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n_lines:])


def run_export(recsys: list[str], data_dir: Path, bundles: Path, log_path: Path) -> float:
    """`recsys export`, its output copied to the terminal and to log_path. Returns seconds taken."""
    cmd = [*recsys, "export", "--data", str(data_dir), "--out", str(bundles)]
    print(f"$ {shlex.join(cmd)}  (log: {log_path})", file=sys.stderr)
    start = time.perf_counter()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        # Raw chunks, not lines: keeps the exporter's own progress bars (carriage returns) live.
        while chunk := os.read(proc.stdout.fileno(), 65536):
            log.write(chunk)
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
        code = proc.wait()
    if code != 0:
        # Its output is already on the terminal, so name the log instead of repeating it.
        raise BenchError(f"recsys export failed with exit code {code}; its output is in {log_path}")
    return time.perf_counter() - start


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_serve(
    recsys: list[str], bundles: Path, state: Path, log_path: Path, timeout_s: float
) -> tuple[subprocess.Popen[bytes], int]:
    """Start `recsys serve` on a free port and wait until GET /healthz answers 200."""
    port = free_port()
    # Any free gRPC port: the bench only speaks REST, and two runs (or a running demo) must not collide.
    cmd = [*recsys, "serve", "--bundles", str(bundles), "--port", str(port), "--grpc-port", "0", "--state", str(state)]
    print(f"$ {shlex.join(cmd)}  (log: {log_path})", file=sys.stderr)
    with log_path.open("wb") as log:
        # Its own session: Ctrl-C on the bench does not hit the server, the finally block stops it.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            raise BenchError(
                f"recsys serve exited with code {code} before /healthz answered; see {log_path}:\n{_tail(log_path)}"
            )
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2.0)
            conn.request("GET", "/healthz")
            status = conn.getresponse().status
            conn.close()
            if status == 200:
                return proc, port
            last = f"HTTP {status}"
        except OSError as exc:
            last = type(exc).__name__
        time.sleep(0.25)
    stop_serve(proc)
    raise BenchError(
        f"recsys serve did not answer GET /healthz with 200 within {timeout_s:.0f} s (last: {last}); "
        f"see {log_path}:\n{_tail(log_path)}"
    )


def stop_serve(proc: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
    """SIGTERM, wait; SIGKILL its process group only if it does not stop within grace_s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            print(f"recsys serve (pid {proc.pid}) ignored SIGTERM for {grace_s:.0f} s; killing it", file=sys.stderr)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # Children left behind in the server's own session (it was started with start_new_session).
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return
    print(f"recsys serve left processes in group {proc.pid}; sending them SIGTERM", file=sys.stderr)
    os.killpg(proc.pid, signal.SIGTERM)


# --- feeding and asking ---------------------------------------------------------------------------


def event_json(ds: Dataset, row: int) -> dict[str, object]:
    # The row index is a stable id for the event: resending it is a no-op for an idempotent store.
    return {
        "user_id": str(ds.user_ids[row]),
        "item_id": str(ds.item_ids[row]),
        "timestamp": int(ds.timestamps[row]),
        "event_id": f"r{row}",
    }


def post_events(client: GatewayClient, ds: Dataset, rows: Sequence[int], batch_size: int = EVENT_BATCH) -> int:
    """POST rows in batches of up to batch_size; returns the number the gateway accepted."""
    accepted = 0
    for start in range(0, len(rows), batch_size):
        batch = [event_json(ds, r) for r in rows[start : start + batch_size]]
        accepted += int(client.post_json("/v1/events", {"events": batch})["accepted"])
    return accepted


def ingest(client: GatewayClient, ds: Dataset, rows: Sequence[int], batch_size: int = EVENT_BATCH) -> dict[str, float]:
    """Feed rows (already in time order) and time it."""
    accepted = 0
    start = time.perf_counter()
    with tqdm(total=len(rows), desc="ingest", unit="ev", unit_scale=True, mininterval=0.5) as bar:
        for lo in range(0, len(rows), batch_size):
            chunk = rows[lo : lo + batch_size]
            accepted += post_events(client, ds, chunk, batch_size)
            bar.update(len(chunk))
    seconds = time.perf_counter() - start
    return {
        "events": len(rows),
        "accepted": accepted,
        "seconds": seconds,
        "events_per_s": len(rows) / seconds if seconds > 0 else 0.0,
        "batch": batch_size,
    }


@dataclass
class Asker:
    """Asks the gateway for K items, one request at a time, and keeps what a report needs."""

    client: GatewayClient
    latencies_ms: list[float] = field(default_factory=list)
    versions: Counter[str] = field(default_factory=Counter)
    degraded: Counter[str] = field(default_factory=Counter)
    missing_stages: Counter[str] = field(default_factory=Counter)
    partial: int = 0
    seen_in_recs: int = 0
    short_lists: int = 0

    def recommend(self, user: str, seen: set[str]) -> list[str]:
        start = time.perf_counter()
        answer = self.client.post_json("/v1/recommendations", {"user_id": user, "k": K})
        self.latencies_ms.append((time.perf_counter() - start) * 1e3)
        items = [str(entry["item_id"]) for entry in answer.get("items", [])]
        self.versions[str(answer.get("bundle_version", "?"))] += 1
        if answer.get("degraded"):
            self.degraded[str(answer["degraded"])] += 1
        if answer.get("partial"):
            self.partial += 1
            self.missing_stages.update(str(m.get("stage", "?")) for m in answer.get("missing", []))
        # Diagnostics, not corrections: the protocols rank only unseen items, so a seen item is a miss.
        self.seen_in_recs += sum(item in seen for item in items)
        self.short_lists += len(items) < K
        return items

    def report(self) -> dict[str, object]:
        lat = np.asarray(self.latencies_ms)
        return {
            "latency_ms": {
                "n": int(lat.size),
                "p50": float(np.percentile(lat, 50)) if lat.size else None,
                "p99": float(np.percentile(lat, 99)) if lat.size else None,
                "mean": float(lat.mean()) if lat.size else None,
            },
            "bundle_versions": dict(self.versions),
            "degraded": dict(self.degraded),
            "partial": self.partial,
            "missing_stages": dict(self.missing_stages),
            "recommended_items_already_seen": self.seen_in_recs,
            "lists_shorter_than_k": self.short_lists,
        }


def time_ordered(rows: npt.NDArray[np.int64], timestamps: npt.NDArray[np.int64]) -> list[int]:
    """rows sorted by timestamp, file order breaking ties."""
    order = np.lexsort((rows, timestamps[rows]))
    result: list[int] = rows[order].tolist()
    return result


def evaluate_loo(
    ds: Dataset, asker: Asker, train_mask: npt.NDArray[np.bool_], test_rows: npt.NDArray[np.int64], users: set[str]
) -> tuple[Scores, Scores]:
    """Recommend once per selected user after the whole training part; the target is the held-out row."""
    index = {item: i for i, item in enumerate(np.unique(ds.item_ids).tolist())}
    model, pop = Scores(index), Scores(index)
    seen = histories(ds.user_ids[train_mask].tolist(), ds.item_ids[train_mask].tolist())
    order = popularity_order(ds.item_ids[train_mask].tolist())
    cases = [r for r in test_rows.tolist() if str(ds.user_ids[r]) in users]
    for row in tqdm(cases, desc="loo", unit="user", mininterval=0.5):
        user, target = str(ds.user_ids[row]), str(ds.item_ids[row])
        user_seen = seen.get(user, set())
        model.add(asker.recommend(user, user_seen), target)
        pop.add(most_pop(order, user_seen), target)
    return model, pop


def evaluate_replay(
    ds: Dataset,
    client: GatewayClient,
    asker: Asker,
    train_mask: npt.NDArray[np.bool_],
    users: set[str],
    post_later_events: bool = True,
) -> tuple[Scores, Scores, int]:
    """Replay later events in time order: recommend before each counted event, then post the event.

    Every later event is posted (counted or not, selected user or not) so that histories and
    real-time counts grow as they would in production; events are held back and sent as one batch
    just before the next recommendation request, which sees exactly the events before it.
    With post_later_events=False nothing is posted: the gateway's histories stay frozen at the
    split (the baseline that real-time updates are measured against); cases and scoring are the same.
    Returns (model scores, MostPop scores, later events the gateway accepted).
    """
    index = {item: i for i, item in enumerate(np.unique(ds.item_ids).tolist())}
    model, pop = Scores(index), Scores(index)
    seen = histories(ds.user_ids[train_mask].tolist(), ds.item_ids[train_mask].tolist())
    order = popularity_order(ds.item_ids[train_mask].tolist())
    events = list(replay_events(ds.user_ids, ds.item_ids, ds.timestamps, train_mask))
    n_cases = sum(ev.counted and str(ds.user_ids[ev.row]) in users for ev in events)
    pending: list[int] = []
    accepted = 0
    with tqdm(total=n_cases, desc="replay", unit="case", mininterval=0.5) as bar:
        for ev in events:
            user, item = str(ds.user_ids[ev.row]), str(ds.item_ids[ev.row])
            user_seen = seen.setdefault(user, set())
            if ev.counted and user in users:
                accepted += post_events(client, ds, pending if post_later_events else [])
                pending.clear()
                model.add(asker.recommend(user, user_seen), item)
                pop.add(most_pop(order, user_seen), item)
                bar.update(1)
            pending.append(ev.row)
            user_seen.add(item)
    accepted += post_events(client, ds, pending if post_later_events else [])
    return model, pop, accepted


# --- the run ---------------------------------------------------------------------------------------


def prepare_workdir(work: Path | None) -> Path:
    """A fresh work dir, or the given one if it is empty or was made by an earlier run of this bench."""
    if work is None:
        work = Path(tempfile.mkdtemp(prefix="recsys-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    marker = work / WORK_MARKER
    if any(work.iterdir()) and not marker.exists():
        raise BenchError(f"--work {work} is not empty and was not made by this bench; give an empty or new dir")
    # A rerun must not see the previous run's user state (the embedded store survives restarts).
    for sub in ("data", "bundles", "state"):
        shutil.rmtree(work / sub, ignore_errors=True)
    marker.touch()
    return work


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--data", type=Path, required=True, help="dataset dir: MovieLens 100K or the generic layout")
    p.add_argument("--protocol", choices=("loo", "replay"), required=True)
    p.add_argument("--work", type=Path, help="work dir for data/, bundles/, state/ and logs (default: a new temp dir)")
    p.add_argument("--recsys", help="command that runs the recsys CLI (default: the venv's console script)")
    p.add_argument(
        "--bundles",
        type=Path,
        help="serve this bundles dir instead of exporting (it must come from this protocol's training part, "
        "e.g. WORK/bundles of an earlier run with the same --data and --protocol)",
    )
    p.add_argument("--limit-users", type=int, help="evaluate a seeded sample of N users (training uses everyone)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --limit-users sample")
    p.add_argument("--out", type=Path, help="results JSON (default: WORK/results.json)")
    p.add_argument("--startup-timeout-s", type=float, default=180.0, help="wait this long for GET /healthz")
    args = p.parse_args(argv)
    if args.limit_users is not None and args.limit_users < 1:
        p.error(f"--limit-users must be >= 1 (got {args.limit_users})")
    return args


def print_report(r: dict[str, Any]) -> None:
    lat = r["serving"]["latency_ms"]
    ing = r["ingest"]
    print()
    print(f"protocol {r['protocol']} on {r['data']}: {r['n_users']} users, {r['n_items']} items, "
          f"{r['n_train_events']} training events, {r['cases']} evaluated cases")  # fmt: skip
    print(f"{'model':<10}{f'HR@{K}':>9}{f'NDCG@{K}':>10}")
    for name in ("recsys", "MostPop"):
        m = r["models"][name]
        print(f"{name:<10}{m[f'hr@{K}']:>9.4f}{m[f'ndcg@{K}']:>10.4f}")
    print(f"ingest: {ing['events']} events in {ing['seconds']:.1f} s = {ing['events_per_s']:.0f} events/s "
          f"(batches of {ing['batch']}, accepted {ing['accepted']})")  # fmt: skip
    if lat["n"]:
        print(f"recommendation latency (one request at a time, n={lat['n']}): "
              f"p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms")  # fmt: skip
    s = r["serving"]
    missing = f" (missing: {s['missing_stages']})" if s["partial"] else ""
    print(f"bundle versions: {s['bundle_versions']}; degraded answers: {sum(s['degraded'].values())}; "
          f"partial answers: {s['partial']}{missing}; "
          f"recommended items already seen: {s['recommended_items_already_seen']}; "
          f"lists shorter than {K}: {s['lists_shorter_than_k']}")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        work = prepare_workdir(args.work)
        recsys = shlex.split(args.recsys) if args.recsys else default_recsys()
        ds = load_dataset(args.data)
        if args.protocol == "loo":
            train_mask, test_rows = loo_split(ds.user_ids, ds.timestamps)
            eval_users = pick_users(ds.user_ids[test_rows].tolist(), args.limit_users, args.seed)
        else:
            train_mask = replay_split(ds.timestamps, quantile=0.9)
            test_rows = np.flatnonzero(~train_mask)
            eval_users = pick_users(ds.user_ids[test_rows].tolist(), args.limit_users, args.seed)
        n_train = write_generic_layout(ds, train_mask, work / "data")
        bundles = args.bundles or work / "bundles"
        export_s = 0.0 if args.bundles else run_export(recsys, work / "data", bundles, work / "export.log")

        proc, port = start_serve(recsys, bundles, work / "state", work / "serve.log", args.startup_timeout_s)
        client = GatewayClient("127.0.0.1", port)
        try:
            train_rows = time_ordered(np.flatnonzero(train_mask), ds.timestamps)
            ingest_report = ingest(client, ds, train_rows)
            asker = Asker(client)
            replay_accepted = 0
            if args.protocol == "loo":
                model, pop = evaluate_loo(ds, asker, train_mask, test_rows, eval_users)
            else:
                model, pop, replay_accepted = evaluate_replay(ds, client, asker, train_mask, eval_users)
        finally:
            client.close()
            stop_serve(proc)
    except (BenchError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    result: dict[str, Any] = {
        "protocol": args.protocol,
        "data": str(args.data),
        "source": ds.source,
        "k": K,
        "n_users": int(np.unique(ds.user_ids).size),
        "n_items": int(np.unique(ds.item_ids).size),
        "n_events": len(ds),
        "n_train_events": n_train,
        "evaluated_users": len(eval_users),
        "cases": len(model.hr),
        "models": {"recsys": model.summary(), "MostPop": pop.summary()},
        "ingest": ingest_report,
        "replay_events_accepted": replay_accepted,
        "serving": asker.report(),
        "export_seconds": export_s,
        "work": str(work),
    }
    print_report(result)
    out = args.out or work / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
