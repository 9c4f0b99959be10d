"""Open-loop load against the gateway's REST and gRPC endpoints at fixed rates.

    python bench/load.py --bundles BUNDLES_DIR [--rates 50,100,200,300,400,500] [--seconds 10] [--pin-cpu 1]

Starts `recsys serve` over the bundle, gives --users users a history through POST /v1/events, then
for each rate sends POST /v1/recommendations (k=10) — and gRPC Gateway.Recommend — on a fixed
schedule (open loop: a request's latency counts from when it was due, so a stalled server cannot
hide its queueing by slowing the client down). Per step: achieved rate, p50/p99 latency, errors
(non-200 / non-OK) and degraded or partial answers. Saturation: the highest offered rate at which the
achieved rate stays within 5 % of it with p99 under --slo-ms. Writes JSON and a PNG.

The load generator is one asyncio process with raw keep-alive HTTP/1.1 connections (httpx costs
~1 ms of client CPU per request here); --pin-cpu pins it to one core, apart from the services.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from protos.recsys.v1 import gateway_pb2, gateway_pb2_grpc  # noqa: E402
from recsys_cli.stack import Stack  # noqa: E402
from recsys_common.bundle import open_bundle  # noqa: E402
from recsys_common.catalog import Catalog  # noqa: E402


class HttpConn:
    """One keep-alive HTTP/1.1 connection speaking just enough of the protocol for JSON POSTs."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, host: str, port: int) -> HttpConn:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer, host)

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.writer.write(head + body)
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)


async def run_step(send: Any, rate: float, seconds: float, make_body: Any) -> dict[str, Any]:
    """Fire send(body) at `rate` per second for `seconds`; latency counted from each request's due time."""
    n = int(rate * seconds)
    latencies: list[float] = []
    errors = flagged = 0
    start = time.perf_counter() + 0.05

    async def one(i: int) -> None:
        nonlocal errors, flagged
        due = start + i / rate
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        try:
            ok, marked = await send(make_body(i))
        except Exception:
            ok, marked = False, False
        latencies.append((time.perf_counter() - due) * 1000)
        errors += not ok
        flagged += marked

    await asyncio.gather(*(one(i) for i in range(n)))
    elapsed = time.perf_counter() - start
    lat = np.asarray(latencies)
    return {
        "offered_rps": rate,
        "achieved_rps": round(n / elapsed, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 2),
        "p99_ms": round(float(np.percentile(lat, 99)), 2),
        "error_rate": round(errors / n, 4),
        "partial_or_degraded": flagged,
        "requests": n,
    }


async def rest_sender(host: str, port: int, connections: int) -> Any:
    pool: asyncio.Queue[HttpConn] = asyncio.Queue()
    for _ in range(connections):
        pool.put_nowait(await HttpConn.open(host, port))

    async def send(body: bytes) -> tuple[bool, bool]:
        conn = await pool.get()
        try:
            status, data = await conn.post("/v1/recommendations", body)
        finally:
            pool.put_nowait(conn)
        reply = json.loads(data)
        return status == 200, bool(reply.get("partial") or reply.get("degraded"))

    return send


async def grpc_sender(address: str) -> Any:
    import grpc.aio

    channel = grpc.aio.insecure_channel(address)
    stub = gateway_pb2_grpc.GatewayStub(channel)

    async def send(body: bytes) -> tuple[bool, bool]:
        request = json.loads(body)
        reply = await stub.Recommend(gateway_pb2.RecommendRequest(user_id=request["user_id"], k=10), timeout=5)
        return True, bool(reply.partial or reply.degraded)

    return send


class Probe:
    """Between steps: CPU seconds of each service process (/proc) and the gateway's batch-size histogram."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack

    def read(self) -> dict[str, float]:
        tick = os.sysconf("SC_CLK_TCK")
        out = {}
        for name, proc in self.stack.procs.items():
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[f"cpu_{name}"] = (int(fields[11]) + int(fields[12])) / tick
        # The load generator's own CPU shares the machine with the services: a heavier client leaves them less.
        out["cpu_loadgen"] = time.process_time()
        with urllib.request.urlopen(f"{self.stack.http_url}/metrics", timeout=10) as reply:
            for line in reply.read().decode().splitlines():
                match = re.match(r'recsys_gateway_batch_size_(sum|count)\{call="(\w+)"\} (\S+)', line)
                if match:
                    out[f"batch_{match[2]}_{match[1]}"] = float(match[3])
        return out

    @staticmethod
    def per_step(before: dict[str, float], after: dict[str, float], requests: int) -> dict[str, Any]:
        """CPU ms per request of each process, and the mean requests per call to each service."""
        cpu = {k[4:]: round((after[k] - before[k]) / requests * 1000, 2) for k in after if k.startswith("cpu_")}
        batch = {}
        for call in ("search", "rank"):
            calls = after.get(f"batch_{call}_count", 0) - before.get(f"batch_{call}_count", 0)
            if calls:
                batch[call] = round((after[f"batch_{call}_sum"] - before[f"batch_{call}_sum"]) / calls, 2)
        return {"cpu_ms_per_request": cpu, "mean_batch": batch}


def saturation(steps: list[dict[str, Any]], slo_ms: float) -> float:
    good = [s["offered_rps"] for s in steps if s["achieved_rps"] >= 0.95 * s["offered_rps"] and s["p99_ms"] <= slo_ms
            and s["error_rate"] == 0]  # fmt: skip
    return max(good, default=0.0)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(0)
    catalog = Catalog.load(open_bundle(args.bundles))
    users = [f"load-{u}" for u in range(args.users)]
    rates = [float(r) for r in args.rates.split(",")]
    results: dict[str, Any] = {"rest": [], "grpc": []}
    with tempfile.TemporaryDirectory() as state, Stack(args.bundles, state, http_port=0, grpc_port=0) as stack:
        port = stack.ports["gateway"]
        conn = await HttpConn.open("127.0.0.1", port)
        for user in users:
            items = rng.sample(catalog.item_ids, min(30, len(catalog)))
            events = [{"user_id": user, "item_id": i, "timestamp": n} for n, i in enumerate(items)]
            await conn.post("/v1/events", json.dumps({"events": events}).encode())
        if args.pin_cpu is not None:
            os.sched_setaffinity(0, {args.pin_cpu})

        def body(i: int) -> bytes:
            return json.dumps({"user_id": users[i % len(users)], "k": 10}).encode()

        senders = {
            "rest": await rest_sender("127.0.0.1", port, args.connections),
            "grpc": await grpc_sender(stack.grpc_addr),
        }
        probe = Probe(stack)
        for kind in args.kinds.split(","):
            for rate in rates:
                before = probe.read()
                step = await run_step(senders[kind], rate, args.seconds, body)
                step.update(probe.per_step(before, probe.read(), step["requests"]))
                cpu = " ".join(f"{k} {v:.2f}" for k, v in step["cpu_ms_per_request"].items())
                batch = " ".join(f"{k} {v:.2f}" for k, v in step["mean_batch"].items())
                print(
                    f"{kind:<5} offered {rate:>6.0f}/s achieved {step['achieved_rps']:>7.1f}/s"
                    f"  p50 {step['p50_ms']:>7.2f} ms  p99 {step['p99_ms']:>8.2f} ms"
                    f"  errors {step['error_rate']:.2%}  flagged {step['partial_or_degraded']}"
                    f"  | CPU ms/request {cpu} | requests per call {batch}",
                    flush=True,
                )
                results[kind].append(step)
        for kind in ("rest", "grpc"):
            results[f"{kind}_saturation_rps"] = saturation(results[kind], args.slo_ms)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundles", type=Path, required=True)
    parser.add_argument("--rates", default="50,100,200,300,400,500")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--kinds", default="rest,grpc")
    parser.add_argument("--slo-ms", type=float, default=100.0, help="p99 bound for a step to count as sustained")
    parser.add_argument("--pin-cpu", type=int, default=None, help="pin the load generator to this core")
    parser.add_argument("--out", type=Path, default=Path("bench/out/load.json"))
    args = parser.parse_args()
    results = asyncio.run(main_async(args))
    print(f"saturation (p99 <= {args.slo_ms:.0f} ms, >= 95 % of offered, no errors): "
          f"REST {results['rest_saturation_rps']:.0f}/s, gRPC {results['grpc_saturation_rps']:.0f}/s")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    _plot(results, args.out.with_suffix(".png"))


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Open loop: the achieved rate tracks the offered one (it is in the table); what gives way is latency and then
    # admission, so those are the two panels.
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for kind, color in (("rest", "tab:blue"), ("grpc", "tab:green")):
        steps = results[kind]
        if not steps:
            continue
        offered = [s["offered_rps"] for s in steps]
        b.plot(offered, [s["p99_ms"] for s in steps], marker="o", color=color, label=f"{kind} p99")
        b.plot(offered, [s["p50_ms"] for s in steps], marker=".", linestyle="--", color=color, label=f"{kind} p50")
        a.plot(offered, [100 * s["error_rate"] for s in steps], marker="o", color=color, label=kind)
    a.set_xlabel("offered (req/s)")
    a.set_ylabel("refused or failed (% of requests)")
    b.set_xlabel("offered (req/s)")
    b.set_ylabel("latency from due time (ms)")
    b.set_yscale("log")
    a.legend()
    b.legend()
    fig.suptitle("Open-loop load, k=10: REST POST /v1/recommendations, gRPC Gateway.Recommend")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
